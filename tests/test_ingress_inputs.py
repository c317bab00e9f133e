"""The HTTP API in one process, without Ray: the FastAPI app of ``Ingress`` over a real
``JobQueueService`` (the JobQueue deployment's class) whose handle calls are plain awaits. Inputs
that once got a 202 and broke later, or a 500: each must now be a 4xx naming the field, and the
routes that race a job's end (cancel, the video while it is deleted) must keep their promises.
The same API through Ray Serve is in test_service.py and test_reliability_input.py."""
from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import os
import time
import types

import pytest
from fastapi.testclient import TestClient
from ray import serve

from service.dispatcher import JobQueueService
from service.ingress import Ingress, api
from service.queue import JobQueue
from service_helpers import TOKEN, FakeEngine, make_settings

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class LocalHandle:
    """``handle.method.remote(...)`` as an await of the object's method, as Serve's handle does."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        method = getattr(self._target, name)

        async def call(*args, **kwargs):
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return types.SimpleNamespace(remote=call)


@pytest.fixture()
def app(tmp_path, monkeypatch):
    yield from serve_app(tmp_path, monkeypatch)


@pytest.fixture()
def i2v_app(tmp_path, monkeypatch):
    yield from serve_app(tmp_path, monkeypatch, variant="tiny-i2v")


def serve_app(tmp_path, monkeypatch, **overrides):
    (tmp_path / "loras").mkdir()
    settings = make_settings(tmp_path / "data", lora_dir=str(tmp_path / "loras"), max_body_bytes=64 * 1024,
                             **overrides)
    # Another JobQueue holds the store's dispatch lease: this one takes jobs but dispatches none, so
    # that the tests decide how each job ends.
    JobQueue(settings.db_path).acquire_lease("another JobQueue replica", 3600)
    queue = JobQueueService(settings.to_args(), FakeEngine())
    routes_class = Ingress.__bases__[0]  # the class as written, under Serve's ASGI wrapper
    ingress = object.__new__(routes_class)
    routes_class.__init__(ingress, settings.to_args(), LocalHandle(queue))
    monkeypatch.setattr(serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=ingress))
    with TestClient(api, raise_server_exceptions=False) as client:
        yield types.SimpleNamespace(client=client, queue=queue.queue, settings=settings)


def post(app, body, path="/generate", **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body, allow_nan=True)
    return app.client.post(path, content=data, headers={**AUTH, "content-type": "application/json"}, **kwargs)


def field_of(response) -> set[str]:
    """Every name in the 422's ``loc`` paths (``["body", "lora", "scale"]`` -> lora, scale)."""
    return {str(part) for entry in response.json()["detail"] for part in entry["loc"][1:]}


@pytest.mark.parametrize("body, field", [
    ('{"prompt": "x", "guidance": 1e999}', "guidance"),  # Python's parser reads this as inf
    ('{"prompt": "x", "guidance": NaN}', "guidance"),
    ('{"prompt": "x", "shift": Infinity}', "shift"),
    ('{"prompt": "x", "lora": {"name": "a", "scale": NaN}}', "scale"),
    ('{"prompt": "a\\ud800b"}', "prompt"),  # a lone surrogate: no UTF-8 for it
    ('{"prompt": "x", "metadata": {"k": "\\udfff"}}', "metadata"),
    ('{"prompt": "x", "width": 0}', "width"),  # 0 is not "the default"
    ('{"prompt": "x", "height": 0}', "height"),
    ('{"prompt": "x", "num_frames": 0}', "num_frames"),
    ('{"prompt": "x", "width": 8192, "height": 16, "num_frames": 1}', "width"),  # past the workers' 4096
    ('{"prompt": "x", "num_frames": 1005}', "num_frames"),
    ('{"prompt": "x", "guidance": 101}', "guidance"),
    ('{"prompt": "x", "guidance": -1}', "guidance"),
    ('{"prompt": "x", "shift": 1000}', "shift"),
])
def test_values_the_workers_would_refuse_are_a_422_naming_the_field(app, body, field):
    response = post(app, body)
    assert response.status_code == 422, response.text
    assert field in field_of(response), response.json()
    assert app.queue.counts().get("queued", 0) == 0  # nothing was stored
    assert app.client.get("/jobs", headers=AUTH).status_code == 200  # and the list still answers


