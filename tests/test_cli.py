"""The dfgen command, run as a user runs it (a subprocess), without a GPU in the interpreter."""

import ast
import subprocess

import torch
from dfgen.kernels.decode import default_decode_knobs
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
    from dfgen.select.gpu import gpu_key

    here = gpu_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu-interpreter"
    out = dfgen("tune", "--gpu", here, "--try", str(bad), "--out", str(tmp_path / "t.yaml"),
                "--storage", str(tmp_path / "s.journal"))
    assert out.returncode != 0 and "must hold a config mapping or a list of them" in out.stderr
    assert not (tmp_path / "t.yaml").exists()


def test_show_and_check_with_a_user_tuned_folder(tmp_path, monkeypatch):
    """A tuned file in DFGEN_TUNED_DIR for the device here (the interpreter on a CPU
    machine): `dfgen show` resolves its entries to it, `dfgen check` validates them."""
    from dfgen.select import tuned_file
    from dfgen.kernels.config import default_config
    from dfgen.select.gpu import gpu_key

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
    # an inaccurate entry (a bfloat16 solve of float32 inputs) fails the check: exit code 1
    bad = dict(cfg, solve=dict(cfg["solve"], SOLVE_PRECISION="bf16", INV_FP16=True))
    tuned_file.merge(tmp_path / f"{key}.yaml", {"gpu": key}, {"fwd/fp32/d32/t40/bh8": {
        "pass": "fwd", "dtype": "fp32", "head_dim": 32, "T": 40, "BH": 8, "config": bad}})
    out = dfgen("check", "--max-t", "40")
    assert out.returncode == 1 and "FAIL fwd/fp32/d32/t40/bh8: relative error" in out.stdout
    # the merge kept the first entry from another triton: show says so
    out = dfgen("show")
    line = next(line for line in out.stdout.splitlines() if "fwd/fp32/d32/t40/bh2 ->" in line)
    assert "[tuned with triton 0.0.1 (now " in line and line.endswith("; unchecked]")
    # --record keeps each result in the file: the passed stale entry serves without a
    # warning, the failed one is served by the default from then on
    out = dfgen("check", "--max-t", "40", "--record")
    assert out.returncode == 1 and f"recorded in {tmp_path / (key + '.yaml')}" in out.stdout
    entries = tuned_file.read(tmp_path / f"{key}.yaml")["entries"]
    assert entries["fwd/fp32/d32/t40/bh2"]["checked"]["passed"] is True
    assert entries["fwd/fp32/d32/t40/bh8"]["checked"]["passed"] is False
    out = dfgen("show")
    assert "; `dfgen check` passed it here]" in out.stdout
    assert "fwd/fp32/d32/t40/bh8 -> built-in default" in out.stdout
    assert "unchecked" not in out.stdout and "UserWarning" not in out.stderr


def _no_traceback(out):
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]


