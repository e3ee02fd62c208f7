"""Import boundaries and entry points: loading the shipped miniature pulls in no training code, and
`python -m stablexl` runs the CLI."""

import subprocess
import sys

import stablexl

LOAD_MINI = """
import stablexl, sys
from stablexl.pipeline import Pipeline
p = Pipeline.from_pretrained('mini')
print('\\n'.join(sorted(m for m in sys.modules if m == 'stablexl.train' or m.startswith('stablexl.train.'))))
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_loading_the_miniature_imports_no_training_code():
    r = _run("-c", LOAD_MINI)
    assert r.returncode == 0, r.stderr
    offending = r.stdout.split()
    assert not offending, f"Pipeline.from_pretrained('mini') imported training modules: {', '.join(offending)}"


def test_python_dash_m_runs_the_cli():
    r = _run("-m", "stablexl", "--version")
    assert r.returncode == 0, r.stderr
    assert stablexl.__version__ in r.stdout
    r = _run("-m", "stablexl", "generate", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
