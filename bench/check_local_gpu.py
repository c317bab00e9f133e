"""One GPU: the single-rank default path (LocalAttention 'auto') picks FA4 under torch.compile and
matches cuDNN (1.3B shapes, 6 blocks, 832x480x81); fp8 blocks then run compiled. Prints JSON lines.

    python3 bench/check_local_gpu.py        # needs flash-attn-4 (bench/fa4_wheels.sh) for kernel=fa4
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from bench_models import Shape, build_ours, make_inputs, with_layers  # noqa: E402

from wan_model.attention import LocalAttention  # noqa: E402
from wan_model.compile import compile_blocks  # noqa: E402
from wan_model.config import VARIANTS  # noqa: E402
from wan_model.fp8 import quantize_blocks_fp8  # noqa: E402
from wan_model.sequence import SequenceSharding  # noqa: E402

dev = torch.device("cuda")
cfg = with_layers(VARIANTS["wan2.1-t2v-1.3b"].transformer, 6)
model = build_ours(cfg, dev, torch.bfloat16, 0)
x, t, ctx = make_inputs(cfg, Shape(832, 480, 81), dev, torch.bfloat16, 1)
cudnn = LocalAttention("cudnn")
model.set_parallel(SequenceSharding(), cudnn)
with torch.no_grad():
    ref = model(x, t, ctx).float()
auto = LocalAttention("auto")
model.set_parallel(SequenceSharding(), auto)
compile_blocks(model)
with torch.no_grad():
    model(x, t, ctx)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(x, t, ctx).float()
    torch.cuda.synchronize()
rel = ((out - ref).norm() / ref.norm()).item()
print(json.dumps(dict(check="local_auto_compiled", kernel=auto.kernel_name, rel_vs_cudnn_eager=rel,
                      forward_s=time.perf_counter() - t0)), flush=True)
quantize_blocks_fp8(model)
with torch.no_grad():
    model(x, t, ctx)
    out8 = model(x, t, ctx).float()
print(json.dumps(dict(check="fp8_after_compile", kernel=auto.kernel_name,
                      rel_vs_bf16=((out8 - ref).norm() / ref.norm()).item(),
                      finite=bool(torch.isfinite(out8).all()))), flush=True)
