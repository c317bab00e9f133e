"""GPU check: would keeping the modulation, time-embedding and norm parameters in float32 (as both
references store them) change a bf16 forward loaded from a checkpoint?

One random-weight Wan2.1-T2V-1.3B checkpoint (real shapes, float32, diffusers layout) is written,
then loaded four ways, and one transformer forward of the same inputs is compared:
- the reference: diffusers ``from_pretrained(torch_dtype=float32)``;
- diffusers ``from_pretrained(torch_dtype=bfloat16)`` (it keeps ``_keep_in_fp32_modules`` in fp32);
- ours as ``load_transformer(dtype=bfloat16)`` loads it (every parameter bf16);
- ours with the parameters of ``KEEP_FP32`` left in fp32 (the model computes with them in fp32
  either way; only their storage differs).

    python3 bench/check_fp32_params_gpu.py --frames 33 --out results.json

Prints each one's relative error against the reference (the norm of the difference over the
reference's norm), and ours against diffusers in bf16.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_models import MODELS, Shape, make_inputs, random_init_  # noqa: E402


# Official Wan keeps every parameter in fp32 and computes these under fp32 autocast; diffusers lists
# their counterparts in _keep_in_fp32_modules.
KEEP_FP32 = re.compile(r"(^|\.)modulation$|^time_embedding\.|^time_projection\.|^blocks\.\d+\.norm3\.")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="1.3b", choices=sorted(MODELS), help="tiny: a CPU smoke run of the script")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from diffusers import WanTransformer3DModel

    from wan_model.loader import load_transformer, save_transformer
    from wan_model.model import WanModel

    device = torch.device(args.device)
    config, (width, height), _ = MODELS[args.model]
    shape = Shape(width, height, args.frames)
    results: dict = {"model": args.model, "shape": f"{width}x{height}x{args.frames}", "tokens": shape.tokens(config),
                     "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        t0 = time.perf_counter()
        model = WanModel(config)
        random_init_(model, args.seed)
        save_transformer(model, folder, layout="diffusers")
        del model
        results["write_s"] = round(time.perf_counter() - t0, 1)

        x, t, context = make_inputs(config, shape, device, torch.float32, args.seed)
        outputs = {}
        with torch.no_grad():
            for name, dtype in (("diffusers_fp32", torch.float32), ("diffusers_bf16", torch.bfloat16)):
                peer = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).to(device)
                outputs[name] = peer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=context.to(dtype),
                                     return_dict=False)[0].float().cpu()
                kept = sorted({n.split(".")[0] for n, p in peer.named_parameters() if p.dtype == torch.float32})
                results[f"{name}_fp32_modules"] = kept
                del peer
                torch.cuda.empty_cache()
            xb, cb = x.to(torch.bfloat16), context.to(torch.bfloat16)
            ours = load_transformer(folder, device=device, dtype=torch.bfloat16)
            outputs["ours_bf16_all"] = ours(xb, t, cb).float().cpu()
            del ours
            ours = load_transformer(folder, device=device, dtype=torch.float32)
            for name, param in ours.named_parameters():
                if not KEEP_FP32.search(name):
                    param.data = param.data.to(torch.bfloat16)
            results["ours_fp32_params"] = sum(1 for p in ours.parameters() if p.dtype == torch.float32)
            outputs["ours_bf16_kept_fp32"] = ours(xb, t, cb).float().cpu()
            del ours
    ref = outputs["diffusers_fp32"]
    results["rel_error_vs_diffusers_fp32"] = {k: rel(v, ref) for k, v in outputs.items() if k != "diffusers_fp32"}
    results["ours_kept_vs_diffusers_bf16"] = rel(outputs["ours_bf16_kept_fp32"], outputs["diffusers_bf16"])
    results["ours_all_bf16_vs_diffusers_bf16"] = rel(outputs["ours_bf16_all"], outputs["diffusers_bf16"])
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
