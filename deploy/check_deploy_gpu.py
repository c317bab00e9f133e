"""GPU check of deploy/serve_config.gpu.yaml as an operator runs it: `ray start --head` with N GPUs,
`serve deploy` of the GPU config (placement group of 1 CPU + N GPU bundles, NCCL workers), one job
through `wanserve submit --wait`, the MP4 checked, then `serve shutdown` and the cluster stopped.

    python deploy/check_deploy_gpu.py                    # tiny random model on every visible GPU
    python deploy/check_deploy_gpu.py --gpus 4 --model /models/Wan2.1-T2V-14B
    python deploy/check_deploy_gpu.py --gpus 4 --write-model wan2.1-t2v-14b --steps 4 --redeploy
    python deploy/check_deploy_gpu.py --gpus 2 --cpu     # gloo CPU workers: checks this script anywhere

With a real model folder the config is deployed as it stands, its ``compile`` and ``warmup`` too.
``--write-model VARIANT`` first writes a folder in the official release layout with random weights
of the variant's real shapes (``bench/check_fsdp_load_gpu.py``'s writer). ``--redeploy`` then shuts
Serve down and deploys the same config again on the same cluster: a new replica with the compile
cache the first one left in the data_dir, as after a crash or a scale-up.

Writes ``$OUT/deploy_gpu.json`` (``./.out`` if ``$OUT`` is unset) after every stage: ok, error, the
layout the workers used, the time to each stage, each replica's warm-up (seconds, graphs compiled
and loaded from the cache). Exit status 0 only if every job succeeded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "deploy" / "serve_config.gpu.yaml"))
    parser.add_argument("--gpus", type=int, default=None, help="GPUs per engine replica (default: all visible)")
    parser.add_argument("--model", default="tiny", help="'tiny' (random weights) or a model folder")
    parser.add_argument("--write-model", metavar="VARIANT",
                        help="write a random-weight folder of this variant's real shapes first, and serve it")
    parser.add_argument("--steps", type=int, default=None, help="the job's steps (default: the variant's)")
    parser.add_argument("--redeploy", action="store_true",
                        help="then shut Serve down, deploy again (warm compile cache) and run the job again")
    parser.add_argument("--cpu", action="store_true", help="gloo CPU workers instead of GPUs (script check)")
    parser.add_argument("--prompt", default="a red fox running through snow")
    parser.add_argument("--expect-attention", metavar="KERNEL",
                        help="fail unless the job's layout line names this attention kernel (e.g. fa3): "
                             "catches a worker that could not import it and ran another")
    args = parser.parse_args()

    import yaml

    from test_serve_deploy import LocalRayCluster, free_ports

    out_dir = Path(os.environ.get("OUT") or REPO / ".out")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"ok": False, "config": args.config, "model": args.write_model or args.model, "deploys": []}

    def save() -> None:
        (out_dir / "deploy_gpu.json").write_text(json.dumps(report, indent=2, default=str))

    gpus = args.gpus
    if gpus is None:
        import torch

        gpus = 2 if args.cpu else torch.cuda.device_count()
    if gpus < 1:
        raise SystemExit("no GPUs visible; pass --cpu to check the script with gloo workers")
    report["gpus"] = gpus

    work = Path(tempfile.mkdtemp(prefix="wanserve-deploy-check-"))
    t0 = time.monotonic()
    model = args.model
    if args.write_model:
        import torch

        from bench.check_fsdp_load_gpu import write_model_folder

        model = str(work / "models" / args.write_model)
        device = torch.device("cpu" if args.cpu else "cuda", 0)
        report["model_folder"] = write_model_folder(Path(model), args.write_model, device, smoke=args.cpu)
        save()
    config = yaml.safe_load(Path(args.config).read_text())
    app = config["applications"][0]
    port, = free_ports(1)
    config["http_options"].update(host="127.0.0.1", port=port)
    app_args = app["args"]
    app_args.update(model=model, data_dir=str(work / "data"), gpus=0 if args.cpu else gpus)
    if args.write_model:
        app_args["variant"] = args.write_model  # tiny variants are not told by a folder's name
    if args.cpu:
        app_args["cpu_workers"] = gpus
    for name in ("lora_dir", "auth_token_file", "dtype"):
        app_args.pop(name, None)  # no mounted LoRAs or secret on a bench machine
    if model == "tiny" or args.cpu:
        # The config warms up (and compiles) two 14B sizes at 1280x720: a tiny model or CPU workers
        # warm up (and compile) the variant's default size instead, the size of the job.
        app_args["warmup"] = [{"steps": 2}]
    engine = next(d for d in app["deployments"] if d["name"] == "EngineReplica")
    engine["placement_group_bundles"] = [{"CPU": 1}] + [{"CPU": 1} if args.cpu else {"GPU": 1}] * gpus
    engine["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=1)
    app_args["engine_replicas"] = 1
    config_path = work / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    report["serve_config"] = config
    url = f"http://127.0.0.1:{port}"

    cluster = LocalRayCluster(num_cpus=gpus + 3, num_gpus=0 if args.cpu else gpus)
    try:
        from test_serve_deploy import http_up, wait_for

        wait_for(lambda: http_up(f"{cluster.dashboard_url}/api/version"), 180, "the Ray dashboard",
                 alive=cluster.check_alive)
        report["cluster_start_s"] = time.monotonic() - t0
        for attempt in range(2 if args.redeploy else 1):
            record: dict = {}
            report["deploys"].append(record)
            deploy_and_run(cluster, config_path, url, work / f"out-{attempt}.mp4", args, record, save)
            if args.redeploy and attempt == 0:
                cluster.shutdown_serve(timeout_s=120)
        report["ok"] = all(d.get("ok") for d in report["deploys"])
    except Exception as exc:  # noqa: BLE001 - the report says what failed
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        report["serve_status"] = cluster.serve_app("wanserve")
        report["ray_start_log"] = cluster.log_tail(8000)
    finally:
        cluster.shutdown_serve(timeout_s=120)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
        report["total_s"] = time.monotonic() - t0
        save()
        print(json.dumps({k: report.get(k) for k in ("ok", "error", "gpus", "cluster_start_s", "total_s")}, default=str))
        for i, d in enumerate(report["deploys"]):
            print(f"deploy {i}:", json.dumps({k: d.get(k) for k in ("ok", "error", "attention", "ready_s", "job_wall_s", "warmup", "layout")},
                                             default=str))
    return 0 if report["ok"] else 1


def deploy_and_run(cluster, config_path: Path, url: str, video: Path, args, record: dict, save) -> None:
    """``serve deploy``, wait for /readyz, one job through ``wanserve submit --wait``; fills ``record``."""
    import httpx

    from service.cli import main as wanserve
    from test_serve_deploy import SERVE_CLI, run, wait_for

    t0 = time.monotonic()
    run(SERVE_CLI + ["deploy", str(config_path), "--address", cluster.dashboard_url], cluster.env, 180)
    record["deploy_s"] = time.monotonic() - t0
    wait_for(lambda: cluster.serve_ready(url), 1800, "/readyz", interval_s=2, alive=cluster.check_alive)
    record["ready_s"] = time.monotonic() - t0
    replicas = httpx.get(f"{url}/models", timeout=30).json()["models"][0]["replicas"]
    record.update({k: replicas[0].get(k) for k in ("layout", "init_s", "warmup", "compile_cache_dir")})
    save()
    submit = ["submit", "--url", url, "--prompt", args.prompt, "--seed", "1", "--wait", "--quiet", "-o", str(video)]
    if args.steps:
        submit += ["--steps", str(args.steps)]
    started = time.monotonic()
    code = wanserve(submit)
    record["job_wall_s"] = time.monotonic() - started
    jobs = httpx.get(f"{url}/jobs", timeout=30).json()["jobs"]
    record["job"] = jobs[0] if jobs else None  # newest first
    save()
    if code != 0:
        raise RuntimeError(f"wanserve submit --wait exited {code}: {record['job']}")
    from wan_model.pipeline.video import read_mp4  # imageio-ffmpeg: what the GPU image is given

    frames = len(read_mp4(str(video)))
    record["video"] = {"bytes": video.stat().st_size, "frames": frames}
    record["ok"] = frames == record["job"]["result"]["num_frames"]
    ran = layout_field(record["job"]["result"].get("layout") or "", "attention")
    record["attention"] = ran
    if args.expect_attention and ran != args.expect_attention:
        record["ok"] = False
        record["error"] = f"the job ran attention={ran}, not {args.expect_attention}"
    save()


def layout_field(layout: str, name: str) -> str | None:
    """``attention`` of ``"world=4 ... attention=fa3 ..."`` -> ``"fa3"``."""
    for part in layout.split():
        key, _, value = part.partition("=")
        if key == name:
            return value
    return None


if __name__ == "__main__":
    sys.exit(main())
