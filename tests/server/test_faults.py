"""Faults survived: a job that fails inside the pipeline fails alone, and clients that vanish mid-stream or
mid-upload leave nothing behind (threads, open files, memory), measured over 500 of them."""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import pytest

from stablexl.pipeline import Pipeline

from .conftest import client, config, live_server, wait_job


def _generate(c, **body) -> dict:
    r = c.post("/v1/generate", json=body)
    assert r.status_code == 202, r.text
    return wait_job(c, r.json()["id"])


@pytest.mark.parametrize("fault,kind", [(RuntimeError("injected bug"), "internal"),
                                        (FloatingPointError("sampling produced NaN/inf latents"), "invalid")])
def test_a_failing_job_fails_alone_and_the_worker_goes_on(monkeypatch, fault, kind):
    real = Pipeline._run
    calls = {"n": 0}

    def flaky(self, req, seeds, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise fault
        return real(self, req, seeds, **kw)

    with client() as c:
        monkeypatch.setattr(Pipeline, "_run", flaky)
        bad = _generate(c, prompt="x", steps=2)
        assert bad["state"] == "failed" and str(fault) in bad["error"]
        good = _generate(c, prompt="y", steps=2)
        assert good["state"] == "succeeded" and len(good["images"]) == 1
        a1111 = c.post("/sdapi/v1/txt2img", json={"prompt": "z", "steps": 2})
        assert a1111.status_code == 200


def _non_finite(monkeypatch):
    import torch

    from stablexl.diffusion.guidance import guided as real_guided
    import stablexl.pipeline as P

    def nan_model(*a, **kw):
        model = real_guided(*a, **kw)
        return lambda x, sigma: model(x, sigma) * torch.nan

    monkeypatch.setattr(P, "guided", nan_model)


def test_a_non_finite_result_fails_the_job_with_its_message(monkeypatch):
    with client() as c:
        _non_finite(monkeypatch)
        job = _generate(c, prompt="x", steps=2)
        assert job["state"] == "failed" and "NaN/inf" in job["error"]
        monkeypatch.undo()
        assert _generate(c, prompt="x", steps=2)["state"] == "succeeded"


def _resources() -> tuple[int, int, int]:
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return threading.active_count(), fds, rss


def test_500_clients_that_vanish_leak_nothing():
    """250 clients drop a server-sent event stream after its first event, 250 drop an upload half-way."""
    with live_server(config(max_steps=5000, preview="none")) as (base, app):
        host, port = base.removeprefix("http://").split(":")
        with httpx.Client(base_url=base, timeout=30) as c:
            job = c.post("/v1/generate", json={"prompt": "long", "steps": 4000}).json()  # keeps streams talking
            for _ in range(20):  # warm up: thread pools, the first connections
                with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
                    next(r.iter_lines())
            time.sleep(0.5)
            before = _resources()
            for i in range(250):
                with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # the first event, then the client goes away
                s = socket.create_connection((host, int(port)))
                body = b'{"prompt": "x", "init_image": "' + b"A" * 20000
                s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 200000\r\n\r\n" + body)  # a tenth of the promised body
                s.close()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # streams notice the disconnect at their next event
                after = _resources()
                if after[0] <= before[0] + 2 and after[1] <= before[1] + 4:
                    break
                time.sleep(0.5)
            print(f"threads {before[0]} -> {after[0]}, open files {before[1]} -> {after[1]}, "
                  f"RSS {before[2] / 2**20:.0f} -> {after[2] / 2**20:.0f} MiB")
            assert after[0] <= before[0] + 2, "threads leaked"
            assert after[1] <= before[1] + 4, "file descriptors leaked"
            assert after[2] - before[2] < 64 * 2**20, "memory grew with the clients"
            c.delete(f"/v1/jobs/{job['id']}")
            assert app.state.server.queue.status()["pending"] == 0
