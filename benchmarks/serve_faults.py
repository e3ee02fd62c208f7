"""Load and faults against a real `stablexl serve` process (the shipped miniature by default): N concurrent mixed
requests, then a SIGTERM with work in flight. One table: requests, completions, 4xx, 5xx, lost jobs, peak RSS.

The mix (of --requests N): 55 % valid generations (half native job API, half synchronous A1111 txt2img, each
its own seed), 20 % invalid (bad size, unknown sampler, unknown field, malformed JSON), 15 % oversized
(4096² x 8: not even one image fits --max-memory, so 413, never run;
smaller oversized batches would be split and run, see README), 10 % cancelled right after submission. Every
valid job must complete exactly once (each seed's image comes back once, read from its PNG infotext), every
invalid or oversized one must get a 4xx, nothing a 5xx. Then 8 more jobs are queued, SIGTERM is sent, and
the drain must finish them all and exit 0.

    .venv/bin/python benchmarks/serve_faults.py --requests 200 --steps 8
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
from PIL import Image


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _seed_of(png_b64: str) -> int:
    img = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    return int(re.search(r"Seed: (\d+)", img.text["parameters"]).group(1))


async def _native(c: httpx.AsyncClient, body: dict, cancel: bool = False) -> tuple[str, int, list[int]]:
    r = await c.post("/v1/generate", json=body)
    if r.status_code != 202:
        return "refused", r.status_code, []
    job_id = r.json()["id"]
    if cancel:
        await c.delete(f"/v1/jobs/{job_id}")
    while True:
        j = (await c.get(f"/v1/jobs/{job_id}", params={"preview": False})).json()
        if j["state"] not in ("queued", "running"):
            return j["state"], 202, [_seed_of(i["image"]) for i in j["images"]]
        await asyncio.sleep(0.1)


async def _a1111(c: httpx.AsyncClient, body: dict) -> tuple[str, int, list[int]]:
    r = await c.post("/sdapi/v1/txt2img", json=body)
    if r.status_code != 200:
        return "refused", r.status_code, []
    return "succeeded", 200, [_seed_of(i) for i in r.json()["images"]]


async def _raw(c: httpx.AsyncClient, content: bytes) -> tuple[str, int, list[int]]:
    r = await c.post("/v1/generate", content=content, headers={"content-type": "application/json"})
    return "refused", r.status_code, []


def _mix(n: int, steps: int):
    jobs = []
    for i in range(n):
        k = i % 20
        seed = 1000 + i
        if k < 11:  # valid
            if k % 2:
                jobs.append(("valid", seed, "a1111", {"prompt": "grinning face", "steps": steps, "seed": seed}))
            else:
                jobs.append(("valid", seed, "native", {"prompt": "rocket", "steps": steps, "seed": seed}))
        elif k < 15:  # invalid
            bad = [{"prompt": "x", "width": 65}, {"prompt": "x", "sampler": "Euler b"}, {"prompt": "x", "stpes": 3},
                   b'{"prompt": "x", "steps": '][k - 11]
            jobs.append(("invalid", None, "raw" if isinstance(bad, bytes) else "native", bad))
        elif k < 18:  # oversized
            jobs.append(("oversized", None, "native", {"prompt": "x", "steps": steps, "width": 4096, "height": 4096,
                                                         "batch": 8}))
        else:
            jobs.append(("cancelled", seed, "cancel", {"prompt": "star", "steps": steps, "seed": seed}))
    return jobs


async def _load(base: str, jobs) -> list:
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as c:
        calls = []
        for kind, seed, how, body in jobs:
            if how == "a1111":
                calls.append(_a1111(c, body))
            elif how == "raw":
                calls.append(_raw(c, body))
            else:
                calls.append(_native(c, body, cancel=how == "cancel"))
        return await asyncio.gather(*calls)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-memory", default="3G", help="the server's --max-memory (the oversized jobs must not fit)")
    a = ap.parse_args()
    port = _port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "stablexl", "serve", "--model", a.model, "--port", str(port),
                             "--preview", "none", "--queue-size", str(a.requests + 16), "--max-batch", "8",
                             "--max-width", "4096", "--max-height", "4096",
                             "--max-memory", a.max_memory, "--drain-grace", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/v1/server", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        resident = _status(proc.pid, "VmRSS")
        jobs = _mix(a.requests, a.steps)
        t0 = time.perf_counter()
        results = asyncio.run(_load(base, jobs))
        wall = time.perf_counter() - t0
        codes = [code for _, code, _ in results]
        valid = [(j, r) for j, r in zip(jobs, results) if j[0] == "valid"]
        seeds = [s for _, r in valid for s in r[2]]
        lost = sum(1 for j, r in valid if r[0] != "succeeded" or r[2] != [j[1]])
        refused_ok = sum(1 for j, r in zip(jobs, results) if j[0] in ("invalid", "oversized") and 400 <= r[1] < 500)
        oversized_413 = sum(1 for j, r in zip(jobs, results) if j[0] == "oversized" and r[1] == 413)
        cancelled = [r for j, r in zip(jobs, results) if j[0] == "cancelled"]
        cancel_ok = sum(1 for r in cancelled if r[0] == "cancelled" or (r[0] == "succeeded" and len(r[2]) == 1))
        peak = _status(proc.pid, "VmHWM")

        # drain: queue 8 jobs, SIGTERM, all must finish and the process exit 0
        with httpx.Client(base_url=base, timeout=60) as c:
            ids = [c.post("/v1/generate", json={"prompt": "moon", "steps": a.steps, "seed": 5000 + i}).json()["id"]
                   for i in range(8)]
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            after = c.post("/v1/generate", json={"prompt": "late", "steps": 2}).status_code
            states = []
            for job_id in ids:
                while (j := c.get(f"/v1/jobs/{job_id}", params={"preview": False}).json())["state"] in ("queued",
                                                                                                        "running"):
                    time.sleep(0.1)
                states.append(j["state"])
        code = proc.wait(timeout=120)

        rows = [
            ("requests", a.requests),
            ("valid: completed exactly once", f"{len(valid) - lost} / {len(valid)}"),
            ("valid: seeds returned twice", len(seeds) - len(set(seeds))),
            ("lost jobs", lost),
            ("invalid + oversized answered 4xx", f"{refused_ok} / {sum(1 for j in jobs if j[0] != 'valid' and j[0] != 'cancelled')}"),
            ("oversized answered 413", f"{oversized_413} / {sum(1 for j in jobs if j[0] == 'oversized')}"),
            ("cancelled: cancelled or finished once", f"{cancel_ok} / {len(cancelled)}"),
            ("5xx", sum(1 for c_ in codes if c_ >= 500)),
            ("wall time (s)", f"{wall:.1f}"),
            ("server RSS after loading (MiB)", f"{resident / 2**20:.0f}"),
            ("server peak RSS (MiB)", f"{peak / 2**20:.0f} (--max-memory {a.max_memory})"),
            ("SIGTERM: queued jobs finished", f"{states.count('succeeded')} / {len(ids)}"
                                              + ("" if len(set(states)) == 1 else f" ({', '.join(states)})")),
            ("SIGTERM: new job during drain", after),
            ("SIGTERM: exit code", code),
        ]
        w = max(len(k) for k, _ in rows)
        print(f"serve_faults: {a.model}, {a.steps} steps")
        for k, v in rows:
            print(f"  {k:<{w}}  {v}")
        ok = (lost == 0 and len(seeds) == len(set(seeds)) and all(c_ < 500 for c_ in codes) and code == 0
              and refused_ok == sum(1 for j in jobs if j[0] in ("invalid", "oversized")) and after == 503
              and states.count("succeeded") == len(ids))
        print(json.dumps({"ok": ok}))
        return 0 if ok else 1
    finally:
        if proc.poll() is None:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
