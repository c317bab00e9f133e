"""GPU check of deploy/serve_config.gpu.yaml as an operator runs it: `ray start --head` with N GPUs,
`serve deploy` of the GPU config (placement group of 1 CPU + N GPU bundles, NCCL workers), one job
through `wanserve submit --wait`, the MP4 checked, then `serve shutdown` and the cluster stopped.

    python deploy/check_deploy_gpu.py                    # tiny random model on every visible GPU
    python deploy/check_deploy_gpu.py --gpus 4 --model /models/Wan2.1-T2V-14B
    python deploy/check_deploy_gpu.py --gpus 2 --cpu     # gloo CPU workers: checks this script anywhere

Writes ``$OUT/deploy_gpu.json`` (``./.out`` if ``$OUT`` is unset): ok, error, the layout the
workers used, and the time to each stage. Exit status 0 only if the job succeeded.
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
    parser.add_argument("--cpu", action="store_true", help="gloo CPU workers instead of GPUs (script check)")
    parser.add_argument("--prompt", default="a red fox running through snow")
    args = parser.parse_args()

    import httpx
    import yaml

    from service.cli import main as wanserve
    from test_serve_deploy import SERVE_CLI, LocalRayCluster, free_ports, http_ok, http_up, run, wait_for

    out_dir = Path(os.environ.get("OUT") or REPO / ".out")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"ok": False, "config": args.config, "model": args.model}
    gpus = args.gpus
    if gpus is None:
        import torch

        gpus = 2 if args.cpu else torch.cuda.device_count()
    if gpus < 1:
        raise SystemExit("no GPUs visible; pass --cpu to check the script with gloo workers")
    report["gpus"] = gpus

    work = Path(tempfile.mkdtemp(prefix="wanserve-deploy-check-"))
    config = yaml.safe_load(Path(args.config).read_text())
    app = config["applications"][0]
    port, = free_ports(1)
    config["http_options"].update(host="127.0.0.1", port=port)
    app_args = app["args"]
    app_args.update(model=args.model, data_dir=str(work / "data"), gpus=0 if args.cpu else gpus)
    if args.cpu:
        app_args["cpu_workers"] = gpus
    for name in ("lora_dir", "auth_token_file", "dtype"):
        app_args.pop(name, None)  # tiny model, no mounted secret on a bench machine
    if args.model == "tiny":
        # The config warms up (and compiles) two 14B sizes at 1280x720; the tiny model checks the
        # deployment, not the speed, so it skips both.
        for name in ("warmup", "generator_options"):
            app_args.pop(name, None)
    engine = next(d for d in app["deployments"] if d["name"] == "EngineReplica")
    engine["placement_group_bundles"] = [{"CPU": 1}] + [{"CPU": 1} if args.cpu else {"GPU": 1}] * gpus
    engine["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=1)
    app_args["engine_replicas"] = 1
    config_path = work / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    report["serve_config"] = config
    url = f"http://127.0.0.1:{port}"

    t0 = time.monotonic()
    cluster = LocalRayCluster(num_cpus=gpus + 3, num_gpus=0 if args.cpu else gpus)
    try:
        wait_for(lambda: http_up(f"{cluster.dashboard_url}/api/version"), 180, "the Ray dashboard",
                 alive=cluster.check_alive)
        report["cluster_start_s"] = time.monotonic() - t0
        run(SERVE_CLI + ["deploy", str(config_path), "--address", cluster.dashboard_url], cluster.env, 180)
        report["deploy_s"] = time.monotonic() - t0
        wait_for(lambda: http_ok(f"{url}/readyz"), 1800, "/readyz", interval_s=2, alive=cluster.check_alive)
        report["ready_s"] = time.monotonic() - t0
        video = work / "out.mp4"
        code = wanserve(["submit", "--url", url, "--prompt", args.prompt, "--seed", "1", "--wait", "--quiet",
                         "-o", str(video)])
        report["job_wall_s"] = time.monotonic() - t0 - report["ready_s"]
        jobs = httpx.get(f"{url}/jobs", timeout=30).json()["jobs"]
        report["job"] = jobs[0] if jobs else None
        report["models"] = httpx.get(f"{url}/models", timeout=30).json()
        if code != 0:
            raise RuntimeError(f"wanserve submit --wait exited {code}: {report['job']}")
        import av

        with av.open(str(video)) as container:
            frames = sum(1 for _ in container.decode(video=0))
        report["video"] = {"bytes": video.stat().st_size, "frames": frames}
        report["ok"] = frames == report["job"]["result"]["num_frames"]
    except Exception as exc:  # noqa: BLE001 - the report says what failed
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        report["serve_status"] = cluster.serve_app("wanserve")
        report["ray_start_log"] = cluster.log_tail(8000)
    finally:
        import subprocess

        subprocess.run(SERVE_CLI + ["shutdown", "-y", "--address", cluster.dashboard_url], env=cluster.env,
                       capture_output=True, timeout=120)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
        report["total_s"] = time.monotonic() - t0
        (out_dir / "deploy_gpu.json").write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps({k: report.get(k) for k in ("ok", "error", "gpus", "cluster_start_s", "deploy_s",
                                                     "ready_s", "job_wall_s", "total_s")}, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
