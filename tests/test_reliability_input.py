"""Bad input: Schemathesis against the service's own /openapi.json (no 5xx, no hang, bounded cases),
413 for oversized bodies and images, 422 for LoRA names leaving the LoRA folder, non-JSON and wrong
content types, and unicode prompts (202 when valid)."""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from reliability_helpers import TINY_JOB, reliability_settings, report
from service_helpers import TOKEN, deploy, wait_status

pytestmark = pytest.mark.slow

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    from ray import serve

    lora_dir = tmp_path_factory.mktemp("loras")
    (lora_dir / "style.safetensors").write_bytes(b"")
    settings = reliability_settings(tmp_path_factory.mktemp("reliability-input"), app_name="wanserve-input",
                                    lora_dir=str(lora_dir), max_body_bytes=MAX_BODY, queue_size=4)
    deploy(settings, serve_url)
    client = httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield settings, client, serve_url
    client.close()
    serve.delete(settings.app_name)


def test_schemathesis_finds_no_server_error_or_hang(app, tmp_path):
    _, _, url = app
    exe = shutil.which("schemathesis") or shutil.which("st")
    cmd = [exe] if exe else [sys.executable, "-m", "schemathesis.cli"]
    cmd += ["run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}", "--max-examples", "15",
            "--checks", "not_a_server_error", "--request-timeout", "10", "--seed", "1", "--workers", "1",
            "--phases", "examples,coverage,fuzzing", "--generation-deterministic"]
    t0 = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                         env={**os.environ, "NO_COLOR": "1"})
    elapsed = time.monotonic() - t0
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    summary = [line for line in run.stdout.splitlines() if "passed" in line or "cases" in line.lower()]
    report("schemathesis", seconds=round(elapsed, 1), summary=summary[-3:])


def test_oversized_body_and_image_get_413(app):
    _, client, _ = app
    assert client.post("/generate", json={"prompt": "x" * (MAX_BODY + 10)}).status_code == 413
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_BODY)).decode()
    assert client.post("/generate", json={"prompt": "cat", "image": image}).status_code == 413
    upload = b"\x89PNG" + b"0" * (MAX_BODY + 1)
    big = client.post("/generate", data={"prompt": "cat"}, files={"image": ("a.png", upload)})
    assert big.status_code == 413
    chunked = client.post("/generate", content=iter([b'{"prompt": "' + b"y" * 8192] * 10 + [b'"}']),
                          headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted while streaming


@pytest.mark.parametrize("name", ["../style", "..", "a/../../etc/passwd", "/etc/passwd", "/tmp/x.safetensors",
                                  "..\\style", "~root", ".hidden", "style\x00.safetensors"])
def test_lora_name_leaving_the_folder_gets_422(app, name):
    _, client, _ = app
    r = client.post("/generate", json={"prompt": "cat", "lora": {"name": name}, **TINY_JOB})
    assert r.status_code == 422, r.text
    assert [e["loc"][-1] for e in r.json()["detail"]] == ["lora"]


def test_non_json_and_wrong_content_types_get_4xx_with_a_message(app):
    _, client, _ = app
    cases = [(b"not json", "application/json"), (b"<prompt>cat</prompt>", "application/xml"),
             (b"hello", "text/plain"), (b"\xff\xfe\x00bad utf-8", "application/json"),
             (b"[1, 2]", "application/json"), (b"", "application/json"), (b'{"prompt": "cat"', "application/json"),
             (b"null", "application/json")]
    for body, ctype in cases:
        r = client.post("/generate", content=body, headers={"Content-Type": ctype})
        assert 400 <= r.status_code < 500, (body, ctype, r.status_code, r.text)
        assert isinstance(r.json()["detail"], (str, list)) and r.json()["detail"], r.text


def test_unicode_prompts(app):
    _, client, _ = app
    prompts = ["一只猫在草地上走", "кошка 🐈‍⬛ идёт", "قطة تمشي", "e\u0301t\u00e9 \u200b zero-width", "tab\tand\nnewline"]
    ids = []
    for prompt in prompts:
        r = client.post("/generate", json={"prompt": prompt, **TINY_JOB})
        assert r.status_code in (202, 429), r.text
        if r.status_code == 202:
            ids.append(r.json()["id"])
            assert client.get(f"/jobs/{ids[-1]}").json()["request"]["prompt"] == prompt
        else:
            time.sleep(1)
    assert ids
    assert client.post("/generate", json={"prompt": "\u2003 \t"}).status_code == 422  # only spaces: empty
    for job_id in ids:
        assert wait_status(client, job_id, ("succeeded", "failed"), timeout_s=60)["status"] == "succeeded"