def test_a_long_lora_name_and_deep_nesting_are_422_not_500(app):
    response = post(app, {"prompt": "x", "lora": {"name": "a" * 300}})
    assert response.status_code == 422 and "lora" in field_of(response)
    response = post(app, "[" * 20_000 + "]" * 20_000)
    assert response.status_code == 422 and "nested too deep" in response.text


def test_a_lora_the_workers_cannot_read_is_refused_at_submission(app):
    loras = app.settings.lora_dir
    from safetensors.torch import save_file
    import torch

    save_file({"blocks.0.self_attn.q.diff_b": torch.zeros(4)}, f"{loras}/good.safetensors")
    open(f"{loras}/old.pt", "wb").close()  # pickled weights are not read
    os.makedirs(f"{loras}/two")
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, f"{loras}/two/{name}")
    assert post(app, {"prompt": "x", "lora": {"name": "good"}}).status_code == 202
    response = post(app, {"prompt": "x", "lora": {"name": "old.pt"}})
    assert response.status_code == 422 and "not a .safetensors file" in response.text
    response = post(app, {"prompt": "x", "lora": {"name": "two"}})
    assert response.status_code == 422 and "exactly one weights file" in response.text
    assert app.queue.counts().get("queued", 0) == 1


@pytest.mark.parametrize("seconds", ["inf", 1e308, "nan", -1, 0])
def test_openai_seconds_must_be_a_positive_finite_number(app, seconds):
    response = post(app, {"prompt": "x", "seconds": seconds}, path="/v1/videos")
    assert response.status_code == 422 and "seconds" in field_of(response), response.text


def test_openai_size_0x0_is_refused(app):
    response = post(app, {"prompt": "x", "size": "0x0"}, path="/v1/videos")
    assert response.status_code == 422 and field_of(response) == {"size"}  # the field sent, not width/height


