"""Does ``fsdp: true`` fit a real-shape model on small cards, loaded from a model folder?

    python3 bench/check_fsdp_load_gpu.py --gpus 4 --variant wan2.2-t2v-a14b --card-gib 24
    python3 bench/check_fsdp_load_gpu.py --smoke        # CPU/gloo, tiny A14B: tests the script

Rank 0 first writes a model folder in the official release layout with random weights of the
variant's real shapes: the transformer(s) as sharded safetensors, the full UMT5-XXL encoder
(``.pth``), the VAE and a stand-in tokenizer. Then every rank caps its CUDA memory at
``--card-gib`` (``GeneratorConfig.memory_fraction``, as on a card of that size) and builds the
generator the way the service does: ``Generator(GeneratorConfig(model=folder, fsdp=True,
text_encoder="fsdp"))`` (``--text-encoder``), which loads each expert straight into its FSDP shards. It then runs one job
(``--steps`` 3 crosses the A14B expert boundary, so both experts run) and reports, per rank, the
peak memory of loading and of the job.

``--old-load`` first tries what loading did before shards were filled during the load: each rank
puts the whole expert on its GPU, under the same cap. The expected answer for 14B on a 24 GiB card
is an out-of-memory error, which is recorded, not raised.

Writes one JSON row to ``$OUT/fsdp_load.jsonl`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ranks import join_group, spawn_ranks  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=None, help="ranks (default: all visible GPUs)")
    p.add_argument("--variant", default="wan2.2-t2v-a14b")
    p.add_argument("--card-gib", type=float, default=24.0, help="simulated card size: the CUDA memory cap per rank")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--attention", default="auto")
    p.add_argument("--text-encoder", default="fsdp", choices=["fsdp", "cpu", "replicated"],
                   help="GeneratorConfig.text_encoder (UMT5-XXL placement)")
    p.add_argument("--ulysses", type=int, default=None, help="manual layout: Ulysses degree (default: auto layout)")
    p.add_argument("--cfg-parallel", dest="cfg_parallel", action="store_true", default=None)
    p.add_argument("--no-cfg-parallel", dest="cfg_parallel", action="store_false")
    p.add_argument("--folder", default=None, help="where to write the model folder (default: $TMPDIR)")
    p.add_argument("--keep-folder", action="store_true")
    p.add_argument("--old-load", action="store_true", help="also try the whole-expert load under the cap")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / ".out"))
    p.add_argument("--smoke", action="store_true", help="CPU/gloo, tiny A14B at toy shapes, 2 ranks")
    return p.parse_args(argv)


def write_model_folder(root: Path, variant_name: str, device: torch.device, smoke: bool) -> dict:
    """The official release layout at the variant's real shapes (random weights), written from ``device``."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from wan_model.config import get_variant
    from wan_model.loader import save_transformer
    from wan_model.model import WanModel
    from wan_model.pipeline.model_dir import OFFICIAL_EXPERT_DIRS, OFFICIAL_TOKENIZER_DIR
    from wan_model.pipeline.text_encoder import OFFICIAL_T5_FILE, UMT5_XXL, save_official_t5, umt5_config
    from wan_model.pipeline.tiny import TINY_T5, build_tiny_tokenizer
    from wan_model.pipeline.vae import OFFICIAL_VAE_FILES, save_official_vae, vae_config

    spec = get_variant(variant_name)
    started = time.perf_counter()
    dtype = torch.float32 if smoke else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for i, expert in enumerate(spec.experts):
            torch.manual_seed(10 + i)
            with torch.device(device):
                model = WanModel(spec.transformer)
                torch.nn.init.normal_(model.head.head.weight, std=0.02)  # official init zeroes it
            folder = root / (OFFICIAL_EXPERT_DIRS[expert] if expert else "")
            save_transformer(model, folder, layout="official", max_shard_bytes=None if smoke else 5 * 10**9)
            del model
        tokenizer = build_tiny_tokenizer(root / OFFICIAL_TOKENIZER_DIR)  # any T5 tokenizer does for memory and time
        shape = dict(TINY_T5, d_model=spec.text_encoder_dim,
                     vocab_size=len(AutoTokenizer.from_pretrained(tokenizer))) if smoke else UMT5_XXL
        config = umt5_config(**shape)
        torch.manual_seed(1)
        with torch.device(device):
            t5 = UMT5EncoderModel(config).eval()
        save_official_t5(t5, root / OFFICIAL_T5_FILE)
        del t5
    finally:
        torch.set_default_dtype(previous)
    from diffusers import AutoencoderKLWan

    torch.manual_seed(2)
    vae = AutoencoderKLWan(**vae_config(spec.vae, **({"base_dim": 8, "decoder_base_dim": 8} if smoke else {})))
    save_official_vae(vae, root / OFFICIAL_VAE_FILES[spec.vae], spec.vae)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {"write_s": time.perf_counter() - started, "folder_gb": size / 1e9}


