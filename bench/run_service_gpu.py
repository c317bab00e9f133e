"""The whole service on GPUs: Ray Serve app with N NCCL workers, one job over HTTP, timed.

    python bench/run_service_gpu.py                      # 2 GPUs, random-weight Wan2.1-T2V-1.3B shapes
    python bench/run_service_gpu.py --model tiny         # the tiny random model on 2 GPUs
    python bench/run_service_gpu.py --smoke [--model tiny]   # CPU/gloo, toy shapes: tests this script anywhere

Starts a local Ray cluster, deploys ``service.app:build_app`` (Ingress -> JobQueue -> one
EngineReplica whose placement group holds 1 CPU + N GPU bundles), waits for ``/readyz``, submits
one ``POST /generate``, waits for it, downloads the MP4, and writes the timings to
``$OUT/service_gpu.json`` (``./.out`` if ``$OUT`` is unset):

- ``serve_start_s``: Ray and Serve's controller and proxy are up;
- ``time_to_start_s``: ``serve.run`` returned (it waits for the replicas' constructors, model load included);
- ``time_to_ready_s``: ``/readyz`` answered 200 (every worker joined NCCL and built its generator);
- ``job_s``: the job's run time on the engine (started -> finished), ``job_wall_s``: submit -> done;
- with ``--warmup``, each replica's warm-up time (``/models``); with ``--compile``, the first job's
  steps show whether it still paid for compiling;
- the generator's stage timings and layout, and GPU memory per worker as /metrics reports it.

``--model random-1.3b`` builds the DiT, a 2-layer UMT5 of the real width and the Wan2.1 VAE with
random weights in memory on every worker (``bench/run_pipeline_gpu.py``'s builder, through this
file's ``build_random_generator`` factory): a noise video at the real cost of the 1.3B model.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_random_generator(config: dict, rank: int, world_size: int):
    """Generator factory for the service: random weights at the variant's real shapes, in memory."""
    import torch

    from bench.run_pipeline_gpu import build_components
    from wan_model.pipeline.generator import Generator, GeneratorConfig

    config = dict(config)
    t5 = config.pop("bench_t5", "small")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = argparse.Namespace(variant=config["variant"], smoke=device.type == "cpu", t5=t5, vae_dtype="float32")
    components = build_components(args, device, dtype, rank)
    gen_config = GeneratorConfig(model="<in-memory>", device=str(device), dtype=str(dtype).replace("torch.", ""),
                                 parallel=config.get("parallel", "auto"), ulysses=config.get("ulysses"),
                                 ring=config.get("ring"), cfg_parallel=config.get("cfg_parallel"),
                                 attention=config.get("attention", "auto"), compile=bool(config.get("compile", False)))
    return Generator(gen_config, components=components)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--model", choices=["random-1.3b", "tiny"], default="random-1.3b")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=540.0, help="seconds for start-up and the job together")
    p.add_argument("--compile", action="store_true", help="generator option compile: true (regional torch.compile)")
    p.add_argument("--warmup", action="store_true",
                   help="service setting warmup: each engine replica runs the job's shape (2 steps) before it is ready")
    p.add_argument("--smoke", action="store_true", help="CPU workers (gloo), tiny model: tests the script")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(os.environ.get("OUT") or REPO / ".out")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": vars(args)}
    # Ray workers inherit the environment: let them import `service`, `wan_model` and `bench`.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.monotonic()
    deadline = t0 + args.timeout

    import httpx
    import ray
    from ray import serve

    from service.app import build_app
    from service.config import ServiceSettings

    fields: dict = dict(app_name="wanserve-bench", data_dir=tempfile.mkdtemp(prefix="wanserve-bench-"),
                        host="127.0.0.1", port=free_port(), health_check_period_s=10, health_timeout_s=60,
                        worker_init_timeout_s=args.timeout, progress_interval_s=0.5)
    if args.smoke and args.model == "random-1.3b":  # the random-weight factory at toy shapes on CPU
        fields.update(model="random-tiny", variant="tiny-t2v", gpus=0, cpu_workers=2,
                      generator_factory="bench.run_service_gpu:build_random_generator")
    elif args.smoke:
        fields.update(model="tiny", gpus=0, cpu_workers=2)
    elif args.model == "tiny":
        fields.update(model="tiny", gpus=args.gpus)
    else:
        fields.update(model="random-1.3b", variant="wan2.1-t2v-1.3b", gpus=args.gpus,
                      generator_factory="bench.run_service_gpu:build_random_generator")
    if args.compile:
        fields["generator_options"] = {"compile": True}
    spec = ServiceSettings(**fields).variant_spec
    body = {"prompt": "a red fox running through fresh snow, cinematic", "seed": 0, "steps": args.steps,
            "width": args.width or spec.default_size[0], "height": args.height or spec.default_size[1],
            "num_frames": args.frames or spec.default_frames}
    if args.warmup:
        fields["warmup"] = [{k: body[k] for k in ("width", "height", "num_frames")}]
    settings = ServiceSettings(**fields)
    report.update(variant=spec.name, settings={k: fields[k] for k in ("model", "gpus") if k in fields}, request=body)
    url = f"http://127.0.0.1:{settings.port}"
    ray.init(num_cpus=max(4, settings.world_size + 2), include_dashboard=False)
    try:
        report["ray_init_s"] = time.monotonic() - t0
        serve.start(http_options={"host": settings.host, "port": settings.port})
        report["serve_start_s"] = time.monotonic() - t0
        serve.run(build_app(settings), name=settings.app_name, route_prefix="/", blocking=False)
        report["time_to_start_s"] = time.monotonic() - t0
        client = httpx.Client(base_url=url, timeout=30)
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"/readyz not 200 within {args.timeout} s: {serve.status()}")
            time.sleep(1.0)
        report["time_to_ready_s"] = time.monotonic() - t0
        report["models"] = client.get("/models").json()["models"]

        submitted = time.monotonic()
        r = client.post("/generate", json=body)
        r.raise_for_status()
        job_id = r.json()["id"]
        while True:
            job = client.get(f"/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not done within the time limit: {job}")
            time.sleep(0.5)
        report["job_wall_s"] = time.monotonic() - submitted
        report["job"] = {k: job.get(k) for k in ("status", "error", "attempts", "result", "timings")}
        report["job_s"] = (job["finished_at"] or 0) - (job["started_at"] or 0)
        if job["status"] == "succeeded":
            video = client.get(f"/jobs/{job_id}/video")
            (out_dir / "service_gpu.mp4").write_bytes(video.content)
            report["video_bytes"] = len(video.content)
        report["metrics_gpu"] = [line for line in client.get("/metrics").text.splitlines()
                                 if line.startswith("wanserve_gpu_memory_bytes")]
        report["ok"] = job["status"] == "succeeded"
    except Exception as exc:  # noqa: BLE001 - the JSON says what went wrong
        report["ok"] = False
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        report["total_s"] = time.monotonic() - t0
        (out_dir / "service_gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(json.dumps({k: report.get(k) for k in ("ok", "error", "variant", "time_to_start_s", "time_to_ready_s",
                                                     "job_s", "job_wall_s", "total_s")}, indent=2))
        timings = (report.get("job") or {}).get("timings") or {}
        print("job stages:", {k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 2)
                              for k, v in timings.items() if isinstance(v, (int, float, list))})
        print("warm-up:", [r.get("warmup") for m in report.get("models") or [] for r in m.get("replicas", [])])
        print(f"wrote {out_dir / 'service_gpu.json'}")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
