"""The dfgen command, run as a user runs it (a subprocess), without a GPU in the interpreter."""

import ast
import subprocess

import torch
from conftest import dfgen_command


def dfgen(*args, timeout=300, cwd=None):
    """The installed command, run from a folder of its own (not the checkout)."""
    return subprocess.run(dfgen_command() + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or _scratch())


def _scratch():
    import tempfile

    return tempfile.mkdtemp(prefix="dfgen-cli-")


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


def test_tune_refuses_a_bad_try_file(tmp_path):
    bad = tmp_path / "try.yaml"
    bad.write_text("[1, 2]\n")
    from dfgen.dispatch import gpu_key

    here = gpu_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu-interpreter"
    out = dfgen("tune", "--gpu", here, "--try", str(bad), "--out", str(tmp_path / "t.yaml"),
                "--storage", str(tmp_path / "s.journal"))
    assert out.returncode != 0 and "must hold a config mapping or a list of them" in out.stderr
    assert not (tmp_path / "t.yaml").exists()


def test_show_and_check_with_a_user_tuned_folder(tmp_path, monkeypatch):
    """A tuned file in DFGEN_TUNED_DIR for the device here (the interpreter on a CPU
    machine): `dfgen show` resolves its entries to it, `dfgen check` validates them."""
    from dfgen import tuned_file
    from dfgen.config import default_config
    from dfgen.dispatch import gpu_key

    key = gpu_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu-interpreter"
    cfg = default_config(32, torch.float32).to_dict()
    cfg["solve"] = dict(cfg["solve"], CHUNK=16, BLOCK_N=16, LOOKAHEAD=1)
    tuned_file.merge(tmp_path / f"{key}.yaml", {"gpu": key, "triton": "0.0.1"}, {"fwd/fp32/d32/t40/bh2": {
        "pass": "fwd", "dtype": "fp32", "head_dim": 32, "T": 40, "BH": 2, "config": cfg}})
    monkeypatch.setenv("DFGEN_TUNED_DIR", str(tmp_path))
    out = dfgen("show")
    assert out.returncode == 0, out.stderr
    assert f"tuned file: {tmp_path / (key + '.yaml')} (exact GPU)" in out.stdout
    assert "fwd/fp32/d32/t40/bh2 ->" in out.stdout and "CHUNK=16" in out.stdout
    out = dfgen("check", "--max-t", "40")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS fwd/fp32/d32/t40/bh2" in out.stdout and "1 passed, 0 failed" in out.stdout
    # a broken entry fails the check with a non-zero exit code
    bad = dict(cfg, solve=dict(cfg["solve"]))
    tuned_file.merge(tmp_path / f"{key}.yaml", {"gpu": key}, {"fwd/fp32/d48/t40/bh2": {
        "pass": "fwd", "dtype": "fp32", "head_dim": 48, "T": 40, "BH": 2, "config": bad}})
    out = dfgen("check", "--max-t", "40")
    assert out.returncode == 1 and "FAIL fwd/fp32/d48/t40/bh2" in out.stdout
    # the merge kept the first entry from another triton: show says so
    out = dfgen("show")
    assert "fwd/fp32/d32/t40/bh2 ->" in out.stdout and "[tuned with triton 0.0.1: checked" in out.stdout
