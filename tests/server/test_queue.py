"""The queue: FIFO order, 429 + Retry-After when full, cancellation, TTL, and jobs that outlive their client."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from stablexl.serve.queue import CANCELLED, SUCCEEDED, Job, JobQueue, QueueFull

from .conftest import client, config, decode_png, live_server, wait_job


def _submit(c, prompt: str, **kw) -> dict:
    r = c.post("/v1/generate", json={"prompt": prompt, "steps": 2, "width": 64, "height": 64, **kw})
    assert r.status_code == 202, r.text
    return r.json()


def test_fifo_order_positions_and_retry_after_when_full(gated):
    with client(loader=lambda name: gated, preview="none", queue_size=2) as c:
        a = _submit(c, "a")
        assert gated.entered.wait(10)  # a is running (blocked on the gate), so it no longer waits in the queue
        b, d = _submit(c, "b"), _submit(c, "c")
        assert [c.get(f"/v1/jobs/{j['id']}").json()["queue_position"] for j in (a, b, d)] == [None, 0, 1]
        assert c.get(f"/v1/jobs/{a['id']}").json()["state"] == "running"
        full = c.post("/v1/generate", json={"prompt": "d", "steps": 2})
        assert full.status_code == 429
        assert int(full.headers["retry-after"]) >= 1 and "queue is full" in full.json()["detail"]
        a1111_full = c.post("/sdapi/v1/txt2img", json={"prompt": "d", "steps": 2})
        assert a1111_full.status_code == 429 and "retry-after" in a1111_full.headers
        gated.gate.set()
        done = [wait_job(c, j["id"]) for j in (a, b, d)]
        assert [j["state"] for j in done] == ["succeeded"] * 3
        assert gated.calls == ["a", "b", "c"]
        starts = [j["started"] for j in done]
        assert starts == sorted(starts) and done[0]["finished"] <= done[1]["started"] <= done[1]["finished"]
        assert c.post("/v1/generate", json={"prompt": "e", "steps": 2}).status_code == 202  # room again


def test_cancel_queued_and_running_jobs(gated):
    with client(loader=lambda name: gated, preview="none") as c:
        running = _submit(c, "running", steps=5)
        assert gated.entered.wait(10)
        queued = _submit(c, "queued")
        r = c.delete(f"/v1/jobs/{queued['id']}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        r = c.delete(f"/v1/jobs/{running['id']}")
        assert r.json()["state"] == "running" and r.json()["cancel_requested"]
        gated.gate.set()  # the running job takes its next step, sees the cancel and stops
        assert wait_job(c, running["id"])["state"] == "cancelled"
        assert gated.calls == ["running"], "a cancelled queued job never starts"
        after = _submit(c, "after")
        assert wait_job(c, after["id"])["state"] == "succeeded"
        assert c.delete("/v1/jobs/nope").status_code == 404


def test_finished_jobs_expire_after_ttl():
    with client(job_ttl=0.5) as c:
        job = _submit(c, "x", steps=1)
        assert wait_job(c, job["id"])["state"] == "succeeded"
        time.sleep(0.7)
        r = c.get(f"/v1/jobs/{job['id']}")
        assert r.status_code == 404 and "forgotten" in r.json()["detail"]


def test_disconnected_clients_jobs_complete_and_stay_retrievable():
    """A synchronous A1111 call whose client hangs up, and an event stream closed early: both jobs finish."""
    with live_server(config(job_ttl=60)) as (url, _app):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "gone", "steps": 30, "seed": 4,
                                                        "force_task_id": "task-gone"}, timeout=0.3)
        # the client is gone; the job goes on and its result can be fetched by the id it chose
        with httpx.Client(base_url=url, timeout=30) as c:
            job = wait_job(c, "task-gone")
            assert job["state"] == "succeeded" and job["images"][0]["seed"] == 4
            assert decode_png(job["images"][0]["image"]).size == (64, 64)

            job_id = c.post("/v1/generate", json={"prompt": "stream", "steps": 20}).json()["id"]
            with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # read one event, then hang up
            assert wait_job(c, job_id)["state"] == "succeeded"
            # a duplicate task id is refused, naming the field
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "force_task_id": "task-gone"})
            assert r.status_code == 422 and r.json()["field"] == "force_task_id"


# ---- the queue object itself --------------------------------------------------------------------------


def test_queue_unit_rules():
    q = JobQueue(["m"], max_pending=1, ttl=10)
    q.start()
    gate, order = threading.Event(), []

    def work(name):
        def run(job: Job):
            order.append(name)
            gate.wait(10)
            job.report(1, 1)
            return name
        return run

    first = q.submit("m", work("first"), job_id="first")
    while first.state != "running":
        time.sleep(0.005)
    q.submit("m", work("second"))
    with pytest.raises(QueueFull):
        q.submit("m", work("third"))
    with pytest.raises(KeyError):
        q.submit("other-model", work("x"))
    gate.set()
    while not first.done:
        time.sleep(0.005)
    with pytest.raises(ValueError, match="already in use"):
        q.submit("m", work("again"), job_id="first")
    assert first.state == SUCCEEDED and first.result == "first"
    gate.clear()
    blocker = q.submit("m", work("blocker"))
    while blocker.state != "running":
        time.sleep(0.005)
    waiting = q.submit("m", work("never"))
    threading.Timer(0.2, gate.set).start()
    q.stop()  # the running job is cancelled at its next report; the waiting one never starts
    assert blocker.state == CANCELLED and waiting.state == CANCELLED and "never" not in order


def test_job_changed_wakes_async_waiters_from_another_thread():
    job = Job(id="j", model="m", run=lambda j: None)

    async def main():
        t = threading.Timer(0.05, lambda: job.report(1, 2))
        t.start()
        v = await job.changed(job.version, timeout=5)
        assert v == 1 and job.step == 1
        assert await job.changed(v, timeout=0.05) == v  # times out without a change
    asyncio.run(main())


def test_one_worker_per_model_and_device():
    """`--device` repeated: each model is loaded once per device and each copy has its own worker, so two jobs
    for one model run at the same time; a job's images come from the copy that ran it."""
    from .conftest import GatedPipeline

    pipes = {}

    def load(name, device):
        pipes[device] = GatedPipeline()
        pipes[device].device = device
        return pipes[device]

    with client(loader=load, preview="none", devices=["cpu", "cpu:0"]) as c:
        assert sorted(pipes) == ["cpu", "cpu:0"]
        assert c.get("/v1/models").json()[0]["devices"] == ["cpu", "cpu:0"]
        a, b = _submit(c, "a"), _submit(c, "b")
        assert pipes["cpu"].entered.wait(10) and pipes["cpu:0"].entered.wait(10), "both devices took a job"
        states = {c.get(f"/v1/jobs/{j['id']}").json()["state"] for j in (a, b)}
        assert states == {"running"}
        for p in pipes.values():
            p.gate.set()
        assert [wait_job(c, j["id"])["state"] for j in (a, b)] == ["succeeded", "succeeded"]
        assert sorted(pipes["cpu"].calls + pipes["cpu:0"].calls) == ["a", "b"]
    with pytest.raises(ValueError, match="a device is listed twice"):
        with client(loader=load, devices=["cpu", "cpu"]):
            pass