def test_a_chunked_form_is_held_to_max_body_bytes(app):
    limit = app.settings.max_body_bytes
    boundary = "b0undary"
    form = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
            f"--{boundary}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"i.png\"\r\n"
            f"content-type: image/png\r\n\r\n").encode() + b"\x89PNG" + b"0" * (2 * limit) + f"\r\n--{boundary}--\r\n".encode()

    def chunks():  # no content-length: the body arrives chunked
        for start in range(0, len(form), 8192):
            yield form[start:start + 8192]

    response = app.client.post("/generate", content=chunks(),
                               headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413, response.text
    # A small form in chunks still works.
    small = form[:form.index(b"\x89PNG")] + b"not an image" + f"\r\n--{boundary}--\r\n".encode()
    response = app.client.post("/generate", content=iter([small[:50], small[50:]]),
                               headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 422 and "image" in field_of(response)  # parsed: t2v takes no image


def _succeeded_job(app, tmp_path, preview: bool = False) -> str:
    job_id = post(app, {"prompt": "x"}).json()["id"]
    video, png = tmp_path / "video.mp4", tmp_path / "preview.png"
    video.write_bytes(b"\x00" * 100)
    if preview:
        png.write_bytes(base64.b64decode(_png(8, 8)))
    app.queue.mark_running(job_id)
    app.queue.finish(job_id, "succeeded", result={"width": 64}, result_path=str(video), result_bytes=100,
                     preview_path=str(png) if preview else None)
    return job_id


def test_cancel_never_deletes_a_finished_job_s_files(app, tmp_path):
    job_id = _succeeded_job(app, tmp_path)
    response = app.client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
    assert response.status_code == 409 and "already succeeded" in response.text
    assert app.client.get(f"/jobs/{job_id}/video", headers=AUTH).status_code == 200  # still there
    queued = post(app, {"prompt": "y"}).json()["id"]
    response = app.client.post(f"/jobs/{queued}/cancel", headers=AUTH)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert app.client.post(f"/jobs/{queued}/cancel", headers=AUTH).status_code == 200  # again: same answer
    assert app.client.post("/jobs/nope/cancel", headers=AUTH).status_code == 404
    assert app.client.post(f"/jobs/{queued}/cancel").status_code == 401


def test_a_video_deleted_between_the_check_and_the_send_is_410(app, tmp_path, monkeypatch):
    job_id = _succeeded_job(app, tmp_path)
    real_stat = os.stat
    calls = []

    def stat_then_gone(path, *args, **kwargs):  # the file goes right after the first look at it
        calls.append(path)
        if str(path).endswith("video.mp4") and len(calls) > 1:
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_then_gone)
    response = app.client.get(f"/jobs/{job_id}/video", headers=AUTH)
    assert response.status_code == 200 and len(response.content) == 100  # served from the one stat
    (tmp_path / "video.mp4").unlink()
    monkeypatch.setattr(os, "stat", real_stat)
    response = app.client.get(f"/jobs/{job_id}/video", headers=AUTH)
    assert response.status_code == 410


def test_the_dispatcher_state_is_reachable(app):
    # The fixture's JobQueueService runs its loop in the test client's event loop.
    assert app.client.get("/metrics", headers=AUTH).status_code == 200
    assert asyncio.iscoroutinefunction(Ingress.generate)


def _png(width: int, height: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("image, sized, problem", [
    (base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10).decode(), False, "cannot decode the image"),
    (_png(1, 5000), False, "over 4096 pixels a side: give width and height"),
    (_png(1, 5000), True, None),  # with a size asked for, the image is cropped to it
    (_png(48, 32), False, None),
    (_png(400, 10), {"height": 480}, "gives a 19200x480 video"),  # the missing side follows the image
    (_png(400, 10), {"width": 480}, None),
])
def test_an_image_the_workers_could_not_use_is_refused_at_submission(i2v_app, image, sized, problem):
    size = sized if isinstance(sized, dict) else {"width": 64, "height": 64} if sized else {}
    body = {"prompt": "x", "image": image, **size}
    response = post(i2v_app, body)
    if problem is None:
        assert response.status_code == 202, response.text
    else:
        assert response.status_code == 422 and "image" in field_of(response)
        assert problem in response.text


def test_readyz_says_when_the_ingress_does_not_see_the_jobqueues_data_dir(app, tmp_path):
    ingress = serve.get_replica_context().servable_object
    response = app.client.get("/readyz")
    assert response.status_code == 503 and "no engine replica is ready yet" in response.text  # none reported
    ingress.settings = ingress.settings.model_copy(update={"data_dir": str(tmp_path / "node-local")})
    response = app.client.get("/readyz")
    assert response.status_code == 503
    assert "this Ingress replica: data_dir" in response.text and "every node mounts" in response.text


def test_event_streams_past_the_cap_get_429_and_other_calls_still_answer(tmp_path, monkeypatch):
    for app in serve_app(tmp_path, monkeypatch, max_event_streams=1):
        ingress = serve.get_replica_context().servable_object
        job_id = post(app, {"prompt": "x"}).json()["id"]  # stays queued: this JobQueue dispatches nothing
        ingress.event_streams = 1  # one stream open (the test client cannot hold one open beside another call)
        response = app.client.get(f"/jobs/{job_id}/events", headers=AUTH)
        assert response.status_code == 429 and response.headers["retry-after"] == "10"
        assert f"poll GET /jobs/{job_id}" in response.json()["detail"]
        assert app.client.get(f"/jobs/{job_id}", headers=AUTH).status_code == 200
        ingress.event_streams = 0
        app.queue.cancel(job_id)
        response = app.client.get(f"/jobs/{job_id}/events", headers=AUTH)
        assert response.status_code == 200 and "event: end" in response.text
        assert ingress.event_streams == 0  # the stream gave its place back

        class Client:  # a request whose client stays
            scope = {"root_path": ""}

            async def is_disconnected(self):
                return False

        async def one_event_then_leave():
            stream = ingress._event_stream(job_id, Client())
            first = await stream.__anext__()
            open_now = ingress.event_streams
            await stream.aclose()
            return first, open_now

        first, open_now = asyncio.run(one_event_then_leave())
        assert first.startswith("event: progress") and open_now == 1 and ingress.event_streams == 0


class FailingHandle(LocalHandle):
    """A JobQueue handle whose calls fail as Serve's do while the JobQueue replica is gone."""

    def __init__(self, target, error: Exception):
        super().__init__(target)
        self.error = error

    def __getattr__(self, name):
        async def call(*args, **kwargs):
            raise self.error

        return types.SimpleNamespace(remote=call)


@pytest.mark.parametrize("error", ["ActorUnavailableError", "DeploymentUnavailableError", "BackPressureError"])
def test_a_job_queue_that_cannot_answer_is_a_503_to_try_again(app, monkeypatch, error):
    import ray.exceptions
    import ray.serve.exceptions

    ingress = serve.get_replica_context().servable_object
    make = {"ActorUnavailableError": lambda: ray.exceptions.ActorUnavailableError("restarting", b"a" * 16),
            "DeploymentUnavailableError": lambda: ray.serve.exceptions.DeploymentUnavailableError(
                ray.serve.exceptions.DeploymentID(name="JobQueue", app_name="wanserve")),
            "BackPressureError": lambda: ray.serve.exceptions.BackPressureError(num_queued_requests=9,
                                                                                 max_queued_requests=8)}[error]
    monkeypatch.setattr(ingress, "queue", FailingHandle(None, make()))
    for response in (post(app, {"prompt": "a fox"}), app.client.get("/jobs/" + "0" * 32, headers=AUTH)):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5" and "job queue is unavailable" in response.json()["detail"]
    monkeypatch.setattr(ingress, "queue", FailingHandle(None, KeyError("a bug")))
    response = post(app, {"prompt": "a fox"})
    assert response.status_code == 500 and response.json()["detail"] == "internal error: KeyError: 'a bug'"


@pytest.mark.parametrize("body, fields", [
    ({"size": "-64x64"}, {"size"}),
    ({"size": "63x64"}, {"size"}),  # not a multiple of 16: the native check, named as sent
    ({"seconds": "100"}, {"seconds"}),
    ({"input_reference": base64.b64encode(b"not an image").decode()}, {"input_reference"}),
])
def test_openai_422s_name_the_fields_the_client_sent(i2v_app, body, fields):
    response = post(i2v_app, {"prompt": "x", "input_reference": _png(64, 64), **body}, path="/v1/videos")
    assert response.status_code == 422, response.text
    assert field_of(response) == fields, response.json()


def test_openai_video_object_has_every_key_and_the_size_that_was_made(i2v_app):
    image = _png(160, 96)  # 5:3: the video takes this aspect, not the model's square default
    response = post(i2v_app, {"prompt": "a fox", "input_reference": f"data:image/png;base64,{image}"},
                    path="/v1/videos")
    assert response.status_code == 200, response.text
    video = response.json()
    for key in ("completed_at", "expires_at", "error", "remixed_from_video_id"):
        assert key in video and video[key] is None
    assert video["prompt"] == "a fox" and video["status"] == "queued"
    job_id = video["id"]
    assert i2v_app.queue.image(job_id) == image  # the data URL's base64, as a native upload stores it
    i2v_app.queue.mark_running(job_id)
    i2v_app.queue.finish(job_id, "succeeded", result={"width": 80, "height": 48, "num_frames": 5})
    done = i2v_app.client.get(f"/v1/videos/{job_id}", headers=AUTH).json()
    assert done["size"] == "80x48" and done["status"] == "completed" and done["completed_at"] is not None


def test_an_image_implied_size_is_held_to_max_tokens_and_shown_while_queued(tmp_path, monkeypatch):
    """With one side given, the other follows the image: the token limit applies to that video (a
    tall image beside "width" alone had made a video 8x over the limit)."""
    for app in serve_app(tmp_path, monkeypatch, variant="tiny-i2v", max_tokens=32):  # 64x64x5 on tiny
        response = post(app, {"prompt": "x", "width": 64, "image": _png(64, 512)})
        assert response.status_code == 422 and field_of(response) == {"num_frames"}, response.text
        assert "64x512x5 (the size the image implies) is 256 latent tokens" in response.text
        response = post(app, {"prompt": "x", "image": _png(64, 512)})  # the default area: fits
        assert response.status_code == 202, response.text
        job = app.client.get(f"/jobs/{response.json()['id']}", headers=AUTH).json()
        from wan_model.pipeline.conditioning import decode_image
        from wan_model.pipeline.validation import video_size_for_image

        made = video_size_for_image(decode_image(base64.b64decode(_png(64, 512))), app.settings.variant_spec)
        assert (job["request"]["width"], job["request"]["height"]) == made[:2] == (16, 176)  # as the workers size it
        video = post(app, {"prompt": "x", "input_reference": _png(160, 96)}, path="/v1/videos").json()
        assert video["size"] == "80x48" and video["status"] == "queued"


def test_the_default_step_count_is_held_to_max_steps(tmp_path, monkeypatch):
    for app in serve_app(tmp_path, monkeypatch, max_steps=2):  # tiny runs 4 steps by default
        response = post(app, {"prompt": "x"})
        assert response.status_code == 422 and field_of(response) == {"steps"}
        assert "4 steps by default" in response.text
        assert post(app, {"prompt": "x", "steps": 2}).status_code == 202


@pytest.mark.parametrize("field, value", [("seed", True), ("width", True), ("guidance", False),
                                          ("guidance", [True, 2.0]), ("steps", True)])
def test_true_and_false_are_no_numbers(app, field, value):
    response = post(app, {"prompt": "x", field: value})
    assert response.status_code == 422 and field_of(response) == {field}, response.text


def test_a_union_field_s_422_names_the_field_once(app):
    response = post(app, {"prompt": "x", "guidance": [1, 2, 3]})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "guidance"]]
    response = post(app, {"prompt": "x", "seconds": [1]}, path="/v1/videos")
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "seconds"]]


