"""The examples run as written (the fast ones; quantize_and_generate loads SmolLM2: slow)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_compose_passes():
    out = _run("compose_passes.py")
    assert "LowerTernaryLinear   modified=True" in out
    assert "gathers folded: 1" in out
    assert out.count("pt2pass.ternary_linear.default") == 2


def test_export_and_reload():
    out = _run("export_and_reload.py")
    assert "14 pt2pass.ternary_linear nodes" in out
    lines = [line for line in out.splitlines() if line.startswith("tensor(")]
    assert len(lines) == 2 and lines[0] == lines[1].replace(" (in this process)", "")


@pytest.mark.slow
def test_quantize_and_generate():
    out = _run("quantize_and_generate.py")
    assert "KING HENRY" in out and "largest output error" in out
