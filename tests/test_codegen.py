"""Code generation: readable cached files, written only when changed, safe across processes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from dfgen import __version__, codegen
from dfgen.config import default_config
from dfgen.templating import render

KNOBS = dict(default_config(32).attn)


def test_cache_dir_is_versioned(tmp_path, monkeypatch):
    monkeypatch.setenv("DFGEN_CACHE_DIR", str(tmp_path))
    import triton

    folder = codegen.cache_dir()
    assert folder.parent == tmp_path
    assert f"v{__version__}" in folder.name and f"triton{triton.__version__}" in folder.name


def test_emit_writes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DFGEN_CACHE_DIR", str(tmp_path))
    path, text = codegen.emit("attn_fwd", torch.float16, 32, KNOBS)
    assert path.name == "attn_fwd__fp16_d32__m64_n64_s3_w4.py" or path.name.startswith("attn_fwd__fp16_d32__")
    assert path.read_text() == text == render("attn_fwd", "fp16", 32, KNOBS)
    os.utime(path, (1, 1))
    assert codegen.write_if_changed(path, text) is False
    assert path.stat().st_mtime == 1  # untouched
    assert codegen.write_if_changed(path, text + "# changed\n") is True
    assert path.read_text().endswith("# changed\n")
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_load_caches_the_module(tmp_path, monkeypatch):
    monkeypatch.setenv("DFGEN_CACHE_DIR", str(tmp_path))
    first = codegen.load("attn_fwd", torch.float32, 32, KNOBS)
    assert codegen.load("attn_fwd", torch.float32, 32, KNOBS) is first
    assert first.LAUNCH == dict(num_warps=KNOBS["num_warps"], num_stages=KNOBS["num_stages"])
    assert callable(first.launch)


def test_two_processes_render_at_once(tmp_path):
    """Both processes write and import the same file; neither sees a partial one."""
    script = textwrap.dedent("""
        import torch
        from dfgen import codegen
        from dfgen.config import default_config
        for _ in range(20):
            codegen._loaded.clear()
            path, text = codegen.emit("solve_fwd", torch.bfloat16, 64, default_config(64).solve)
            assert path.read_text() == text
        module = codegen.load("solve_fwd", torch.bfloat16, 64, default_config(64).solve)
        print(module.__file__)
    """)
    env = dict(os.environ, DFGEN_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
    assert outs[0][0] == outs[1][0]
    files = list(Path(outs[0][0].strip()).parent.iterdir())
    assert len([f for f in files if f.suffix == ".py"]) == 1
    assert not [f for f in files if f.suffix == ".tmp"]


def test_waits_use_inline_ptx_only_on_nvidia_gpus():
    """The wavefront kernels poll flags with ld.acquire.gpu (inline PTX) on an NVIDIA GPU and
    take the portable atomic path elsewhere (Triton's interpreter runs no inline asm)."""
    for stage, knobs in (("solve_fwd", default_config(32).solve), ("solve_bwd", default_config(32).solve_bwd)):
        source = render(stage, "bf16", 32, knobs)
        assert "ld.acquire.gpu.global.b32" in source and "PTX_WAIT=_ptx_wait(q)" in source
        assert "ld.relaxed.gpu.global.b32" in source and "fence.acq_rel.gpu" in source
        module = codegen.load(stage, torch.bfloat16, 32, knobs)
        assert module._ptx_wait(torch.zeros(1)) is False
        if torch.cuda.is_available() and torch.version.hip is None:
            assert module._ptx_wait(torch.zeros(1, device="cuda")) is (os.environ.get("TRITON_INTERPRET") != "1")