def test_both_create_routes_take_data_urls_and_wrapped_base64(i2v_app):
    image = _png(64, 64)
    wrapped = "\n".join(image[i:i + 76] for i in range(0, len(image), 76))  # as `base64` prints it
    for value in (f"data:image/png;base64,{image}", wrapped):
        response = post(i2v_app, {"prompt": "x", "image": value})
        assert response.status_code == 202, response.text
        assert i2v_app.queue.image(response.json()["id"]) == image
    response = post(i2v_app, {"prompt": "x", "input_reference": wrapped}, path="/v1/videos")
    assert response.status_code == 200, response.text


def test_a_multipart_request_takes_metadata_as_json(i2v_app):
    response = i2v_app.client.post("/generate", headers=AUTH, files={"image": ("a.png", base64.b64decode(_png(64, 64)))},
                                   data={"prompt": "x", "metadata": '{"order": "A-17"}'})
    assert response.status_code == 202, response.text
    job = i2v_app.client.get(f"/jobs/{response.json()['id']}", headers=AUTH).json()
    assert job["request"]["metadata"] == {"order": "A-17"}


def test_a_video_not_made_yet_is_409_and_head_answers(app, tmp_path):
    queued = post(app, {"prompt": "x"}).json()["id"]
    response = app.client.get(f"/jobs/{queued}/video", headers=AUTH)
    assert response.status_code == 409 and "not made yet" in response.text
    assert app.client.get(f"/v1/videos/{queued}/content", headers=AUTH).status_code == 409
    assert app.client.get("/jobs/" + "0" * 32 + "/video", headers=AUTH).status_code == 404
    job_id = _succeeded_job(app, tmp_path, preview=True)
    for path in (f"/jobs/{job_id}/video", f"/jobs/{job_id}/preview.png", f"/v1/videos/{job_id}/content"):
        response = app.client.head(path, headers=AUTH)
        if path.endswith(".png"):
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            continue
        assert response.status_code == 200 and response.headers["content-length"] == "100"
        assert response.headers["accept-ranges"] == "bytes" and response.content == b""
    response = app.client.get(f"/v1/videos/{job_id}/content?variant=poster", headers=AUTH)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "variant"]


def test_an_openai_video_deleted_shows_when_its_content_expired(app, tmp_path):
    job_id = _succeeded_job(app, tmp_path)
    assert app.client.delete(f"/v1/videos/{job_id}", headers=AUTH).json()["deleted"] is True
    video = app.client.get(f"/v1/videos/{job_id}", headers=AUTH).json()
    assert video["expires_at"] is not None and video["expires_at"] <= time.time() + 1
    assert app.client.get(f"/v1/videos/{job_id}/content", headers=AUTH).status_code == 410


def test_every_operation_of_the_api_description_has_its_own_id():
    """Client generators (and Schemathesis) name calls by operationId: a GET+HEAD route gave one twice."""
    spec = api.openapi()
    ids = [op["operationId"] for methods in spec["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids)) and len(ids) >= 19, sorted(ids)
    assert {"video_head", "preview_head", "openai_content_head"} <= set(ids)