def old_load(folder: Path, spec, device: torch.device) -> dict:
    """Each rank loads the whole first expert onto its device, as ``fsdp`` did before (under the same cap)."""
    from wan_model.loader import CheckpointError, load_transformer
    from wan_model.pipeline.model_dir import OFFICIAL_EXPERT_DIRS

    expert = spec.experts[0]
    path = folder / (OFFICIAL_EXPERT_DIRS[expert] if expert else "")
    try:
        model = load_transformer(path, variant=spec.name, device=device, dtype=torch.bfloat16)
        outcome = {"ok": True}
        del model
    except (torch.OutOfMemoryError, CheckpointError) as err:  # the loader names the tensor it could not read
        if not isinstance(err, torch.OutOfMemoryError) and not isinstance(err.__cause__, torch.OutOfMemoryError):
            raise
        outcome = {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:240]}"}
    if device.type == "cuda":
        outcome["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return outcome


def rank_main(rank: int, world: int, port: int, args, out_file: str) -> None:
    from wan_model.config import get_variant
    from wan_model.pipeline.fsdp import local_parameter_bytes
    from wan_model.pipeline.generator import Generator, GeneratorConfig
    from wan_model.pipeline.request import GenerationRequest

    device = join_group(rank, world, port, cpu=args.smoke)
    if args.smoke:
        torch.set_num_threads(1)
    spec = get_variant(args.variant)
    folder = Path(args.folder or os.environ.get("TMPDIR", "/tmp")) / f"wanserve-fsdp-{spec.name}"
    written = {}
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        written = write_model_folder(folder, spec.name, device, args.smoke)
    dist.barrier()
    row = {"kind": "fsdp_load", "variant": spec.name, "world": world, "card_gib": args.card_gib,
           "text_encoder": args.text_encoder, **written}
    if device.type == "cuda":
        row["device"] = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, args.card_gib * 2**30 / total)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        fraction = None
    if args.old_load and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        row["old_load"] = old_load(folder, spec, device)
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    dist.barrier()

    started = time.perf_counter()
    config = GeneratorConfig(model=str(folder), variant=spec.name, device=str(device),
                             dtype="float32" if args.smoke else "bfloat16", fsdp=True, text_encoder=args.text_encoder,
                             memory_fraction=fraction, attention=args.attention,
                             **({"parallel": "manual", "ulysses": args.ulysses, "cfg_parallel": args.cfg_parallel}
                                if args.ulysses is not None or args.cfg_parallel is not None else {}))
    generator = Generator(config)
    load_s = time.perf_counter() - started
    peak_load = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    shard_gib = sum(local_parameter_bytes(m) for m in generator.parts.experts.values()) / 2**30
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out_dir = Path(tempfile.mkdtemp(prefix=f"wanserve-fsdp-job-{rank}-"))  # the video; removed below
    request = GenerationRequest(prompt="a red fox running through fresh snow", output_dir=str(out_dir),
                                num_frames=args.frames, width=args.width, height=args.height, steps=args.steps, seed=0)
    result = generator.generate(request)
    peak_job = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"load_s": load_s, "peak_load_gib": peak_load, "peak_job_gib": peak_job,
                                      "expert_shards_gib": shard_gib})
    if rank == 0:
        row.update({
            "layout": result.layout, "experts_per_step": result.experts_per_step,
            "video": {"frames": args.frames, "width": args.width, "height": args.height, "steps": args.steps},
            "timings": {k: v for k, v in result.timings.items() if isinstance(v, float)},
            "ranks": per_rank,
            "peak_gib_max": max(max(r["peak_load_gib"], r["peak_job_gib"]) for r in per_rank),
        })
        with open(out_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row, indent=2))
        if not args.keep_folder:
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.variant, args.gpus = "tiny-a14b", args.gpus or 2
        args.width, args.height, args.frames = 48, 48, 5
    world = args.gpus or torch.cuda.device_count()
    return spawn_ranks(rank_main, world, args, Path(args.out) / "fsdp_load.jsonl", min_world=2)


if __name__ == "__main__":
    sys.exit(main())
