"""Load test of `stablexl serve`: N concurrent generation requests against a server in its own process.

Half go through the native job API (POST /v1/generate, then the job's event stream), half through the
synchronous A1111 route (POST /sdapi/v1/txt2img with force_task_id). Each request has its own seed. The
script checks that every request completes, that all job ids are distinct, and that each seed's image
comes back exactly once (read from the PNG's own infotext). It reports wall time, throughput, latency,
and the server's peak RSS (VmHWM in /proc/<pid>/status).

    .venv/bin/python benchmarks/serve_load.py --requests 50 --steps 4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))
    return kb / 1024


def _seed_of(b64_png: str) -> int:
    img = Image.open(io.BytesIO(base64.b64decode(b64_png)))
    return int(re.search(r"Seed: (\d+)", img.text["parameters"]).group(1))


async def _native(c: httpx.AsyncClient, seed: int, steps: int, size: int) -> tuple[str, list[int], float]:
    t0 = time.perf_counter()
    r = await c.post("/v1/generate", json={"prompt": f"load test {seed}", "seed": seed, "steps": steps,
                                           "width": size, "height": size})
    r.raise_for_status()
    job_id = r.json()["id"]
    final = None
    async with c.stream("GET", f"/v1/jobs/{job_id}/events", params={"preview": "false"}) as s:
        kind = None
        async for line in s.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "done":
                final = json.loads(line[6:])
    assert final is not None and final["state"] == "succeeded", final
    return job_id, [_seed_of(i["image"]) for i in final["images"]], time.perf_counter() - t0


async def _a1111(c: httpx.AsyncClient, seed: int, steps: int, size: int) -> tuple[str, list[int], float]:
    t0 = time.perf_counter()
    r = await c.post("/sdapi/v1/txt2img", json={"prompt": f"load test {seed}", "seed": seed, "steps": steps,
                                                "width": size, "height": size, "force_task_id": f"load-{seed}"})
    r.raise_for_status()
    body = r.json()
    return json.loads(body["info"])["job_id"], [_seed_of(i) for i in body["images"]], time.perf_counter() - t0


async def _fire(url: str, n: int, steps: int, size: int, key: str):
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as c:
        calls = [(_native if k % 2 == 0 else _a1111)(c, 1000 + k, steps, size) for k in range(n)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*calls, return_exceptions=True)
        return results, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default="tiny-sdxl")
    args = p.parse_args(argv)

    port, key = _free_port(), "load-test-key"
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tempfile.mkdtemp(prefix="serve_load_"), "server.log")
    cmd = [sys.executable, "-m", "stablexl.cli", "serve", "--model", args.model, "--port", str(port), "--api-key", key,
           "--queue-size", str(args.requests + 8), "--max-width", str(args.size), "--max-height", str(args.size)]
    with open(log_path, "w") as log:  # the child keeps its own handle
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        t_start = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{url}/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.perf_counter() - t_start > 120:
                with open(log_path) as f:
                    raise RuntimeError(f"server did not start:\n{f.read()[-3000:]}")
            time.sleep(0.2)
        startup = time.perf_counter() - t_start
        rss_idle = _vm_hwm_mb(server.pid)
        results, wall = asyncio.run(_fire(url, args.requests, args.steps, args.size, key))
        rss_peak = _vm_hwm_mb(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    failures = [r for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    ids = [job_id for job_id, _, _ in ok]
    seeds = sorted(s for _, got, _ in ok for s in got)
    expected = list(range(1000, 1000 + args.requests))
    latencies = sorted(t for _, _, t in ok)
    report = {
        "requests": args.requests, "completed": len(ok), "failed": len(failures),
        "distinct_job_ids": len(set(ids)), "seeds_match": seeds == expected,
        "wall_s": round(wall, 2), "images_per_s": round(len(seeds) / wall, 2),
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_max_s": round(latencies[-1], 2) if latencies else None,
        "server_startup_s": round(startup, 1), "server_rss_before_mb": round(rss_idle),
        "server_peak_rss_mb": round(rss_peak), "steps": args.steps, "size": args.size, "model": args.model,
    }
    print(f"{args.requests} concurrent requests ({args.model}, {args.size}x{args.size}, {args.steps} steps): "
          f"{len(ok)} completed, {len(failures)} failed, {len(set(ids))} distinct job ids, "
          f"each seed once: {seeds == expected}")
    print(f"wall {wall:.2f} s, {report['images_per_s']} images/s, latency median {report['latency_p50_s']} s, "
          f"max {report['latency_max_s']} s; server peak RSS {rss_peak:.0f} MB (after startup {rss_idle:.0f} MB)")
    for f in failures[:3]:
        print(f"failure: {type(f).__name__}: {f}")
    print(report)
    good = not failures and len(set(ids)) == args.requests and seeds == expected
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
