"""``wanserve`` CLI: help without heavy imports, settings resolution and the parallel layout
(``config``), ``serve`` / ``generate`` delegation, and the HTTP client against a stub service."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service import cli, client

REPO_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("WANSERVE_"):
            monkeypatch.delenv(name)


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ==================================================================== help, lazy imports

def test_help_lists_commands_without_importing_ray_or_torch():
    code = (
        "import sys\n"
        "from service.cli import main\n"
        "for argv in (['--help'], ['submit', '--help'], ['status', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('HEAVY', sorted(m for m in ('ray', 'torch') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("serve", "generate", "submit", "status", "download", "config"):
        assert command in proc.stdout
    assert "HEAVY []" in proc.stdout


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ==================================================================== config: settings + layout

def config_json(argv, capsys) -> dict:
    code, out, err = run_main(["config", "--format", "json", *argv], capsys)
    assert code == 0, err
    return json.loads(out)


def test_config_hides_the_secrets(capsys, monkeypatch):
    monkeypatch.setenv("WANSERVE_WEBHOOK_SECRET", "whsec_c2VjcmV0c2VjcmV0")
    monkeypatch.setenv("WANSERVE_AUTH_TOKEN", "operator-token-123")
    code, out, err = run_main(["config", "--format", "json"], capsys)
    assert code == 0, err
    assert "c2VjcmV0" not in out and "operator-token-123" not in out
    settings = json.loads(out)["settings"]
    assert settings["webhook_secret"] == settings["auth_token"] == "<set, hidden>"


def test_config_8_gpus_12_heads_without_cfg_parallel_is_ulysses4_ring2(capsys):
    data = config_json(["--gpus", "8", "--model", "/models/Wan2.1-T2V-1.3B", "--cfg-parallel", "1"], capsys)
    layout = data["parallel_layout"]
    assert layout["variant"] == "wan2.1-t2v-1.3b" and layout["num_heads"] == 12 and layout["world"] == 8
    assert (layout["ulysses"], layout["ring"], layout["cfg_parallel"]) == (4, 2, 1)
    assert data["settings"]["gpus"] == 8


def test_config_explicit_degrees(capsys):
    layout = config_json(["--gpus", "8", "--model", "/models/Wan2.1-T2V-1.3B", "--ulysses", "4", "--ring", "2",
                          "--cfg-parallel", "1"], capsys)["parallel_layout"]
    assert (layout["ulysses"], layout["ring"], layout["cfg_parallel"]) == (4, 2, 1)
    layout = config_json(["--gpus", "8", "--model", "/models/Wan2.1-T2V-1.3B", "--ulysses", "2",
                          "--cfg-parallel", "2"], capsys)["parallel_layout"]
    assert (layout["ulysses"], layout["ring"], layout["cfg_parallel"]) == (2, 2, 2)  # ring takes the rest


def test_config_auto_layout_uses_the_generators_rule(capsys):
    layout = config_json(["--gpus", "8", "--model", "/models/Wan2.1-T2V-1.3B"], capsys)["parallel_layout"]
    # Auto: CFG-parallel on an even world, then the largest Ulysses degree dividing the 12 heads.
    assert (layout["cfg_parallel"], layout["ulysses"], layout["ring"]) == (2, 4, 1)
    layout = config_json(["--gpus", "6", "--model", "/models/Wan2.1-T2V-14B"], capsys)["parallel_layout"]
    assert layout["num_heads"] == 40
    assert (layout["cfg_parallel"], layout["ulysses"], layout["ring"]) == (2, 1, 3)  # 3 does not divide 40


def test_config_auto_layout_with_fsdp_splits_the_sequence_over_every_rank(capsys, monkeypatch):
    """fsdp is the memory-saving mode: auto runs the CFG branches one after the other rather than
    doubling each GPU's tokens; an explicit cfg_parallel still wins."""
    monkeypatch.setenv("WANSERVE_FSDP", "true")
    layout = config_json(["--gpus", "4", "--model", "/models/Wan2.1-T2V-14B"], capsys)["parallel_layout"]
    assert (layout["cfg_parallel"], layout["ulysses"], layout["ring"]) == (1, 4, 1)
    layout = config_json(["--gpus", "8", "--model", "/models/Wan2.1-T2V-1.3B"], capsys)["parallel_layout"]
    assert (layout["cfg_parallel"], layout["ulysses"], layout["ring"]) == (1, 4, 2)  # 8 does not divide 12 heads
    layout = config_json(["--gpus", "4", "--model", "/models/Wan2.1-T2V-14B", "--cfg-parallel", "2"],
                         capsys)["parallel_layout"]
    assert (layout["cfg_parallel"], layout["ulysses"], layout["ring"]) == (2, 2, 1)


