"""Building a kernel: render a stage's template for one specialization (stage, dtype, head
dim, knob values), write the source to a versioned cache folder, and import it.

The file name is the specialization's readable name (stage, dtype, head dim, knobs), so
`ls` of the cache shows what was built; the name is built once per specialization. A file
is written only when its text changed, through a temporary file and an atomic rename, so
two processes rendering at once both end with the same complete file. Loading is: lock,
look again, render, write, then build the module from the rendered text itself (never
from the file or a .pyc beside it: only what dfgen rendered runs). A cache folder that
cannot be written falls back to a private temporary folder, with one warning per process.
"""

from __future__ import annotations

import functools
import linecache
import math
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Mapping

import jinja2

from ..version import __version__
from ..errors import ConfigError
from ..files import atomic_write_text
from ..settings import cache_root, dtype_name
from .interpreter import patch_interpreter_if_active
from .launcher import wrap_kernels
from .spec import ALL_STAGES, spec, templates_dir, templates_hash

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}  # by specialization name
_by_key: dict[tuple, ModuleType] = {}  # by (stage, dtype, head dim, knobs)
_by_section: dict[tuple, tuple] = {}  # by id of a config's read-only section (kept): the per-call path
_private_root: Path | None = None  # the fallback cache folder of this process, once needed
_warned_fallback = False


@dataclass(frozen=True)
class Specialization:
    """One kernel to build: a stage at a dtype ('bf16'), a head dim and every knob's value
    (checked against the template's spec, defaults filled in); `name` is its readable,
    unique name: cache key, file stem and module name."""
    stage: str
    dtype: str
    head_dim: int
    knobs: Mapping[str, Any]
    name: str


def specialize(stage: str, dtype, head_dim: int, knobs: Mapping[str, Any]) -> Specialization:
    """The Specialization of `stage` for these knobs; ConfigError if they do not fit its
    template (or the dtype is not one of float16, bfloat16, float32)."""
    tspec = spec(stage)
    tspec.check(knobs, head_dim)
    knobs = dict(tspec.complete(knobs))
    try:
        short = dtype_name(dtype)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    parts = [f"{tspec.knobs[k].abbr}{v}" for k, v in sorted(knobs.items())]
    return Specialization(stage, short, head_dim, knobs,
                          f"{stage}__{short}_d{head_dim}__" + "_".join(parts))


@functools.lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(kernel: Specialization) -> str:
    """The Triton source of one specialization: self-contained Python (what `dfgen emit`
    prints and what runs)."""
    context = dict(
        name=kernel.name,
        knobs=dict(kernel.knobs),
        dtype=kernel.dtype,
        head_dim=kernel.head_dim,
        # fp32 inputs keep fp32 accuracy in the attention products; fp16/bf16 use the MMA.
        dot_precision="tf32x3" if kernel.dtype == "fp32" else "tf32",
    )
    if "CHUNK" in kernel.knobs:
        context["log2_chunk"] = int(math.log2(kernel.knobs["CHUNK"]))
    return _environment().get_template(f"{kernel.stage}.py.jinja").render(**context)


def cache_dir() -> Path:
    """Folder of this dfgen version, triton version and template text."""
    import triton

    return cache_root() / f"v{__version__}-triton{triton.__version__}-t{templates_hash(ALL_STAGES)}"


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


def emit(kernel: Specialization) -> tuple[Path, str]:
    """Render and write the source of one specialization; returns (path, source). When the
    cache folder cannot be written (DFGEN_CACHE_DIR a file, read-only, no permission) the
    file goes to a private temporary folder instead (one warning per process)."""
    text = render(kernel)
    path = cache_dir() / f"{kernel.name}.py"
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
    """The imported module of one specialization (rendered and written on first use).
    After the first call the cost is one dictionary lookup (a config's section: by its
    identity, with no sort of its knobs)."""
    section = (id(knobs), stage, dtype, head_dim) if type(knobs) is MappingProxyType else None
    if section is not None:  # a KernelConfig's section (read-only): memoized by identity
        hit = _by_section.get(section)
        if hit is not None and hit[0] is knobs:
            return hit[1]
    key = (stage, dtype, head_dim, tuple(sorted(knobs.items())))
    module = _by_key.get(key)
    if module is None:
        module = _build(specialize(stage, dtype, head_dim, knobs))
        _by_key[key] = module
    if section is not None:
        if len(_by_section) >= 4096:
            _by_section.clear()
        _by_section[section] = (knobs, module)  # the section kept alive: its id stays its own
    return module


def _build(kernel: Specialization) -> ModuleType:
    """Import `kernel` once per process (the same specialization reached through another
    dtype spelling or a knob left at its default shares the module)."""
    module = _loaded.get(kernel.name)
    if module is None:
        with _lock:
            module = _loaded.get(kernel.name)
            if module is None:
                path, text = emit(kernel)
                module = _module_from_text(f"dfgen_generated.{kernel.name}", path, text)
                _loaded[kernel.name] = module
    return module


def _module_from_text(module_name: str, path: Path, text: str) -> ModuleType:
    """A fresh module run from `text` (what dfgen rendered), its __file__ the cached path.
    No loader reads the file or a .pyc beside it, and no .pyc is written. Triton's jit
    reads each kernel's source through inspect, hence linecache: the text is registered
    there for `path` with no mtime, so linecache.checkcache keeps it even if the file
    changes or goes away later."""
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
    wrap_kernels(module)  # launched with less host time (launcher.py); the kernels are as rendered
    return module
