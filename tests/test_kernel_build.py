"""Code generation: readable cached files, written only when changed, safe across processes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dfgen import __version__
from dfgen.kernels import build
from dfgen.kernels.config import default_config

KNOBS = dict(default_config(32).attn)


def test_cache_dir_is_versioned(tmp_path, monkeypatch):
    monkeypatch.setenv("DFGEN_CACHE_DIR", str(tmp_path))
    import triton

    folder = build.cache_dir()
    assert folder.parent == tmp_path
    assert f"v{__version__}" in folder.name and f"triton{triton.__version__}" in folder.name


def test_emit_writes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DFGEN_CACHE_DIR", str(tmp_path))
    path, text = build.emit(build.specialize("attn_fwd", torch.float16, 32, KNOBS))
    assert path.name == "attn_fwd__fp16_d32__m64_n64_s3_w4.py" or path.name.startswith("attn_fwd__fp16_d32__")
    assert path.read_text() == text == build.render(build.specialize("attn_fwd", "fp16", 32, KNOBS))
    os.utime(path, (1, 1))
    assert build.write_if_changed(path, text) is False
    assert path.stat().st_mtime == 1  # untouched
    assert build.write_if_changed(path, text + "# changed\n") is True
    assert path.read_text().endswith("# changed\n")
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_load_caches_the_module(tmp_path, monkeypatch):
    monkeypatch.setenv("DFGEN_CACHE_DIR", str(tmp_path))
    first = build.load("attn_fwd", torch.float32, 32, KNOBS)
    assert build.load("attn_fwd", torch.float32, 32, KNOBS) is first
    assert first.LAUNCH == dict(num_warps=KNOBS["num_warps"], num_stages=KNOBS["num_stages"])
    assert callable(first.launch)


def test_two_processes_render_at_once(tmp_path):
    """Both processes write and import the same file; neither sees a partial one."""
    script = textwrap.dedent("""
        import torch
        from dfgen.kernels import build
        from dfgen.kernels.config import default_config
        for _ in range(20):
            build._loaded.clear()
            path, text = build.emit(build.specialize("solve_fwd", torch.bfloat16, 64, default_config(64).solve))
            assert path.read_text() == text
        module = build.load("solve_fwd", torch.bfloat16, 64, default_config(64).solve)
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
        source = build.render(build.specialize(stage, "bf16", 32, knobs))
        assert "ld.acquire.gpu.global.b32" in source and "PTX_WAIT=_ptx_wait(q)" in source
        assert "ld.relaxed.gpu.global.b32" in source and "fence.acq_rel.gpu" in source
        module = build.load(stage, torch.bfloat16, 32, knobs)
        assert module._ptx_wait(torch.zeros(1)) is False
        if torch.cuda.is_available() and torch.version.hip is None:
            assert module._ptx_wait(torch.zeros(1, device="cuda")) is (os.environ.get("TRITON_INTERPRET") != "1")


# -- only what dfgen rendered runs; an unusable cache folder falls back -----------------

def _fresh_load(monkeypatch, cache, stage="attn_fwd", dtype=torch.float32, knobs=KNOBS):
    """build.load as a new process would run it (no module loaded yet) under `cache`."""
    monkeypatch.setenv("DFGEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_by_key", {})
    return build.load(stage, dtype, 32, knobs)


def _run_attn(module):
    """Run an attn_fwd module once (interpreter or GPU): its output, which must be finite."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, u = (torch.randn(1, 16, 1, 32, device=dev) for _ in range(3))
    o = torch.empty_like(u)
    module.launch(q, k, u, o, 32 ** -0.5)
    assert torch.isfinite(o).all()
    return o


def test_a_planted_pyc_beside_the_source_does_not_run(tmp_path, monkeypatch):
    """A .pyc in __pycache__ that matches the cached .py's mtime and size (what importlib's
    file loader checks) must not run: the module is built from the rendered text."""
    import importlib.util
    import importlib._bootstrap_external as bootstrap

    monkeypatch.setenv("DFGEN_CACHE_DIR", str(tmp_path))
    path, _ = build.emit(build.specialize("attn_fwd", torch.float32, 32, KNOBS))
    stat = path.stat()
    planted = compile("raise RuntimeError('planted pyc ran')\n", str(path), "exec")
    pyc = Path(importlib.util.cache_from_source(str(path)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(bootstrap._code_to_timestamp_pyc(planted, stat.st_mtime, stat.st_size))
    module = _fresh_load(monkeypatch, tmp_path)
    assert module.__file__ == str(path) and callable(module.launch)
    _run_attn(module)
    assert sorted(p.name for p in pyc.parent.iterdir()) == [pyc.name]  # no .pyc written


def test_a_changed_or_corrupt_source_is_rewritten_and_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DFGEN_CACHE_DIR", str(tmp_path))
    path, text = build.emit(build.specialize("attn_fwd", torch.float32, 32, KNOBS))
    path.write_text(text + "\nraise RuntimeError('tampered source ran')\n")
    _fresh_load(monkeypatch, tmp_path)
    assert path.read_text() == text
    path.write_bytes(b"\xff\xfe not utf-8 \x80\n")  # write_if_changed must not crash on it
    _run_attn(_fresh_load(monkeypatch, tmp_path))
    assert path.read_text() == text


def test_kernel_source_stays_the_rendered_text_when_the_file_changes_later(tmp_path, monkeypatch):
    """Triton reads kernel sources through inspect/linecache: a file edited after the load
    (and linecache.checkcache, which drops stale entries) must not change what they see."""
    import inspect
    import linecache

    module = _fresh_load(monkeypatch, tmp_path)
    path = Path(module.__file__)
    before = inspect.getsource(module.launch)
    path.write_text("# replaced\n" * 400)
    linecache.checkcache()
    assert inspect.getsource(module.launch) == before
    path.unlink()
    linecache.checkcache()
    assert inspect.getsource(module.launch) == before
    _run_attn(module)


@pytest.mark.parametrize("how", ["parent_is_a_file", "is_a_file", "not_writable"])
def test_an_unusable_cache_folder_falls_back_with_one_warning(tmp_path, monkeypatch, how):
    """Real as root too: a path under a regular file cannot be created by anyone; the
    unwritable case patches the write (chmod does not stop root)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = {"parent_is_a_file": blocker / "cache", "is_a_file": blocker,
             "not_writable": tmp_path / "ro"}[how]
    if how == "not_writable":
        real = build.atomic_write_text

        def refuse(path, text):
            if Path(path).is_relative_to(cache):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, text)

        monkeypatch.setattr(build, "atomic_write_text", refuse)
    monkeypatch.setattr(build, "_private_root", None)
    monkeypatch.setattr(build, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="cannot write the kernel cache folder") as caught:
        first = _fresh_load(monkeypatch, cache)
        other = build.load("attn_fwd", torch.float16, 32, KNOBS)  # a second file
    assert len([w for w in caught if "kernel cache" in str(w.message)]) == 1
    assert Path(first.__file__).is_file() and not Path(first.__file__).is_relative_to(cache)
    assert Path(first.__file__).parent == Path(other.__file__).parent
    _run_attn(first)
