"""Smoke test of benchmarks/gpu.py: its tiny CPU mode runs every section and prints a number for ours in each.

The benchmark itself is meant for one H100/H200; here it runs the tiny preset at 64 px on the CPU with
--strict, so any exception in a section (API drift, a renamed attribute) fails this test instead of becoming a
'failed: ...' cell."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _rows(stdout: str) -> dict[str, list[list[str]]]:
    """Table rows '(x) | metric | ours | diffusers | ratio | target | met', grouped by section letter."""
    rows: dict[str, list[list[str]]] = {}
    for line in stdout.splitlines():
        if len(line) > 3 and line[0] == "(" and line[2] == ")" and "|" in line:
            cells = [c.strip() for c in line.split("|")]
            rows.setdefault(line[1], []).append(cells)
    return rows


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def test_gpu_benchmark_tiny_cpu(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--strict", "--no-compile",
           "--out", str(tmp_path / "weights"), "--json", str(tmp_path / "table.json")]
    if importlib.util.find_spec("diffusers") is None:
        cmd.append("--skip-diffusers")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-6000:]}"
    rows = _rows(out.stdout)
    for sec in "abcd":
        assert rows.get(sec), f"no ({sec}) row in the table:\n{out.stdout}"
        numbers = []
        for cells in rows[sec]:
            ours = cells[2]
            value = _number(ours)
            if value is None:  # only these may stand in our column on the CPU with --no-compile
                assert ours == "n/a" or ours.startswith("skipped"), f"({sec}) {cells[1]}: ours = {ours!r}"
            else:
                assert math.isfinite(value), f"({sec}) {cells[1]}: ours = {ours!r}"
                numbers.append(value)
        assert numbers, f"({sec}): no number in our column:\n{out.stdout}"
    assert "failed" not in out.stdout
    assert (tmp_path / "table.json").exists()
