"""Rank 0's progress reports (``service.worker._ProgressReporter``) without Ray: a JobQueue handle
that answers slowly or not at all never holds the steps up, the cancel flag comes back with the
next report, and the end-of-job flush sends the last progress and waits for it only briefly."""
from __future__ import annotations

import threading
import time

from service import worker
from wan_model.pipeline.request import Progress


class SlowQueueHandle:
    """Stands in for the JobQueue's deployment handle: ``report_progress.remote(...).result(timeout_s)``."""

    def __init__(self, delay_s: float, cancel: bool = False, first_delay_s: "float | None" = None):
        self.delay_s, self.cancel = delay_s, cancel
        self.first_delay_s = first_delay_s  # the first report's delay, if not delay_s
        self.reports: list[dict] = []
        self.report_progress = self
        self.lock = threading.Lock()

    def remote(self, job_id: str, progress: dict):
        handle = self
        delay = self.delay_s
        if self.first_delay_s is not None:
            delay, self.first_delay_s = self.first_delay_s, None

        class Answer:
            def result(self, timeout_s: float):
                time.sleep(min(delay, timeout_s))
                if delay > timeout_s:
                    raise TimeoutError("the JobQueue did not answer")
                with handle.lock:
                    handle.reports.append(progress)
                return handle.cancel

        return Answer()


def reporter(handle: SlowQueueHandle) -> worker._ProgressReporter:
    r = worker._ProgressReporter("job-1", None, interval_s=0.0)
    r.handle = handle
    return r


def test_a_slow_jobqueue_never_holds_the_steps_up(monkeypatch):
    monkeypatch.setattr(worker, "PROGRESS_TIMEOUT_S", 5.0)
    handle = SlowQueueHandle(delay_s=0.5)
    r = reporter(handle)
    start = time.monotonic()
    for step in range(20):
        r(Progress("denoise", step, 20, elapsed_s=step * 0.01))
    assert time.monotonic() - start < 0.3  # 20 steps; each report alone takes 0.5 s
    r.flush()
    deadline = time.monotonic() + 3
    while not handle.reports:
        assert time.monotonic() < deadline, "the first report never arrived"
        time.sleep(0.02)
    assert handle.reports[0]["step"] == 0  # the first went at once; the rest waited for it


def test_the_cancel_flag_comes_back_with_a_report():
    handle = SlowQueueHandle(delay_s=0.0, cancel=True)
    r = reporter(handle)
    assert r(Progress("denoise", 0, 4)) is False  # the answer is not in yet
    deadline = time.monotonic() + 5
    while not r(Progress("denoise", 1, 4)):
        assert time.monotonic() < deadline, "the cancel flag never came back"
        time.sleep(0.01)
    r.flush()


def test_flush_sends_the_last_progress_and_waits_only_briefly(monkeypatch):
    monkeypatch.setattr(worker, "FLUSH_WAIT_S", 0.3)
    monkeypatch.setattr(worker, "PROGRESS_TIMEOUT_S", 1.5)  # so the hung report's thread ends soon after
    fast = SlowQueueHandle(delay_s=0.0)
    r = reporter(fast)
    r.interval_s = 3600.0  # only stage changes go at once: the last steps wait for the flush
    r(Progress("denoise", 0, 3))
    time.sleep(0.05)
    r(Progress("denoise", 3, 3))
    r.flush()
    assert [p["step"] for p in fast.reports] == [0, 3]
    # The JobQueue stops answering (it drains while Serve stops the app): the flush's own report is
    # waited for FLUSH_WAIT_S at most, and one already on its way not at all.
    for first_delay_s, most_s in ((0.0, 1.0), (60.0, 0.2)):
        hung = SlowQueueHandle(delay_s=60.0, first_delay_s=first_delay_s)
        r = reporter(hung)
        r.interval_s = 3600.0
        r(Progress("decode", 0, 0))
        time.sleep(0.05)
        r(Progress("decode", 1, 0))  # held for the flush
        start = time.monotonic()
        r.flush()
        assert time.monotonic() - start < most_s, first_delay_s