def test_config_default_is_tiny_on_two_cpu_workers(capsys):
    data = config_json([], capsys)
    assert data["settings"]["model"] == "tiny" and data["settings"]["gpus"] == 0
    assert data["parallel_layout"]["world"] == 2 and data["parallel_layout"]["variant"] == "tiny-t2v"
    # Which attention kernels "auto" can pick here: FlashAttention-3/-4 importable, or how to install them.
    from wan_model.parallel import fa3, fa4

    assert data["attention"]["requested"] == "auto"
    for key, module, extra in (("flash_attn_3_here", fa3, "wanserve[fa3]"), ("flash_attn_4_here", fa4, "wanserve[fa4]")):
        here = data["attention"][key]
        assert here == "importable" if module.import_problem() is None else extra in here


def test_config_impossible_layout_is_a_clear_error(capsys):
    code, _, err = run_main(["config", "--gpus", "8", "--model", "/models/Wan2.1-T2V-1.3B", "--ulysses", "8"],
                            capsys)
    assert code == 1
    assert "12 attention heads" in err and "Traceback" not in err


def test_config_bad_settings_name_the_field(capsys):
    code, _, err = run_main(["config", "--model", "tiny", "--variant", "wan2.1-t2v-14b"], capsys)
    assert code == 1 and "tiny variant" in err
    code, _, err = run_main(["config", "--config", "/nonexistent/wanserve.yaml"], capsys)
    assert code == 1 and "does not exist" in err
    code, _, err = run_main(["config", "--config", str(REPO_DIR / "deploy" / "serve_config.yaml")], capsys)
    assert code == 1 and "serve deploy" in err and "applications[0].args" in err


def test_config_file_env_and_flags_precedence(tmp_path, monkeypatch, capsys):
    path = tmp_path / "wanserve.yaml"
    path.write_text("model: /models/Wan2.1-T2V-14B\ngpus: 4\nqueue_size: 10\nport: 9000\nauth_token: s3cret\n")
    monkeypatch.setenv("WANSERVE_QUEUE_SIZE", "20")
    data = config_json(["--config", str(path), "--gpus", "2"], capsys)
    settings = data["settings"]
    assert settings["gpus"] == 2  # flag > file
    assert settings["queue_size"] == 20  # env > file
    assert settings["port"] == 9000 and settings["model"] == "/models/Wan2.1-T2V-14B"
    assert settings["auth_token"] != "s3cret"  # never printed
    assert data["parallel_layout"]["world"] == 2


def test_config_yaml_output_parses(capsys):
    import yaml

    code, out, err = run_main(["config", "--gpus", "4", "--model", "/models/Wan2.1-T2V-14B"], capsys)
    assert code == 0
    data = yaml.safe_load(out)
    assert data["parallel_layout"]["world"] == 4
    assert "cfg_parallel 2 x ulysses 2 x ring 1" in err


# ==================================================================== serve / generate delegation

@pytest.fixture()
def fake_launcher(monkeypatch):
    calls = []
    module = types.ModuleType("service.launcher")
    module.serve_forever = lambda settings: calls.append(settings)
    monkeypatch.setitem(sys.modules, "service.launcher", module)
    return calls


def test_serve_default_is_the_tiny_cpu_demo_and_says_so(fake_launcher, capsys):
    code, _, err = run_main(["serve", "--port", "8123", "--data-dir", "/tmp/x"], capsys)
    assert code == 0
    (settings,) = fake_launcher
    assert settings.model == "tiny" and settings.gpus == 0 and settings.cpu_workers == 2
    assert settings.port == 8123 and settings.data_dir == "/tmp/x"
    assert "noise videos" in err


