"""A throw-away Ray cluster of our own for the tests that run Ray as an operator does (`ray start`,
`serve deploy`): its own temp dir and free ports, started with ``--block`` so that stopping it means
signalling the processes we started (never `ray stop`, which would kill every Ray process on the
machine, other tests' included)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_DIR = Path(__file__).resolve().parent.parent
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # = `ray`, from this interpreter
SERVE_CLI = [sys.executable, "-m", "ray.serve.scripts"]  # = `serve`


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5, alive=None):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def http_up(url: str) -> bool:
    """Anything answers (Ray 2.60's dashboard says 401 without its token: it is up)."""
    try:
        return httpx.get(url, timeout=5).status_code < 500
    except httpx.HTTPError:
        return False


def run(cmd: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO_DIR, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _unhealthy(app: dict) -> str:
    return "\n".join(f"{name}: {d.get('status')}: {d.get('message')}" for name, d in
                     (app.get("deployments") or {}).items() if d.get("status") != "HEALTHY")


class LocalRayCluster:
    """`ray start --head --block` in its own session; stop() ends exactly what it started."""

    def __init__(self, num_cpus: int, num_gpus: int = 0):
        self.temp_dir = tempfile.mkdtemp(prefix="wsd-", dir="/tmp")  # short: Ray's socket paths have a limit
        (gcs, dashboard, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager,
         client) = free_ports(9)
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.workers: list[subprocess.Popen] = []  # `ray start --address` of added worker nodes
        # Nothing of a Ray session this pytest process may have (RAY_ADDRESS, auth mode...) leaks in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANSERVE_"))}
        # Replicas and workers are started by the raylet with its environment: make the repo importable
        # even without `pip install -e .`.
        # (tests/ too: the fake generators live there).
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), str(REPO_DIR / "tests")] + [
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray 2.60 turns token authentication on when ~/.ray/auth_token exists, but the `serve` CLI only
        # sends the token with RAY_AUTH_MODE=token. Use a token of our own, on every machine the same way.
        self.env["RAY_AUTH_MODE"] = "token"
        self.env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        cmd = RAY_CLI + [
            "start", "--head", "--block", "--disable-usage-stats", "--temp-dir", self.temp_dir,
            "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", str(num_cpus),
            "--num-gpus", str(num_gpus),
            # `serve deploy` talks to the dashboard's REST API (the head's dashboard port), so it stays on.
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
            "--ray-client-server-port", str(client),
        ]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def add_worker_node(self, num_cpus: int) -> None:
        """A second raylet on this machine joining the head (as a worker pod joins on KubeRay)."""
        (agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager) = free_ports(6)
        cmd = RAY_CLI + [
            "start", "--address", self.gcs_address, "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        ]
        with (Path(self.temp_dir) / f"ray-start-worker{len(self.workers)}.log").open("w") as log:
            self.workers.append(subprocess.Popen(cmd, env=self.env, cwd=REPO_DIR, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True))

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"`ray start` exited with {self.proc.returncode}:\n{self.log_tail()}")

    def serve_app(self, name: str) -> dict:
        """The application's status from the dashboard's Serve REST API (what `serve status` prints)."""
        try:
            r = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=10,
                          headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
            return (r.json().get("applications") or {}).get(name) or {}
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": repr(exc)}

    def serve_ready(self, url: str, app_name: str = "wanserve") -> bool:
        """Whether ``url``'s /readyz answers 200. Raises once Serve reports the app DEPLOY_FAILED (e.g. a
        replica constructor keeps raising), so that a wait on it stops at once."""
        if http_ok(f"{url}/readyz"):
            return True
        app = self.serve_app(app_name)
        if app.get("status") == "DEPLOY_FAILED":
            raise AssertionError(f"serve deploy failed: {app.get('message')}\n{_unhealthy(app)}")
        return False

    def shutdown_serve(self, timeout_s: float) -> None:
        """``serve shutdown -y`` on this cluster (every application goes); its outcome is not checked."""
        subprocess.run(SERVE_CLI + ["shutdown", "-y", "--address", self.dashboard_url], env=self.env,
                       capture_output=True, text=True, timeout=timeout_s)

    def close(self, serve_deployed: bool) -> None:
        """The end of a test: Serve shut down (if anything was deployed), then the cluster stopped."""
        try:
            if serve_deployed:
                self.shutdown_serve(timeout_s=60)
        finally:
            self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 60.0) -> None:
        for worker in self.workers:  # worker nodes first, then the head
            _stop_session(worker, timeout_s)
        _stop_session(self.proc, timeout_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _stop_session(proc: subprocess.Popen, timeout_s: float) -> None:
    """Stop one `ray start --block` and anything left in its session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops the processes it started
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # anything left in the session we created (workers, agents): by process group id
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
