"""The README's main job, at small settings, through the real command line."""
import subprocess
import sys

import pytest

from pt2pass.cli import build_parser


def test_demo_help_lists_method_switches():
    text = build_parser().parse_args(["demo"]).__dict__
    assert text["order"] == "ssr" and text["n_calib"] == 32 and text["refine_rounds"] == 0


@pytest.mark.slow
def test_demo_runs_end_to_end_on_smollm2():
    done = subprocess.run(
        [sys.executable, "-m", "pt2pass", "demo", "--n-calib", "2", "--seqlen", "128",
         "--eval-windows", "2", "--new-tokens", "4", "--no-progress"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "perplexity before: ppl" in out and "perplexity after:  ppl" in out
    assert "2 windows × 128 tokens (254 predicted tokens)" in out
    assert "210 pt2pass.ternary_linear nodes" in out
    assert "210 ternary Linears" in out and "bits/weight all-in" in out
    assert "pt2pass.compile" in out and "total" in out