def test_serve_model_dir_uses_all_visible_gpus(fake_launcher, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_visible_gpus", lambda: 8)
    assert run_main(["serve", "--model", "/models/Wan2.1-T2V-1.3B"], capsys)[0] == 0
    assert fake_launcher[-1].gpus == 8
    assert run_main(["serve", "--model", "/models/Wan2.1-T2V-1.3B", "--gpus", "2"], capsys)[0] == 0
    assert fake_launcher[-1].gpus == 2  # an explicit count wins
    code, _, err = run_main(["serve"], capsys)
    assert fake_launcher[-1].gpus == 0  # the tiny default stays on CPU even with GPUs around
    monkeypatch.setenv("WANSERVE_GPUS", "1")
    assert run_main(["serve", "--model", "/models/Wan2.1-T2V-1.3B"], capsys)[0] == 0
    assert fake_launcher[-1].gpus == 1  # a count from the environment is a choice too


def test_generate_delegates_the_rest_of_argv(monkeypatch):
    seen = []
    module = types.ModuleType("wan_model.pipeline.cli")
    module.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "wan_model.pipeline.cli", module)
    assert cli.main(["generate", "--prompt", "a cat", "--steps", "2", "--help"]) == 0
    assert seen == [["--prompt", "a cat", "--steps", "2", "--help"]]


# ==================================================================== client against a stub service

