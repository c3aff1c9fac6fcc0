"""Render a stage for one config to a Python file in a versioned cache folder and import it.

The file name is the specialization's readable name (stage, dtype, head dim, knobs), so
`ls` of the cache shows what was built. A file is written only when its text changed,
through a temporary file and an atomic rename, so two processes rendering at once both
end with the same complete file. Loading is: lock, look again, render, write, then build
the module from the rendered text itself (never from the file or a .pyc beside it: only
what dfgen rendered runs). A cache folder that cannot be written falls back to a private
temporary folder, with one warning per process.
"""

from __future__ import annotations

import linecache
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from . import __version__
from .files import atomic_write_text
from .templating import render, specialization_name, templates_hash

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}  # by specialization name
_by_key: dict[tuple, ModuleType] = {}  # by (stage, dtype, head dim, knobs): the per-call path
_private_root: Path | None = None  # the fallback cache folder of this process, once needed
_warned_fallback = False


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
    """Atomically write `text` to `path` unless it already holds it. True if written. A file
    that is not valid UTF-8 (corrupt) is rewritten like one that holds other text."""
    try:
        if path.read_bytes().decode("utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True


def source_path(stage: str, dtype, head_dim: int, knobs: Mapping[str, Any]) -> Path:
    return cache_dir() / (specialization_name(stage, dtype, head_dim, knobs) + ".py")


def emit(stage: str, dtype, head_dim: int, knobs: Mapping[str, Any]) -> tuple[Path, str]:
    """Render and write the source of one specialization; returns (path, source). When the
    cache folder cannot be written (DFGEN_CACHE_DIR a file, read-only, no permission) the
    file goes to a private temporary folder instead (one warning per process)."""
    text = render(stage, dtype, head_dim, knobs)
    path = source_path(stage, dtype, head_dim, knobs)
    try:
        write_if_changed(path, text)
    except OSError as exc:
        path = _private_root_dir(exc) / path.parent.name / path.name
        try:
            write_if_changed(path, text)
        except OSError:
            pass  # the module is built from `text`; the file is only for people to read
    return path, text


def _private_root_dir(exc: OSError) -> Path:
    """This process's fallback cache folder (created, and warned about, once)."""
    global _private_root, _warned_fallback
    if _private_root is None:
        _private_root = Path(tempfile.mkdtemp(prefix="dfgen-cache-"))
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"dfgen: cannot write the kernel cache folder {cache_root()} "
                      f"({type(exc).__name__}: {exc}); using {_private_root} for this process "
                      "(set DFGEN_CACHE_DIR to a writable folder)", RuntimeWarning, stacklevel=3)
    return _private_root


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
            path, text = emit(stage, dtype, head_dim, knobs)
            module = _module_from_text(f"dfgen_generated.{name}", path, text)
            _loaded[name] = module
    _by_key[key] = module
    return module


def _module_from_text(module_name: str, path: Path, text: str) -> ModuleType:
    """A fresh module run from `text` (what dfgen rendered), its __file__ the cached path.
    No loader reads the file or a .pyc beside it, and no .pyc is written. Triton's jit
    reads each kernel's source through inspect, hence linecache: the text is registered
    there for `path` with no mtime, so linecache.checkcache keeps it even if the file
    changes or goes away later."""
    from .interpreter import patch_interpreter_if_active

    patch_interpreter_if_active()
    filename = str(path)
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    code = compile(text, filename, "exec", dont_inherit=True)
    module = ModuleType(module_name)
    module.__file__ = filename
    sys.modules[module_name] = module  # triton's jit reads the source through the module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
