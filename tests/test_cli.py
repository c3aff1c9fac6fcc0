"""The dfgen command, run as a user runs it (a subprocess), without a GPU in the interpreter."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def dfgen(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dfgen.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_emit_prints_the_source():
    out = dfgen("emit", "--stage", "attn_fwd", "--dtype", "fp16", "--head-dim", "64",
                "--set", "BLOCK_M=32", "--set", "BLOCK_N=16")
    assert out.returncode == 0, out.stderr
    assert "BLOCK_M: tl.constexpr = 32" in out.stdout
    assert "BLOCK_N: tl.constexpr = 16" in out.stdout
    ast.parse(out.stdout)
    assert "cached as" in out.stderr


def test_emit_to_file(tmp_path):
    target = tmp_path / "solve.py"
    out = dfgen("emit", "--stage", "solve_fwd", "--head-dim", "128", "--out", str(target))
    assert out.returncode == 0, out.stderr
    assert "def solve_fwd_kernel(" in target.read_text()


def test_emit_rejects_a_bad_knob():
    out = dfgen("emit", "--stage", "solve_fwd", "--set", "CHUNK=7")
    assert out.returncode == 2
    assert "CHUNK=7 is not one of" in out.stderr


def test_bench_runs_the_pipeline():
    out = dfgen("bench", "--shapes", "1,20,1,32", "--no-fla")
    assert out.returncode == 0, out.stderr
    if torch.cuda.is_available():
        assert "device:" in out.stdout
    else:
        assert "NOT GPU TIMINGS" in out.stdout
    assert "| 1, 20, 1, 32 |" in out.stdout
