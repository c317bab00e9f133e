"""One GPU: a LoRA on fp8 blocks (``fp8: true``) at the real 1.3B shapes, through a checkpoint on disk.

A random 1.3B transformer is written as an official checkpoint and loaded back in bf16 (as a
deployment loads it); the blocks go to fp8 and are compiled. A rank-32 LoRA on every linear layer
of every block is merged, which re-reads each touched weight from the file and quantizes the sum.
Checked and printed as JSON lines:
- the fp8 weights after the merge equal those of a model that merged the LoRA in bf16 and was then
  quantized, bit for bit; after the unmerge they equal the starting fp8 weights;
- the compiled fp8 forward with the LoRA against the eager bf16 forward with the LoRA (relative error);
- how long the merge and the unmerge take, next to the same LoRA on the bf16 model.

    python3 bench/check_fp8_lora_gpu.py --out $OUT     # 832x480x21 inputs, about a minute
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from bench_models import Shape, build_ours, make_inputs  # noqa: E402

from wan_model.compile import compile_blocks  # noqa: E402
from wan_model.config import VARIANTS  # noqa: E402
from wan_model.fp8 import quantize_blocks_fp8  # noqa: E402
from wan_model.loader import load_transformer, save_transformer  # noqa: E402
from wan_model.lora import merge_lora, unmerge_lora  # noqa: E402


def lora_on_every_block_linear(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, module in model.blocks.named_modules():
        if isinstance(module, torch.nn.Linear):
            tensors[f"blocks.{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
            tensors[f"blocks.{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    return tensors


def timed(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out", default=os.environ.get("OUT", ".out/bench"))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, eager: tests the script")
    args = p.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    cfg = VARIANTS["tiny-t2v" if args.smoke else "wan2.1-t2v-1.3b"].transformer
    size = Shape(64, 64, 5) if args.smoke else Shape(832, 480, 21)
    rows = []

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)

    folder = Path(tempfile.mkdtemp()) / "transformer"
    save_transformer(build_ours(cfg, torch.device("cpu"), torch.bfloat16, 0), folder)
    fp8 = load_transformer(folder, dtype=torch.bfloat16, device=dev)
    lora = lora_on_every_block_linear(fp8, args.rank)
    x, t, ctx = make_inputs(cfg, size, dev, torch.bfloat16, 1)

    bf16 = load_transformer(folder, dtype=torch.bfloat16, device=dev)
    bf16_merge_s = timed(lambda: merge_lora(bf16, lora))
    with torch.no_grad():
        exact = bf16(x, t, ctx).float()
    bf16_unmerge_s = timed(lambda: unmerge_lora(bf16))

    quantize_blocks_fp8(fp8)
    start = {k: v.clone() for k, v in fp8.state_dict().items()}
    if not args.smoke:
        compile_blocks(fp8)
    with torch.no_grad():
        fp8(x, t, ctx)  # compile before the merge: the merge must reach the compiled graphs
    fp8_merge_s = timed(lambda: merge_lora(fp8, lora))
    with torch.no_grad():
        got = fp8(x, t, ctx).float()

    reference = load_transformer(folder, dtype=torch.bfloat16, device=dev)
    merge_lora(reference, lora)
    quantize_blocks_fp8(reference)
    expected = reference.state_dict()
    merged_equal = all(torch.equal(v.float(), expected[k].float()) for k, v in fp8.state_dict().items())
    changed = sum(not torch.equal(v.float(), start[k].float()) for k, v in fp8.state_dict().items())
    fp8_unmerge_s = timed(lambda: unmerge_lora(fp8))
    restored = all(torch.equal(v.float(), start[k].float()) for k, v in fp8.state_dict().items())
    emit(dict(check="fp8_lora", device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              lora_rank=args.rank,
              layers=len(lora) // 2, tensors_changed=changed,
              merged_equals_bf16_merge_then_quantize=merged_equal, unmerge_restores_start=restored,
              rel_compiled_fp8_lora_vs_eager_bf16_lora=((got - exact).norm() / exact.norm()).item(),
              merge_s={"fp8": round(fp8_merge_s, 2), "bf16": round(bf16_merge_s, 2)},
              unmerge_s={"fp8": round(fp8_unmerge_s, 2), "bf16": round(bf16_unmerge_s, 2)}))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_lora.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0 if merged_equal and restored and changed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