class StubService:
    """Just enough of the HTTP API: one job whose progress the test scripts."""

    TOKEN = "t0ken"
    VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40

    def __init__(self):
        self.requests: list[dict] = []
        self.final_status = "succeeded"
        self.cut_first_stream = False
        self.streams = 0
        self.deletes = 0
        self.cancels = 0
        self.unavailable = 0  # GETs answered 503 (a restart) before the service is back
        self.streams_full = False  # the events route answers 429 (max_event_streams reached)
        self.polls = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, body, ctype="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {stub.TOKEN}":
                    self._send(401, {"detail": "missing or wrong bearer token"})
                    return False
                return True

            def do_POST(self):
                if not self._authorized():
                    return
                if self.path == "/jobs/job-1/cancel":
                    stub.cancels += 1
                    if stub.final_status in ("succeeded", "failed"):
                        self._send(409, {"detail": f"job job-1 has already {stub.final_status}: nothing to cancel"})
                    else:
                        self._send(200, stub.view("running", 1, cancel=True))
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"body": body, "headers": dict(self.headers)})
                if body.get("width") == 13:
                    self._send(422, {"detail": [{"loc": ["body", "width"], "msg": "must be a multiple of 16"}]})
                    return
                self._send(202, {"id": "job-1", "status": "queued"})

            def do_DELETE(self):
                if self._authorized():
                    stub.deletes += 1
                    finished = stub.final_status in ("succeeded", "failed", "cancelled")
                    # A finished job's files are deleted; an unfinished one is cancelled.
                    self._send(200, stub.view(stub.final_status, 4) if finished else
                               stub.view("cancelled", 0, cancel=True))

            def do_GET(self):
                if not self._authorized():
                    return
                if stub.unavailable > 0:  # restarting: the proxy has no replica to send to
                    stub.unavailable -= 1
                    self._send(503, {"detail": "service unavailable"})
                    return
                if self.path == "/jobs/job-1" and stub.streams_full:
                    stub.polls += 1
                    self._send(200, stub.view("running", stub.polls) if stub.polls < 3 else stub.view("succeeded", 4))
                elif self.path == "/jobs/job-1/events" and stub.streams_full:
                    stub.streams += 1
                    self._send(429, {"detail": "this replica already has 200 event streams open"})
                elif self.path == "/jobs/job-1":
                    still_running = stub.cut_first_stream and stub.streams == 1
                    self._send(200, stub.view("running", 1) if still_running else stub.view(stub.final_status, 4))
                elif self.path == "/jobs/job-1/events":
                    stub.streams += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    events = [("progress", stub.view("queued", 0)), None, ("progress", stub.view("running", 1)),
                              ("progress", stub.view("running", 3)), ("end", stub.view(stub.final_status, 4))]
                    if stub.cut_first_stream and stub.streams == 1:
                        events = events[:3]  # the stream drops before the end: the client must reconnect
                    for event in events:
                        chunk = ": keep-alive\n\n" if event is None else \
                            f"event: {event[0]}\ndata: {json.dumps(event[1])}\n\n"
                        self.wfile.write(chunk.encode())
                        self.wfile.flush()
                elif self.path == "/jobs/job-1/video":
                    if stub.final_status != "succeeded":
                        self._send(404, {"detail": "job job-1 is failed: no video"})
                    else:
                        self._send(200, stub.VIDEO, "video/mp4")
                else:
                    self._send(404, {"detail": f"job {self.path.split('/')[2]} not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def view(self, status: str, step: int, cancel: bool = False) -> dict:
        view = {"id": "job-1", "status": status, "queue_position": 1 if status == "queued" else None,
                "progress": {"stage": "denoise" if step else None, "step": step, "total_steps": 4},
                "error": "out of memory" if status == "failed" else None, "cancel_requested": cancel}
        if status == "succeeded":
            view["result"] = {"video_url": "/jobs/job-1/video", "width": 64, "height": 64, "num_frames": 5}
            view["timings"] = {"total": 1.5}
        return view

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stub():
    service = StubService()
    yield service
    service.close()


def test_submit_prints_the_job_id_and_sends_fields(stub, monkeypatch, capsys):
    monkeypatch.setenv("WANSERVE_TOKEN", stub.TOKEN)
    code, out, _ = run_main(["submit", "--url", stub.url, "--prompt", "a fox", "--width", "832", "--height", "480",
                             "--guidance", "3", "4", "--seed", "5", "--lora", "style", "--idempotency-key", "k1",
                             "--webhook", "https://hooks.example.com/done", "--metadata", "order=A-17",
                             "--metadata", "note=x=y"],
                            capsys)
    assert code == 0 and out.strip() == "job-1"
    (sent,) = stub.requests
    assert sent["body"] == {"prompt": "a fox", "width": 832, "height": 480, "seed": 5, "guidance": [3.0, 4.0],
                            "lora": {"name": "style", "scale": 1.0}, "webhook_url": "https://hooks.example.com/done",
                            "metadata": {"order": "A-17", "note": "x=y"}}
    assert sent["headers"]["Idempotency-Key"] == "k1"


def test_submit_wait_follows_events_and_downloads(stub, tmp_path, capsys):
    stub.cut_first_stream = True
    out_file = tmp_path / "sub" / "out.mp4"
    code, out, err = run_main(["submit", "--url", stub.url, "--token", stub.TOKEN, "--prompt", "a fox", "--wait",
                               "-o", str(out_file)], capsys)
    assert code == 0, err
    assert out.strip() == "job-1"
    assert stub.streams == 2  # reconnected after the cut stream
    assert "succeeded" in err and "4/4" in err  # the progress bar reached the last step
    assert out_file.read_bytes() == stub.VIDEO
    assert not list(tmp_path.glob("sub/*.part"))


def test_submit_with_an_output_file_waits_for_the_video(stub, tmp_path, capsys):
    out_file = tmp_path / "fox.mp4"  # no --wait: -o asks for the video, so it waits for it
    code, out, err = run_main(["submit", "--url", stub.url, "--token", stub.TOKEN, "--prompt", "a fox",
                               "-o", str(out_file)], capsys)
    assert code == 0, err
    assert out.strip() == "job-1" and out_file.read_bytes() == stub.VIDEO


def test_submit_wait_outlasts_a_service_restart(stub, tmp_path, monkeypatch, capsys):
    """The stream is cut, and then the service answers 503 for a while (restarting): --wait keeps
    waiting, and gets the video once the service is back."""
    from service import client as client_module

    monkeypatch.setattr(client_module, "follow_job", functools.partial(client_module.follow_job, retry_s=0.05))
    stub.cut_first_stream = True
    stub.unavailable = 0
    original = stub.view

    def view_then_restart(status, step, cancel=False):  # the cut stream's last event starts the restart
        if status == "running" and step == 1 and stub.streams == 1 and not stub.restarted:
            stub.restarted, stub.unavailable = True, 5
        return original(status, step, cancel)

    stub.restarted = False
    stub.view = view_then_restart
    out_file = tmp_path / "out.mp4"
    code, out, err = run_main(["submit", "--url", stub.url, "--token", stub.TOKEN, "--prompt", "a fox", "--wait",
                               "-q", "-o", str(out_file)], capsys)
    assert code == 0, err
    assert stub.restarted and stub.unavailable == 0 and out_file.read_bytes() == stub.VIDEO


def test_submit_wait_polls_when_the_service_has_no_stream_to_spare(stub, tmp_path, monkeypatch, capsys):
    from service import client as client_module

    monkeypatch.setattr(client_module, "follow_job", functools.partial(client_module.follow_job, retry_s=0.05))
    stub.streams_full = True
    out_file = tmp_path / "out.mp4"
    code, out, err = run_main(["submit", "--url", stub.url, "--token", stub.TOKEN, "--prompt", "a fox", "--wait",
                               "-q", "-o", str(out_file)], capsys)
    assert code == 0, err
    assert stub.streams == 1 and stub.polls == 3 and out_file.read_bytes() == stub.VIDEO


def test_submit_wait_on_a_failed_job_exits_1(stub, tmp_path, capsys):
    stub.final_status = "failed"
    code, _, err = run_main(["submit", "--url", stub.url, "--token", stub.TOKEN, "--prompt", "x", "--wait", "-q",
                             "-o", str(tmp_path / "o.mp4")], capsys)
    assert code == 1 and "failed" in err and "out of memory" in err
    assert not (tmp_path / "o.mp4").exists()


def test_status_and_download_and_cancel(stub, tmp_path, capsys):
    common = ["--url", stub.url, "--token", stub.TOKEN]
    code, out, _ = run_main(["status", *common, "job-1"], capsys)
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    target = tmp_path / "v.mp4"
    assert run_main(["download", *common, "job-1", "-o", str(target)], capsys)[0] == 0
    assert target.read_bytes() == stub.VIDEO
    code, out, _ = run_main(["cancel", *common, "job-1"], capsys)
    assert code == 0 and "already succeeded: nothing to cancel" in out
    assert stub.deletes == 0 and stub.cancels == 1  # never a DELETE: it would delete the video
    code, out, _ = run_main(["delete", *common, "job-1"], capsys)
    assert code == 0 and "video and preview deleted" in out and stub.deletes == 1
    stub.final_status = "running"
    code, out, _ = run_main(["cancel", *common, "job-1"], capsys)
    assert code == 0 and "running (cancel requested)" in out and stub.deletes == 1 and stub.cancels == 2
    code, _, err = run_main(["delete", *common, "job-1"], capsys)
    assert code == 1 and "is running: cancel it first" in err and stub.deletes == 1


def test_client_errors_are_one_readable_line(stub, tmp_path, capsys):
    code, _, err = run_main(["status", "--url", stub.url, "job-1"], capsys)  # no token
    assert code == 1 and "HTTP 401" in err and "bearer token" in err
    code, _, err = run_main(["status", "--url", stub.url, "--token", stub.TOKEN, "nope"], capsys)
    assert code == 1 and "HTTP 404" in err and "not found" in err
    code, _, err = run_main(["submit", "--url", stub.url, "--token", stub.TOKEN, "--prompt", "x", "--width", "13"],
                            capsys)
    assert code == 1 and "width: must be a multiple of 16" in err
    stub.final_status = "failed"
    code, _, err = run_main(["download", "--url", stub.url, "--token", stub.TOKEN, "job-1", "-o",
                             str(tmp_path / "x.mp4")], capsys)
    assert code == 1 and "no video" in err and not (tmp_path / "x.mp4").exists()
    url = stub.url
    stub.close()
    code, _, err = run_main(["status", "--url", url, "job-1", "--timeout", "5"], capsys)
    assert code == 1 and "cannot reach the service" in err and "Traceback" not in err
    stub.server = types.SimpleNamespace(shutdown=lambda: None, server_close=lambda: None)  # closed already


def test_sse_parser():
    lines = ["event: progress", "data: {\"a\": 1}", "", ": keep-alive", "", "data: x", "data: y", "",
             "event: end", "data: {}"]
    assert list(client.iter_sse(lines)) == [("progress", "{\"a\": 1}"), ("message", "x\ny"), ("end", "{}")]
