"""Two models on one Ray cluster are two apps under their own route prefixes (``serve deploy`` with
``route_prefix: /t2v``). Every link the API hands out must then carry the prefix: the 202's
``Location``, ``status_url`` and ``events_url``, and the job view's video and preview URLs. Each
is followed here, and the same routes without the prefix are not this app's."""
from __future__ import annotations

import httpx
import pytest

from reliability_helpers import TINY_JOB, reliability_settings
from service_helpers import TOKEN, deploy, wait_status

pytestmark = pytest.mark.slow

PREFIX = "/t2v"


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    from ray import serve

    settings = reliability_settings(tmp_path_factory.mktemp("route-prefix"), app_name="wanserve-t2v")
    deploy(settings, serve_url, route_prefix=PREFIX)
    client = httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield client
    client.close()
    serve.delete(settings.app_name)


def test_every_link_carries_the_route_prefix(app):
    client = app
    r = client.post(f"{PREFIX}/generate", json={"prompt": "a lighthouse", **TINY_JOB})
    assert r.status_code == 202, r.text
    answer = r.json()
    job_id = answer["id"]
    assert r.headers["location"] == answer["status_url"] == f"{PREFIX}/jobs/{job_id}"
    assert answer["events_url"] == f"{PREFIX}/jobs/{job_id}/events"
    with client.stream("GET", answer["events_url"]) as events:
        assert events.status_code == 200
        for line in events.iter_lines():
            if line.startswith("event: end"):
                break
    job = client.get(answer["status_url"]).json()
    assert job["status"] == "succeeded"
    result = job["result"]
    assert result["video_url"] == f"{PREFIX}/jobs/{job_id}/video"
    assert result["preview_url"] == f"{PREFIX}/jobs/{job_id}/preview.png"
    video = client.get(result["video_url"])
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    assert client.get(result["preview_url"]).content.startswith(b"\x89PNG")
    listed = client.get(f"{PREFIX}/jobs").json()["jobs"]
    assert [j["result"]["video_url"] for j in listed if j["id"] == job_id] == [result["video_url"]]
    assert client.get(f"/jobs/{job_id}").status_code == 404  # no app at "/" here
    with httpx.Client(base_url=client.base_url.join(PREFIX + "/"), headers=client.headers) as prefixed:
        assert wait_status(prefixed, job_id, ("succeeded",))["id"] == job_id  # a base URL that holds the prefix