def test_show_and_check_survive_an_unreadable_tuned_file(tmp_path):
    """This device's tuned file nested 10000 lists deep (RecursionError in the loader):
    show and check report it in one line; DFGEN_STRICT=1 makes it an error, exit 2."""
    import os

    from dfgen.select.gpu import gpu_key

    key = gpu_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu-interpreter"
    (tmp_path / f"{key}.yaml").write_text("entries: " + "[" * 10000 + "]" * 10000 + "\n")
    env = dict(os.environ, DFGEN_TUNED_DIR=str(tmp_path))
    out = subprocess.run(dfgen_command() + ["show"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    _no_traceback(out)
    assert "skipped (unusable):" in out.stdout and "nested too deeply" in out.stdout
    # served by the next file the runtime searches (the packaged one, for an H200) or the
    # built-in defaults, never by the broken file
    assert f"tuned file: {tmp_path}" not in out.stdout
    assert "built-in defaults" in out.stdout or "tuned file: " in out.stdout
    out = subprocess.run(dfgen_command() + ["check"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and "FAIL" in out.stdout and "nested too deeply" in out.stdout
    _no_traceback(out)
    env["DFGEN_STRICT"] = "1"
    for command in ("show", "check"):
        out = subprocess.run(dfgen_command() + [command], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        _no_traceback(out)
        assert out.stderr.strip().count("\n") == 0 and "nested too deeply" in out.stderr


def _one_line_error(out, *needles):
    """Exit code 2, no traceback, one line on stderr naming what is wrong."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    _no_traceback(out)
    assert out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    for needle in needles:
        assert needle in out.stderr, out.stderr


def test_bad_bench_arguments_are_one_line_errors(tmp_path):
    for shapes in ("1,20,1", "a,20,1,32", "1,20,1,32;", "0,20,1,32", ""):
        _one_line_error(dfgen("bench", "--shapes", shapes, "--no-fla"), "--shapes")
    _one_line_error(dfgen("bench", "--shapes", "1,20,1,48", "--no-fla"), "head dim 48", "16, 32, 64, 128")
    _one_line_error(dfgen("bench", "--configs", str(tmp_path / "nope.yaml")), "--configs", "nope.yaml")
    (tmp_path / "bad.yaml").write_text("solve: [unclosed\n")
    _one_line_error(dfgen("bench", "--configs", str(tmp_path / "bad.yaml")), "bad.yaml", "YAML")
    (tmp_path / "bin.yaml").write_bytes(b"solve: {CHUNK: \xff}\n")
    _one_line_error(dfgen("bench", "--configs", str(tmp_path / "bin.yaml")), "bin.yaml")


def test_emit_refuses_an_unsupported_head_dim():
    _one_line_error(dfgen("emit", "--head-dim", "48"), "--head-dim 48", "16, 32, 64, 128")


def test_emit_prints_every_stage_and_each_one_alone():
    out = dfgen("emit", "--dtype", "fp32", "--head-dim", "64")
    assert out.returncode == 0, out.stderr[-2000:]
    ast.parse(out.stdout)
    headers = [line for line in out.stdout.splitlines() if line.startswith("# dfgen emit:")]
    assert [h.split()[3].rstrip(",") for h in headers] == ["solve_fwd", "attn_fwd", "solve_bwd",
                                                           "attn_bwd", "decode"]
    assert "SOLVE_PRECISION=tf32x3" in headers[0]  # float32's default, not bf16's
    fp32_decode = default_decode_knobs(64, torch.float32)["BLOCK_N"]
    assert fp32_decode != default_decode_knobs(64, torch.bfloat16)["BLOCK_N"]
    assert f"BLOCK_N={fp32_decode}" in headers[4]  # the decode step's float32 default, not bf16's
    for stage in ("solve_fwd", "attn_fwd", "solve_bwd", "attn_bwd"):
        assert f"def {stage}_kernel" in out.stdout or f"{stage}" in out.stdout
    assert "def decode_sweep_kernel" in out.stdout and "def decode_finish_kernel" in out.stdout
    for stage, knob in (("solve_bwd", "CHUNK=32"), ("attn_bwd", "BLOCK_N=32"), ("decode", "BLOCK_N=32")):
        one = dfgen("emit", "--stage", stage, "--head-dim", "64", "--set", knob)
        assert one.returncode == 0, one.stderr[-2000:]
        assert f"{knob.split('=')[0]}: tl.constexpr = 32" in one.stdout
        assert "# dfgen emit:" not in one.stdout
    narrow = dfgen("emit", "--stage", "solve_fwd", "--dtype", "bf16", "--head-dim", "16")
    assert narrow.returncode == 0, narrow.stderr[-2000:]
    assert "HEAD_DIM = 32" in narrow.stdout and "head-dim-32 kernels" in narrow.stderr  # what runs
    _one_line_error(dfgen("emit", "--set", "CHUNK=32"), "--set needs --stage")
    _one_line_error(dfgen("emit", "--stage", "solve_bwd", "--set", "CHUNK"), "NAME=VALUE")


def test_show_prints_the_default_config():
    import yaml

    from dfgen.kernels.config import KernelConfig, default_config

    out = dfgen("show", "--default", "--head-dim", "64", "--dtype", "bf16")
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed == default_config(64, torch.bfloat16).to_dict()
    assert KernelConfig.from_dict(printed).check(64, backward=True)
    _one_line_error(dfgen("show", "--default", "--head-dim", "48"), "--head-dim 48")


def test_bench_refuses_gpu_sizes_in_the_interpreter():
    """Without a GPU a GPU-sized shape would run for hours in the interpreter: refused
    at once, naming the limit and --force; the interpreter's own shapes fit under it."""
    import time

    from dfgen.tools.arguments import CPU_MAX_WORK, CPU_SHAPES

    assert all(B * H * T * T * D <= CPU_MAX_WORK for B, T, H, D in CPU_SHAPES)
    if torch.cuda.is_available():
        return
    started = time.perf_counter()
    out = dfgen("bench", "--shapes", "1,20,1,32;1,4096,16,128", "--no-fla")
    assert time.perf_counter() - started < 60
    _one_line_error(out, "1,4096,16,128", str(CPU_MAX_WORK), "--force")


def test_a_reader_that_leaves_early_is_no_error():
    """`dfgen show | head -n 3`: a pipe whose reader is gone ends the command quietly,
    exit 0 (here the reader is gone before the first write)."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(dfgen_command() + ["emit"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, cwd=_scratch(), timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower() and "Traceback" not in proc.stderr, proc.stderr


def test_check_records_into_a_copy_when_the_file_is_packaged(tmp_path, monkeypatch):
    """`dfgen check --record` never writes inside the installed package: a packaged file's
    results go to a copy in the user's tuned folder (searched first)."""
    from dfgen.settings import packaged_dir, user_tuned_dir
    from dfgen.tools.cli import _record_target

    monkeypatch.setenv("DFGEN_TUNED_DIR", str(tmp_path))
    packaged = packaged_dir("tuned") / "h200.yaml"
    assert _record_target(packaged, "h200") == user_tuned_dir() / "h200.yaml" == tmp_path / "h200.yaml"
    mine = tmp_path / "other" / "h200.yaml"
    mine.parent.mkdir()
    mine.write_text("")
    assert _record_target(mine, "h200") == mine


def test_show_and_check_list_and_check_a_decode_entry(tmp_path, monkeypatch):
    """A decode entry in this device's tuned file: `dfgen show` lists it with its knobs,
    `dfgen check` runs decoding steps under them against the reference and passes them,
    and --record keeps the result under the decode template's hash."""
    from dfgen.select import tuned_file
    from dfgen.select.gpu import gpu_key

    key = gpu_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu-interpreter"
    path = tmp_path / f"{key}.yaml"
    knobs = {"BLOCK_M": 16, "BLOCK_N": 16, "MIN_PROGRAMS": 1024, "num_warps": 2, "num_stages": 2}
    tuned_file.merge(path, {"gpu": key}, {"decode/fp32/d32/t64/bh2": {
        "pass": "decode", "dtype": "fp32", "head_dim": 32, "T": 64, "BH": 2,
        "config": {"decode": knobs}, "median_ms": 1.0, "default_ms": 1.5,
        "tuned_with": {"templates": tuned_file.templates_of("decode")}}})
    monkeypatch.setenv("DFGEN_TUNED_DIR", str(tmp_path))
    out = dfgen("show")
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "decode/fp32/d32/t64/bh2 ->" in line)
    assert "[decode/fp32/d32/t64/bh2]" in line and "BLOCK_N=16" in line and "MIN_PROGRAMS=1024" in line
    out = dfgen("check", "--record")
    assert out.returncode == 0, out.stdout + out.stderr
    # the bucket's 64 tokens as the device's check caps them, less those the steps add
    from dfgen.tools.check import DECODE_STEPS, check_length
    tokens = check_length(64, torch.device("cuda" if torch.cuda.is_available() else "cpu")) - sum(DECODE_STEPS)
    assert "PASS decode/fp32/d32/t64/bh2: relative error" in out.stdout and \
        f"a cache of {tokens} tokens" in out.stdout and "1 passed, 0 failed" in out.stdout
    checked = tuned_file.read(path)["entries"]["decode/fp32/d32/t64/bh2"]["checked"]
    assert checked["passed"] is True and checked["templates"] == tuned_file.templates_of("decode")
    assert "`dfgen check` passed it here" in dfgen("show").stdout
