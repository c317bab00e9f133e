"""The ``wanserve`` client commands: submit, status, download, cancel, delete, over HTTP to a
running service (httpx only: no Ray, no torch)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "failed", "cancelled")  # the job statuses that do not change any more


class CliError(Exception):
    """A problem to show the user as one line, with exit status 1."""


def _client(args: argparse.Namespace):
    import httpx

    token = args.token or os.environ.get("WANSERVE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout)


def _request(client, method: str, path: str, *, allow: tuple[int, ...] = (), **kwargs):
    """One request; connection problems and HTTP errors (but the ``allow``ed ones) become one
    readable line."""
    import httpx

    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise CliError(f"cannot reach the service at {client.base_url} ({type(exc).__name__}: {exc}); "
                       f"is `wanserve serve` running there? (--url / WANSERVE_URL)") from None
    if response.status_code >= 400 and response.status_code not in allow:
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


def follow_job(client, job_id: str, *, quiet: bool = False, max_reconnects: int = 40, retry_s: float = 3.0) -> dict:
    """Follow ``/jobs/{id}/events`` with a progress bar until the job ends; returns the last job view.
    A cut stream or a service that is restarting is waited out, ``retry_s`` between tries, up to
    ``max_reconnects`` times."""
    import httpx
    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", desc=job_id, disable=quiet, file=sys.stderr, leave=True)
    last: Optional[dict] = None
    try:
        for _ in range(max_reconnects + 1):
            try:
                with client.stream("GET", f"/jobs/{job_id}/events", timeout=httpx.Timeout(30.0, read=60.0)) as r:
                    if r.status_code == 429:  # the replica has as many streams open as it keeps: poll instead
                        r.read()
                        return _poll_job(client, job_id, bar, retry_s)
                    if r.status_code >= 400:  # 5xx: restarting, and waited out below
                        r.read()
                        if r.status_code < 500:
                            raise CliError(f"GET /jobs/{job_id}/events: HTTP {r.status_code}: {_detail(r)}")
                    else:
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
            # The stream ended without an "end" event: look at the job before reconnecting. While the
            # service restarts it may not answer, or answer 5xx: wait and try again.
            view = _job_while_restarting(client, job_id, retry_s)
            last = view or last
            if view is not None and view["status"] in FINISHED:
                return view
        raise CliError(f"lost the event stream of job {job_id} {max_reconnects} times; last status: "
                       f"{(last or {}).get('status')}")
    finally:
        bar.close()


def _poll_job(client, job_id: str, bar, retry_s: float) -> dict:
    """Follow a job by ``GET /jobs/{id}`` every ``retry_s`` until it ends (when no event stream is to be had)."""
    while True:
        view = _job_while_restarting(client, job_id, retry_s)
        if view is not None:
            _update_bar(bar, view)
            if view["status"] in FINISHED:
                return view
            time.sleep(retry_s)


def _job_while_restarting(client, job_id: str, retry_s: float) -> Optional[dict]:
    """The job's view, or None (after waiting ``retry_s``) while the service cannot answer."""
    import httpx

    try:
        response = client.get(f"/jobs/{job_id}")
    except httpx.TransportError:
        response = None
    if response is not None and response.status_code < 400:
        return response.json()
    if response is not None and response.status_code < 500:  # 401, 404: waiting will not help
        raise CliError(f"GET /jobs/{job_id}: HTTP {response.status_code}: {_detail(response)}")
    time.sleep(retry_s)
    return None


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
        if not args.wait and not args.output:  # -o asks for the video: it implies --wait
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
        for notice in result.get("warnings") or []:
            print(f"warning: {notice}", file=sys.stderr)
    else:
        print(f"job {view['id']} {view['status']}: {view.get('error') or ''}".rstrip(": "), file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        view = _request(client, "GET", f"/jobs/{args.job}").json()
    print(json.dumps(view, indent=2))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        # Not DELETE: that deletes the files of a job that finishes just before it arrives.
        response = _request(client, "POST", f"/jobs/{args.job}/cancel", allow=(409,))
        if response.status_code == 409:  # already succeeded or failed: the server says which
            print(_detail(response))
            return 0
        view = response.json()
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
