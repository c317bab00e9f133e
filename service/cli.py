"""``wanserve``: run the service, generate one video locally, or talk to a running service.

    wanserve serve [--config FILE] [--model DIR|tiny] [--gpus N] [--port 8000]
    wanserve generate ...                      (wan_model.pipeline.cli: one video, no service)
    wanserve submit --prompt "..." [--wait] [-o out.mp4]
    wanserve status JOB | download JOB -o out.mp4 | cancel JOB | delete JOB
    wanserve config [--config FILE] [--gpus N] [--format yaml|json]

Imports are lazy: ``--help`` and the client commands load neither Ray nor torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "failed", "cancelled")  # the job statuses that do not change any more
TINY_NOTE = ("note: the 'tiny' model has random weights: it makes noise videos. It exists to show the whole "
             "path (HTTP -> queue -> workers -> MP4) working on any machine; pass --model DIR for real videos.")


class CliError(Exception):
    """A problem to show the user as one line, with exit status 1."""


# ==================================================================== settings (serve, config)

def _settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ServiceSettings`` fields given on the command line (None = not given)."""
    names = ("model", "variant", "gpus", "cpu_workers", "host", "port", "data_dir", "ulysses", "ring", "cfg_parallel",
             "queue_size", "lora_dir", "auth_token_file")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _refuse_serve_config(path: Path) -> None:
    """A Ray Serve config is not a settings file: say what to do with it instead of listing 'extra' keys."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not valid YAML: {exc}") from None
    if isinstance(data, dict) and "applications" in data:
        raise CliError(f"{path} is a Ray Serve config (it has 'applications'): deploy it with `serve deploy {path}`, "
                       f"or give `wanserve --config` a YAML file of settings (its applications[0].args)")


def _visible_gpus() -> int:
    import torch  # only `wanserve serve` / `config` with a model folder get here

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_settings(args: argparse.Namespace, *, detect_gpus: bool = True):
    """CLI flags > ``WANSERVE_*`` environment > ``--config`` YAML > defaults.

    With a model folder and no GPU count anywhere, every visible GPU is used.
    """
    from service.config import ServiceSettings

    overrides = _settings_overrides(args)
    try:
        if args.config:
            if not Path(args.config).is_file():
                raise CliError(f"config file {args.config} does not exist")
            _refuse_serve_config(Path(args.config))
            settings = ServiceSettings.from_yaml(args.config, **overrides)
        else:
            settings = ServiceSettings(**overrides)
    except CliError:
        raise
    except Exception as exc:  # pydantic ValidationError / ValueError: name the problem, no traceback
        raise CliError(f"invalid settings: {exc}") from None
    if detect_gpus and settings.model != "tiny" and "gpus" not in settings.model_fields_set:
        found = _visible_gpus()
        if found:
            settings.gpus = found
    return settings


def parallel_layout(settings) -> dict[str, Any]:
    """The (cfg_parallel, ulysses, ring) split of one engine replica's ranks, as its workers will pick it
    (``ServiceSettings.parallel_layout``: the generator's own rule on the config they are handed)."""
    spec = settings.variant_spec
    out: dict[str, Any] = {"world": settings.world_size, "num_heads": spec.transformer.num_heads,
                           "variant": spec.name}
    if settings.world_size == 1:
        return {**out, "ulysses": 1, "ring": 1, "cfg_parallel": 1, "rule": "one rank: no parallelism"}
    rule = "auto" if settings.generator_config().get("parallel", "auto") == "auto" else "explicit degrees"
    degrees = settings.parallel_layout()
    return {**out, "ulysses": degrees.ulysses, "ring": degrees.ring, "cfg_parallel": degrees.cfg_parallel,
            "rule": f"{rule} (wan_model.pipeline.layout.choose_degrees)"}


def attention_info(settings) -> dict[str, Any]:
    """The attention kernel asked for, and whether FlashAttention-3/-4 (what ``auto`` prefers) import here."""
    from wan_model.parallel import fa3, fa4

    fa3_problem, fa4_problem = fa3.import_problem(), fa4.import_problem()
    return {"requested": settings.generator_config().get("attention", "auto"),
            "flash_attn_3_here": "importable" if fa3_problem is None else fa3_problem,
            "flash_attn_4_here": "importable" if fa4_problem is None else fa4_problem,
            "rule": "auto = fa3 on Hopper (sm90) where fa3-fwd is installed, else fa4 on Hopper/Blackwell "
                    "where flash-attn-4 is, else cuDNN (ring) / SDPA; each job's layout line says which ran"}


def cmd_config(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    try:
        layout = parallel_layout(settings)
    except ValueError as exc:
        raise CliError(f"no valid parallel layout: {exc}") from None
    shown = settings.to_args()
    if shown.get("auth_token"):
        shown["auth_token"] = "<set, hidden>"  # never print the secret itself
    if shown.get("client_tokens"):
        names = shown["client_tokens"].values()
        shown["client_tokens"] = {f"<token {i + 1}, hidden>": name for i, name in enumerate(names)}
    data = {"settings": shown, "parallel_layout": layout, "attention": attention_info(settings)}
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False).rstrip())
    if layout["ulysses"] is not None:
        print(f"# layout: world {layout['world']} = cfg_parallel {layout['cfg_parallel']} x ulysses "
              f"{layout['ulysses']} x ring {layout['ring']} ({layout['num_heads']} heads, {layout['rule']})",
              file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    spec = settings.variant_spec
    if settings.use_gpu:
        try:  # fail here, in one line, rather than in every worker at start-up
            layout = parallel_layout(settings)
        except ValueError as exc:
            raise CliError(f"no valid parallel layout: {exc}") from None
        where = (f"{settings.gpus} GPU worker(s) per replica (NCCL), cfg_parallel {layout['cfg_parallel']} x "
                 f"ulysses {layout['ulysses']} x ring {layout['ring']}")
    else:
        where = f"{settings.cpu_workers} CPU worker(s) per replica (gloo)"
    print(f"wanserve: model {settings.model} ({spec.name}) on {where}; http://{settings.host}:{settings.port}; "
          f"data in {settings.data_dir}", file=sys.stderr)
    if spec.tiny:
        print(TINY_NOTE, file=sys.stderr)
    elif not settings.use_gpu:
        print(f"warning: {spec.name} on CPU workers: expect hours per video; pass --gpus N", file=sys.stderr)
    from service.launcher import serve_forever

    serve_forever(settings)
    return 0


def cmd_generate(argv: Sequence[str]) -> int:
    try:
        from wan_model.pipeline.cli import main as generate_main
    except ImportError as exc:
        raise CliError(f"`wanserve generate` needs wan_model.pipeline.cli, which is not available: {exc}") from None
    return int(generate_main(list(argv)) or 0)


# ==================================================================== HTTP client

def _client(args: argparse.Namespace):
    import httpx

    token = args.token or os.environ.get("WANSERVE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout)


def _request(client, method: str, path: str, **kwargs):
    """One request; connection problems and HTTP errors become one readable line."""
    import httpx

    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise CliError(f"cannot reach the service at {client.base_url} ({type(exc).__name__}: {exc}); "
                       f"is `wanserve serve` running there? (--url / WANSERVE_URL)") from None
    if response.status_code >= 400:
        raise CliError(f"{method} {path}: HTTP {response.status_code}: {_detail(response)}")
    return response


def _detail(response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(detail, list):  # FastAPI 422: one entry per field
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
    return str(detail)


def iter_sse(lines):
    """``(event, data)`` pairs from server-sent-event lines; comments (keep-alives) are skipped."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


def follow_job(client, job_id: str, *, quiet: bool = False, max_reconnects: int = 20) -> dict:
    """Follow ``/jobs/{id}/events`` with a progress bar until the job ends; returns the last job view."""
    import httpx
    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", desc=job_id, disable=quiet, file=sys.stderr, leave=True)
    last: Optional[dict] = None
    try:
        for _ in range(max_reconnects + 1):
            try:
                with client.stream("GET", f"/jobs/{job_id}/events", timeout=httpx.Timeout(30.0, read=60.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise CliError(f"GET /jobs/{job_id}/events: HTTP {r.status_code}: {_detail(r)}")
                    for event, data in iter_sse(r.iter_lines()):
                        if event == "error":
                            raise CliError(f"job {job_id}: {data}")
                        view = json.loads(data)
                        last = view
                        _update_bar(bar, view)
                        if event == "end":
                            return view
            except (httpx.TransportError, httpx.StreamError):
                pass  # the stream was cut (proxy timeout, restart): reconnect; the server resends the state
            # The stream ended without an "end" event: look at the job before reconnecting.
            view = _request(client, "GET", f"/jobs/{job_id}").json()
            last = view
            if view["status"] in FINISHED:
                return view
        raise CliError(f"lost the event stream of job {job_id} {max_reconnects} times; last status: "
                       f"{(last or {}).get('status')}")
    finally:
        bar.close()


def _update_bar(bar, view: dict) -> None:
    progress = view.get("progress") or {}
    total, step = progress.get("total_steps") or 0, progress.get("step") or 0
    if total and bar.total != total:
        bar.reset(total=total)
    if total:
        bar.n = min(step, total)
    stage = progress.get("stage") or ""
    where = f"queue #{view['queue_position']}" if view.get("queue_position") else stage
    bar.set_postfix_str(f"{view['status']} {where}".strip(), refresh=False)
    bar.refresh()


def _submit_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": args.prompt}
    for name in ("negative_prompt", "model", "width", "height", "num_frames", "steps", "shift", "sampler", "seed",
                 "priority", "webhook_url"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.guidance is not None:
        body["guidance"] = args.guidance[0] if len(args.guidance) == 1 else list(args.guidance)
    if args.lora:
        body["lora"] = {"name": args.lora, "scale": args.lora_scale}
    if args.metadata:
        pairs = [item.partition("=") for item in args.metadata]
        bad = [key for key, sep, _ in pairs if not sep]
        if bad:
            raise CliError(f"--metadata {bad[0]!r}: expected KEY=VALUE")
        body["metadata"] = {key: value for key, _, value in pairs}
    if args.image:
        import base64

        path = Path(args.image)
        if not path.is_file():
            raise CliError(f"--image {args.image}: no such file")
        body["image"] = base64.b64encode(path.read_bytes()).decode()
    return body


def cmd_submit(args: argparse.Namespace) -> int:
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    with _client(args) as client:
        answer = _request(client, "POST", "/generate", json=_submit_body(args), headers=headers).json()
        job_id = answer["id"]
        print(job_id, flush=True)
        if not args.wait:
            return 0
        view = follow_job(client, job_id, quiet=args.quiet)
        _print_outcome(view)
        if view["status"] != "succeeded":
            return 1
        if args.output:
            _download(client, job_id, Path(args.output), preview=False)
    return 0


def _print_outcome(view: dict) -> None:
    if view["status"] == "succeeded":
        result = view.get("result") or {}
        total = (view.get("timings") or {}).get("total")
        took = f" in {total:.1f} s" if isinstance(total, (int, float)) else ""
        print(f"job {view['id']} succeeded{took}: {result.get('width')}x{result.get('height')}, "
              f"{result.get('num_frames')} frames; video at {result.get('video_url')}", file=sys.stderr)
    else:
        print(f"job {view['id']} {view['status']}: {view.get('error') or ''}".rstrip(": "), file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        view = _request(client, "GET", f"/jobs/{args.job}").json()
    print(json.dumps(view, indent=2))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        view = _request(client, "GET", f"/jobs/{args.job}").json()
        if view["status"] in FINISHED:  # DELETE of a finished job deletes its files: not what "cancel" means
            print(f"job {view['id']}: already {view['status']}, nothing to cancel")
            return 0
        view = _request(client, "DELETE", f"/jobs/{args.job}").json()
    print(f"job {view['id']}: {view['status']}" + (" (cancel requested)" if view.get("cancel_requested") else ""))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        view = _request(client, "GET", f"/jobs/{args.job}").json()
        if view["status"] not in FINISHED:
            raise CliError(f"job {view['id']} is {view['status']}: cancel it first (wanserve cancel {view['id']})")
        view = _request(client, "DELETE", f"/jobs/{args.job}").json()
    print(f"job {view['id']}: {view['status']}, its video and preview deleted from the server")
    return 0


def _download(client, job_id: str, output: Path, *, preview: bool) -> None:
    import httpx

    path = f"/jobs/{job_id}/preview.png" if preview else f"/jobs/{job_id}/video"
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".part")
    try:
        with client.stream("GET", path) as response:
            if response.status_code >= 400:
                response.read()
                raise CliError(f"GET {path}: HTTP {response.status_code}: {_detail(response)}")
            with partial.open("wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
    except httpx.TransportError as exc:
        partial.unlink(missing_ok=True)
        raise CliError(f"download of {path} from {client.base_url} failed: {exc}") from None
    partial.replace(output)  # never leave a truncated file under the real name
    print(f"wrote {output} ({output.stat().st_size} bytes)", file=sys.stderr)


def cmd_download(args: argparse.Namespace) -> int:
    output = Path(args.output or (f"{args.job}.png" if args.preview else f"{args.job}.mp4"))
    with _client(args) as client:
        _download(client, args.job, output, preview=args.preview)
    return 0


# ==================================================================== argument parsing

def _degree(value: str):
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return number


def _settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file of ServiceSettings fields (see the README's configuration reference)")
    p.add_argument("--model", metavar="DIR|tiny", help="model folder, or 'tiny' (random weights: noise videos)")
    p.add_argument("--variant", help="model variant when the folder does not say, e.g. wan2.1-t2v-14b")
    p.add_argument("--gpus", type=int, metavar="N", help="GPU workers per engine replica (default: all visible "
                                                          "GPUs with a model folder, else 0 = CPU workers)")
    p.add_argument("--cpu-workers", type=int, metavar="N", help="gloo CPU workers per replica when --gpus is 0")
    p.add_argument("--ulysses", type=_degree, metavar="N|auto")
    p.add_argument("--ring", type=_degree, metavar="N|auto")
    p.add_argument("--cfg-parallel", type=_degree, metavar="1|2|auto")
    p.add_argument("--data-dir", metavar="DIR", help="job database and result videos")
    p.add_argument("--lora-dir", metavar="DIR", help="folder of LoRA files that requests may name")
    p.add_argument("--queue-size", type=int, metavar="N", help="queued + running jobs; more get HTTP 429")
    p.add_argument("--auth-token-file", metavar="FILE", help="require this bearer token on the API")


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("WANSERVE_URL", DEFAULT_URL),
                   help=f"service URL (env WANSERVE_URL; default {DEFAULT_URL})")
    p.add_argument("--token", help="bearer token (default: env WANSERVE_TOKEN)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanserve", description="Wan2.1/Wan2.2 video generation as a service.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="start (or join) Ray and serve the HTTP API until Ctrl-C")
    _settings_flags(p)
    p.add_argument("--host", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.set_defaults(func=cmd_serve)

    sub.add_parser("generate", help="generate one video in this process, no service (see `wanserve generate "
                                    "--help`)", add_help=False)

    p = sub.add_parser("submit", help="submit a job to a running service; prints the job id")
    _client_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--model", help="the served model's name (optional)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, nargs="+", metavar="G", help="one scale, or low-noise high-noise (A14B)")
    p.add_argument("--shift", type=float)
    p.add_argument("--sampler", choices=["unipc", "euler"])
    p.add_argument("--seed", type=int)
    p.add_argument("--image", metavar="FILE", help="PNG/JPEG first frame (image-to-video)")
    p.add_argument("--lora", metavar="NAME", help="a LoRA in the server's LoRA folder")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--priority", type=int)
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE",
                   help="a label kept with the job and shown in its view and webhook (repeatable)")
    p.add_argument("--webhook", dest="webhook_url", metavar="URL",
                   help="the server POSTs the job's outcome here when it ends (a host in its webhook_allowed_hosts)")
    p.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends (exit 1 unless it "
                                                       "succeeded)")
    p.add_argument("-o", "--output", metavar="FILE", help="with --wait: download the video here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="print a job as JSON")
    _client_flags(p)
    p.add_argument("job")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("download", help="download a finished job's video (or preview)")
    _client_flags(p)
    p.add_argument("job")
    p.add_argument("-o", "--output", metavar="FILE", help="default: JOB.mp4 (JOB.png with --preview)")
    p.add_argument("--preview", action="store_true", help="the PNG preview instead of the video")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    _client_flags(p)
    p.add_argument("job")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("delete", help="delete a finished job's video and preview from the server")
    _client_flags(p)
    p.add_argument("job")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("config", help="print the resolved settings and the parallel layout")
    _settings_flags(p)
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "generate":  # everything after it belongs to the generator's own parser
            return cmd_generate(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CliError as exc:
        print(f"wanserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
