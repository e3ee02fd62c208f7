"""Graceful shutdown of a real `stablexl serve` process: SIGTERM / SIGINT stop new jobs (503 + Retry-After),
the running job finishes, its result stays retrievable, and the process exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The server's log goes to a file, never an undrained pipe: uvicorn logs every request, and once 64 KiB of
    # access lines fill a pipe nobody reads, the write blocks the event loop and every request hangs.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "stablexl", "serve", "--model", "tiny-sdxl", "--port", str(port),
                             "--preview", "none", "--max-steps", "2000", *extra],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/server", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"server exited early:\n{log.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_then_exits_zero(sig):
    port = _port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(port, "--drain-grace", "3")
    try:
        with httpx.Client(base_url=base, timeout=10) as c:
            job = c.post("/v1/generate", json={"prompt": "x", "steps": 400}).json()
            queued = c.post("/v1/generate", json={"prompt": "y", "steps": 2}).json()
            while c.get(f"/v1/jobs/{job['id']}").json()["state"] != "running":
                time.sleep(0.05)
            proc.send_signal(sig)
            time.sleep(0.3)
            refused = c.post("/v1/generate", json={"prompt": "z", "steps": 2})
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert "shutting down" in refused.json()["detail"]
            a1111 = c.post("/sdapi/v1/txt2img", json={"prompt": "z", "steps": 2})
            assert a1111.status_code == 503
            while (view := c.get(f"/v1/jobs/{job['id']}").json())["state"] == "running":
                time.sleep(0.05)
            assert view["state"] == "succeeded" and len(view["images"]) == 1  # the running job finished
            while (done := c.get(f"/v1/jobs/{queued['id']}").json())["state"] in ("queued", "running"):
                time.sleep(0.05)
            assert done["state"] == "succeeded"  # accepted before the signal: finished too
            time.sleep(0.5)
            assert c.get(f"/v1/jobs/{job['id']}").json()["images"], "results stay retrievable during the grace"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_signal_stops_at_once():
    port = _port()
    proc = _start(port, "--drain-grace", "60")
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
