"""Memory admission: the estimate bounds the measured peak, requests are fitted or refused, and a real server
under a small --max-memory answers a flood of oversized requests with 4xx while valid jobs complete."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from stablexl.config import PRESETS
from stablexl.request import GenerationRequest, resolve
from stablexl.serve.admission import MemoryBudget, estimate, fit, parse_bytes
from stablexl.serve.generation import InputError

from .test_shutdown import _port, _start

CHILD = r"""
import json, sys, torch
from stablexl.pipeline import Pipeline
name, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
pipe = Pipeline.from_pretrained(name, device="cpu", dtype="fp32")
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
pipe("a red apple", steps=2, cfg=5.0, seed=1, width=size, height=size, batch=batch)
print(json.dumps({"grew": status("VmHWM") - base}))
"""


@pytest.mark.parametrize("name,size,batch", [("tiny-sdxl", 64, 1), ("tiny-sdxl", 256, 2), ("tiny-sdxl", 384, 1),
                                             ("mini", 64, 4), ("mini", 192, 2)])
def test_estimate_bounds_the_measured_peak(name, size, batch):
    out = subprocess.run([sys.executable, "-c", CHILD, name, str(size), str(batch)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    grew = json.loads(out.stdout.strip().splitlines()[-1])["grew"]
    req = resolve(GenerationRequest("a red apple", steps=2, seed=1, width=size, height=size, batch=batch), PRESETS[name])
    est = estimate(req, PRESETS[name]).peak
    print(f"{name} {size}^2 x{batch}: measured +{grew / 2**20:.1f} MiB, estimated {est / 2**20:.1f} MiB")
    assert grew <= est, "the estimate must bound the measured peak"
    assert est <= 2.5 * grew + 96 * 2**20, "and not be uselessly loose (96 MiB: the fixed first-use allowance + noise)"


def test_fit_splits_batches_tiles_the_vae_or_refuses():
    cfg = PRESETS["tiny-sdxl"]
    req = resolve(GenerationRequest("x", steps=2, seed=5, width=512, height=512, batch=4), cfg)
    one = estimate(req.replace(batch=1), cfg).peak
    assert fit(req, cfg, None) is req and fit(req, cfg, 10 * estimate(req, cfg).peak) is req
    split = fit(req, cfg, int(one * 1.05))
    assert split.batch * split.iterations == 4 and split.batch < 4
    assert [s for it in range(split.iterations) for s in split.seeds(it)] == [5, 6, 7, 8], "same seeds"
    tiny_budget = estimate(req.replace(batch=1, vae_tile=32), cfg).peak
    tiled = fit(req, cfg, tiny_budget)
    assert tiled.vae_tile == 32 and tiled.batch == 1 and tiled.iterations == 4
    small = estimate(req.replace(width=128, height=128, batch=1), cfg).peak
    with pytest.raises(InputError) as e:
        fit(req, cfg, small)
    assert e.value.status == 413 and "--max-memory" in e.value.message
    side = int(e.value.message.rsplit("is ", 1)[1].split("x")[0])
    assert 128 <= side < 512 and estimate(req.replace(width=side, height=side, batch=1), cfg).peak <= small
    with pytest.raises(InputError, match="even the smallest size does not fit"):
        fit(req, cfg, 2**20)


def test_budget_reservations_wait_for_each_other():
    import threading

    b = MemoryBudget(100)
    order = []
    with b.reserve(70):
        t = threading.Thread(target=lambda: b.reserve(50).__enter__() or order.append("second"))
        t.start()
        time.sleep(0.2)
        assert order == [] and b.used == 70  # waits while the first holds its share
    t.join(5)
    assert order == ["second"]
    assert parse_bytes("1.5G") == int(1.5 * 2**30) and parse_bytes("512M") == 512 * 2**20


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def test_flood_of_oversized_requests_under_a_small_max_memory():
    """A real server whose --max-memory leaves ~250 MiB for jobs: oversized requests get 413 (none runs), large
    batches that fit when split complete, valid jobs complete, and the process's peak RSS stays under the limit."""
    port = _port()
    probe = _start(port)  # measure what the loaded server holds, to set a tight limit above it
    try:
        resident = _status(probe.pid, "VmRSS")
    finally:
        probe.send_signal(signal.SIGTERM)
        probe.wait(30)
    limit = resident + 250 * 2**20
    port = _port()
    proc = _start(port, "--max-memory", str(limit), "--max-width", "4096", "--max-height", "4096", "--max-batch", "8",
                  "--queue-size", "64", "--drain-grace", "0")
    try:
        base = f"http://127.0.0.1:{port}"
        oversized = [{"prompt": "big", "steps": 2, "width": 2048, "height": 2048, "batch": 8}] * 20 + \
                    [{"prompt": "big", "steps": 2, "width": 4096, "height": 4096}] * 10
        valid = [{"prompt": f"ok {i}", "steps": 2, "seed": i} for i in range(12)]
        splittable = [{"prompt": "split", "steps": 2, "width": 384, "height": 384, "batch": 4, "seed": 100}]

        def post(body):
            with httpx.Client(base_url=base, timeout=120) as c:
                r = c.post("/v1/generate", json=body)
                if r.status_code != 202:
                    return r.status_code, None
                job_id = r.json()["id"]
                while (j := c.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
                    time.sleep(0.05)
                return r.status_code, j

        with cf.ThreadPoolExecutor(16) as ex:
            results = list(ex.map(post, oversized + valid + splittable))
        big, ok, split = results[:30], results[30:42], results[42]
        assert {code for code, _ in big} == {413}, big
        assert all(code == 202 and j["state"] == "succeeded" and len(j["images"]) == 1 for code, j in ok)
        code, j = split
        assert code == 202 and j["state"] == "succeeded", j
        assert [im["seed"] for im in j["images"]] == [100, 101, 102, 103]
        assert j["settings"]["batch"] * j["settings"]["n_iter"] == 4
        peak = _status(proc.pid, "VmHWM")
        print(f"resident {resident / 2**20:.0f} MiB, limit {limit / 2**20:.0f} MiB, server peak {peak / 2**20:.0f} MiB")
        assert peak <= limit
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
