"""Render a stage for one config to a Python file in a versioned cache folder and import it.

The file name is the specialization's readable name (stage, dtype, head dim, knobs), so
`ls` of the cache shows what was built. A file is written only when its text changed,
through a temporary file and an atomic rename, so two processes rendering at once both
end with the same complete file. Loading is: lock, look again, render, import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from . import __version__
from .files import atomic_write_text
from .templating import render, specialization_name, templates_hash

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}  # by specialization name
_by_key: dict[tuple, ModuleType] = {}  # by (stage, dtype, head dim, knobs): the per-call path


def cache_root() -> Path:
    """DFGEN_CACHE_DIR, else $XDG_CACHE_HOME/dfgen, else ~/.cache/dfgen."""
    env = os.environ.get("DFGEN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dfgen"


def cache_dir() -> Path:
    """Folder of this dfgen version, triton version and template text."""
    import triton

    return cache_root() / f"v{__version__}-triton{triton.__version__}-t{templates_hash()}"


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically write `text` to `path` unless it already holds it. True if written."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    atomic_write_text(path, text)
    return True


def source_path(stage: str, dtype, head_dim: int, knobs: Mapping[str, Any]) -> Path:
    return cache_dir() / (specialization_name(stage, dtype, head_dim, knobs) + ".py")


def emit(stage: str, dtype, head_dim: int, knobs: Mapping[str, Any]) -> tuple[Path, str]:
    """Render and write the source of one specialization; returns (path, source)."""
    text = render(stage, dtype, head_dim, knobs)
    path = source_path(stage, dtype, head_dim, knobs)
    write_if_changed(path, text)
    return path, text


def load(stage: str, dtype, head_dim: int, knobs: Mapping[str, Any]) -> ModuleType:
    """The imported module of one specialization (rendered and written on first use)."""
    key = (stage, dtype, head_dim, tuple(sorted(knobs.items())))
    module = _by_key.get(key)
    if module is not None:
        return module
    name = specialization_name(stage, dtype, head_dim, knobs)
    module = _loaded.get(name)
    if module is not None:
        return module
    with _lock:
        module = _loaded.get(name)
        if module is None:
            path, _ = emit(stage, dtype, head_dim, knobs)
            module = _import_file(f"dfgen_generated.{name}", path)
            _loaded[name] = module
    _by_key[key] = module
    return module


def _import_file(module_name: str, path: Path) -> ModuleType:
    from .interpreter import patch_interpreter_if_active

    patch_interpreter_if_active()
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton's jit reads the source through the module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
