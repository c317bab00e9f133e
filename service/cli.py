"""``wanserve``: run the service, generate one video locally, or talk to a running service.

    wanserve serve [--config FILE] [--model DIR|tiny] [--gpus N] [--port 8000]
    wanserve generate ...                      (wan_model.pipeline.cli: one video, no service)
    wanserve submit --prompt "..." [--wait] [-o out.mp4]
    wanserve status JOB | download JOB -o out.mp4 | cancel JOB | delete JOB
    wanserve config [--config FILE] [--gpus N] [--format yaml|json]
    wanserve drain-node [--deadline-s 690]   (a KubeRay preStop hook: hand this node's replicas over)

Imports are lazy: ``--help`` and the client commands load neither Ray nor torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

# The client commands (HTTP to a running service) are in service/client.py.
from service.client import (DEFAULT_URL, CliError, cmd_cancel, cmd_delete, cmd_download, cmd_status,
                            cmd_submit)

TINY_NOTE = ("note: the 'tiny' model has random weights: it makes noise videos. It exists to show the whole "
             "path (HTTP -> queue -> workers -> MP4) working on any machine; pass --model DIR for real videos.")


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
    for secret in ("auth_token", "webhook_secret"):
        if shown.get(secret):
            shown[secret] = "<set, hidden>"  # never print the secret itself
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


def cmd_drain_node(args: argparse.Namespace) -> int:
    from service.node_drain import drain_node

    return drain_node(address=args.address, node_id=args.node_id, deadline_s=args.deadline_s)


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
    p.add_argument("-o", "--output", metavar="FILE", help="wait as --wait does, then download the video here")
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

    p = sub.add_parser("drain-node", help="let this Ray node's replicas finish and move before it stops "
                                          "(a Kubernetes preStop hook)")
    p.add_argument("--address", default="auto", help="the Ray cluster (default: the one this node belongs to)")
    p.add_argument("--node-id", help="the node to drain (default: this one)")
    p.add_argument("--deadline-s", type=int, default=690,
                   help="when the node goes at the latest; more than drain_timeout_s (default 690 = 600 + 90)")
    p.set_defaults(func=cmd_drain_node)

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
