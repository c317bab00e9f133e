"""The service over HTTP with real Ray Serve and the real tiny model on 2 gloo CPU workers:
submit, poll, SSE, MP4 download (with Range), per-field 422s, 413, auth, idempotency, the
OpenAI-style routes, multipart upload, missing files. Fault injection is in test_service_faults.py."""
from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib

import httpx
import pytest

from service_helpers import TOKEN, deploy, make_settings, wait_for, wait_status

pytestmark = pytest.mark.slow

REAL_FACTORY = "wan_model.pipeline.generator:build_generator"


@pytest.fixture(scope="module")
def service(serve_url, tmp_path_factory):
    from ray import serve

    data_dir = tmp_path_factory.mktemp("wanserve-data")
    lora_dir = tmp_path_factory.mktemp("loras")
    (lora_dir / "style.safetensors").write_bytes(b"")
    settings = make_settings(data_dir, generator_factory=REAL_FACTORY, generator_options={},
                             lora_dir=str(lora_dir), max_tokens=2048)
    deploy(settings, serve_url)
    client = httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    client.data_dir = data_dir  # the tests look at result files directly
    yield client
    client.close()
    serve.delete(settings.app_name)


@pytest.fixture(scope="module")
def finished_job(service):
    r = service.post("/generate", json={"prompt": "a cat walks on the grass", "steps": 3, "seed": 7})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status_url"] == f"/jobs/{body['id']}" and body["queue_position"] == 0
    return wait_status(service, body["id"], ("succeeded", "failed", "cancelled"), timeout_s=60)


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\x80\x40\x20" * 16 for _ in range(16))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_submit_poll_and_download_playable_mp4(service, finished_job):
    import av

    job = finished_job
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["error"] is None and job["elapsed_s"] > 0
    assert job["progress"]["total_steps"] == 3 and job["progress"]["step"] == 3
    assert len(job["timings"]["step_s"]) == 3 and job["timings"]["total"] > 0
    assert job["result"]["layout"].startswith("world=2")
    assert job["result"]["encoder"] in ("imageio-ffmpeg", "pyav")
    assert job["result"]["warnings"] == []

    video = service.get(job["result"]["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert len(video.content) == job["result"]["size_bytes"]
    with av.open(io.BytesIO(video.content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)

    part = service.get(job["result"]["video_url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{len(video.content)}"
    assert part.content == video.content[100:200]

    preview = service.get(job["result"]["preview_url"])
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")


def test_a_prompt_cut_by_the_text_encoder_is_reported_in_the_result(service):
    prompt = "a red fox runs through deep snow under a pale sky " * 60  # 3,000 characters, > 512 tokens
    r = service.post("/generate", json={"prompt": prompt, "steps": 1, "guidance": 1.0, "seed": 1})
    assert r.status_code == 202, r.text
    job = wait_status(service, r.json()["id"], ("succeeded", "failed", "cancelled"), timeout_s=60)
    assert job["status"] == "succeeded", job
    (warning,) = job["result"]["warnings"]
    tokens = re.fullmatch(r"prompt is (\d+) tokens; the text encoder reads only the first 512, .*", warning)
    assert tokens and int(tokens.group(1)) > 512, warning


def test_events_stream_ends_with_the_final_state(service, finished_job):
    events = _read_sse(service, f"/jobs/{finished_job['id']}/events")
    assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded"


def _read_sse(client: httpx.Client, path: str, timeout_s: float = 60) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    with client.stream("GET", path, timeout=timeout_s) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: "):])))
                if event == "end":
                    break
    return events


def test_models_metrics_and_listing(service, finished_job):
    models = service.get("/models").json()["models"]
    assert models[0]["id"] == "tiny-t2v" and models[0]["world_size"] == 2 and models[0]["backend"] == "gloo"
    assert models[0]["replicas"] and models[0]["replicas"][0]["layout"].startswith("world=2")
    metrics = service.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    succeeded = [line for line in metrics.text.splitlines() if line.startswith('wanserve_jobs{status="succeeded"}')]
    assert succeeded and int(succeeded[0].split()[-1]) >= 1
    assert "wanserve_queue_depth" in metrics.text and "wanserve_step_seconds_count" in metrics.text
    listing = service.get("/jobs", params={"status": "succeeded", "limit": 10}).json()
    assert finished_job["id"] in [j["id"] for j in listing["jobs"]]
    assert all(j["status"] == "succeeded" for j in listing["jobs"])
    assert service.get("/jobs", params={"status": "bogus"}).status_code == 422


# One case per invalid field: (body changes, the field the 422 must name, a word of its message)
INVALID = [
    ({"width": 72}, "width", "multiple of 16"),
    ({"height": 40}, "height", "multiple of 16"),
    ({"num_frames": 6}, "num_frames", "4n+1"),
    ({"width": 1024, "height": 1024}, "num_frames", "tokens"),
    ({"steps": 0}, "steps", "between"),
    ({"steps": 101}, "steps", "between"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": "x" * 4001}, "prompt", "maximum"),
    ({"model": "wan9-t2v"}, "model", "unknown model"),
    ({"lora": {"name": "../secrets"}}, "lora", "plain name"),
    ({"lora": {"name": "/etc/passwd"}}, "lora", "plain name"),
    ({"lora": {"name": "missing"}}, "lora", "unknown LoRA"),
    ({"image": base64.b64encode(_png()).decode()}, "image", "text-to-video"),
    ({"guidance": [3.0, 4.0]}, "guidance", "two-expert"),
    ({"sampler": "ddim"}, "sampler", ""),
    ({"seed": -1}, "seed", ""),
    ({"width": "wide"}, "width", ""),
    ({"colour": "red"}, "colour", ""),
]


@pytest.mark.parametrize("change,field,word", INVALID, ids=[f"{c[1]}-{i}" for i, c in enumerate(INVALID)])
def test_invalid_field_gives_422_naming_it(service, change, field, word):
    r = service.post("/generate", json={"prompt": "a cat", **change})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert [e["loc"][1] for e in errors] == [field], errors
    assert word.lower() in errors[0]["msg"].lower()


def test_oversized_body_gives_413(service):
    r = service.post("/generate", json={"prompt": "a cat", "negative_prompt": "y" * 70_000})
    assert r.status_code == 413


def test_auth_required_except_health(service, finished_job):
    url = str(service.base_url)
    for path in ("/models", f"/jobs/{finished_job['id']}", f"/jobs/{finished_job['id']}/video", "/metrics"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url + "/generate", json={"prompt": "a cat"}).status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/readyz").status_code == 200
    assert service.get("/models").status_code == 200


def test_idempotency_key_dedupes(service):
    headers = {"Idempotency-Key": "retry-me-1"}
    first = service.post("/generate", json={"prompt": "a dog", "steps": 2}, headers=headers)
    second = service.post("/generate", json={"prompt": "a dog", "steps": 2}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["created"] is True and second.json()["created"] is False
    third = service.post("/generate", json={"prompt": "a dog", "steps": 2}, headers={"Idempotency-Key": "other"})
    assert third.json()["id"] != first.json()["id"]
    for job_id in (first.json()["id"], third.json()["id"]):
        wait_status(service, job_id, ("succeeded",), timeout_s=60)


def test_idempotency_key_reused_with_a_different_body_is_422(service):
    headers = {"Idempotency-Key": "reuse-me-1"}
    body = {"prompt": "a heron", "steps": 2}  # no seed: the retry must match though a seed is drawn
    first = service.post("/generate", json=body, headers=headers)
    again = service.post("/generate", json=body, headers=headers)
    assert first.status_code == again.status_code == 202, first.text
    assert first.json()["id"] == again.json()["id"] and again.json()["created"] is False
    before = service.get("/jobs", params={"limit": 500}).json()["total"]
    other = service.post("/generate", json={"prompt": "a crane", "steps": 2}, headers=headers)
    assert other.status_code == 422, other.text
    (entry,) = other.json()["detail"]
    assert entry["loc"] == ["header", "Idempotency-Key"]
    assert "Idempotency-Key 'reuse-me-1' was already used with a different request" in entry["msg"]
    assert service.get("/jobs", params={"limit": 500}).json()["total"] == before  # nothing written
    wait_status(service, first.json()["id"], ("succeeded",), timeout_s=60)


def test_openai_video_routes(service):
    r = service.post("/v1/videos", json={"prompt": "waves on rocks", "size": "64x64", "seconds": "0.25",
                                         "steps": 2})
    assert r.status_code == 200, r.text
    video = r.json()
    assert video["object"] == "video" and video["status"] in ("queued", "in_progress")
    assert video["size"] == "64x64"
    done = wait_for(lambda: (v := service.get(f"/v1/videos/{video['id']}").json())["status"] == "completed" and v,
                    60, "the OpenAI-style job to complete")
    assert done["progress"] == 100
    content = service.get(f"/v1/videos/{video['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.content == service.get(f"/jobs/{video['id']}/video").content
    bad = service.post("/v1/videos", json={"prompt": "x", "size": "big"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][1] == "size"


def test_multipart_upload_is_parsed(service):
    # The tiny t2v model takes no image, so a parsed upload comes back as a 422 on "image".
    r = service.post("/generate", data={"prompt": "a cat", "steps": "2"},
                     files={"image": ("in.png", _png(), "image/png")})
    assert r.status_code == 422 and [e["loc"][1] for e in r.json()["detail"]] == ["image"]
    r = service.post("/generate", data={"prompt": "a cat", "steps": "2"}, files={"unused": ("x.txt", b"x")})
    assert r.status_code == 422  # unknown field "unused"
    ok = service.post("/generate", data={"prompt": "a cat from a form", "steps": "2"})  # url-encoded form
    assert ok.status_code == 202, ok.text
    wait_status(service, ok.json()["id"], ("succeeded",), timeout_s=60)


def test_missing_results_are_404_or_410_never_500(service, finished_job):
    assert service.get("/jobs/" + "0" * 32).status_code == 404
    assert service.get("/jobs/" + "0" * 32 + "/video").status_code == 404
    assert service.delete("/jobs/" + "0" * 32).status_code == 404
    r = service.post("/generate", json={"prompt": "short lived", "steps": 2})
    job = wait_status(service, r.json()["id"], ("succeeded",), timeout_s=60)
    (service.data_dir / "results" / job["id"] / "video.mp4").unlink()
    gone = service.get(f"/jobs/{job['id']}/video")
    assert gone.status_code == 410 and "gone" in gone.json()["detail"]
    assert service.get(f"/jobs/{job['id']}/preview.png").status_code == 200


def test_delete_of_a_finished_job_deletes_its_files_and_they_answer_410(service):
    r = service.post("/generate", json={"prompt": "kept a while", "steps": 2})
    job = wait_status(service, r.json()["id"], ("succeeded",), timeout_s=60)
    settings_ttl = 7 * 24 * 3600  # the default result_ttl_s
    assert job["result"]["expires_at"] == pytest.approx(job["finished_at"] + settings_ttl)
    folder = service.data_dir / "results" / job["id"]
    assert (folder / "video.mp4").is_file()
    deleted_before = _metric(service, "wanserve_results_deleted_total")
    r = service.delete(f"/jobs/{job['id']}")
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["status"] == "succeeded" and view["result"]["video_url"] is None
    assert view["result"]["deleted_reason"] == "deleted by request" and view["result"]["expires_at"] is None
    assert not folder.exists()
    for path in (f"/jobs/{job['id']}/video", f"/jobs/{job['id']}/preview.png", f"/v1/videos/{job['id']}/content"):
        gone = service.get(path)
        assert gone.status_code == 410 and "was deleted at" in gone.json()["detail"], (path, gone.text)
    assert service.delete(f"/jobs/{job['id']}").json()["result"]["deleted_at"] == view["result"]["deleted_at"]
    assert _metric(service, "wanserve_results_deleted_total") == deleted_before + 1


def test_openai_delete_of_a_video(service):
    video = service.post("/v1/videos", json={"prompt": "brief", "size": "64x64", "seconds": "0.25", "steps": 2}).json()
    wait_for(lambda: service.get(f"/v1/videos/{video['id']}").json()["status"] == "completed", 60,
             "the OpenAI-style job to complete")
    assert service.get(f"/v1/videos/{video['id']}").json()["expires_at"] is not None
    r = service.delete(f"/v1/videos/{video['id']}")
    assert r.status_code == 200 and r.json() == {"id": video["id"], "object": "video.deleted", "deleted": True}
    assert service.get(f"/v1/videos/{video['id']}/content").status_code == 410
    # Many steps, so that it is still queued or running when the DELETE arrives.
    busy = service.post("/v1/videos", json={"prompt": "long", "size": "64x64", "seconds": "0.25", "steps": 100})
    refused = service.delete(f"/v1/videos/{busy.json()['id']}")
    assert refused.status_code == 409 and "only a finished video can be deleted" in refused.json()["detail"]
    assert service.delete(f"/jobs/{busy.json()['id']}").status_code == 200  # cancel it
    wait_status(service, busy.json()["id"], ("cancelled",), timeout_s=60)


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_the_app_holds_the_dispatch_lease(service, finished_job):
    assert service.get("/readyz").json()["dispatching"] is True
    assert _metric(service, "wanserve_dispatching") == 1
