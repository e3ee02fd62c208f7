"""Shared by the benchmark scripts: run a measurement in a fresh Python process and read its result."""

from __future__ import annotations

import ast
import subprocess
import sys


def run_child(code: str, *args: str) -> dict:
    """Run `code` in a new interpreter (so peak RSS is its own); its last stdout line is a dict literal."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])
