"""Everything dfgen reads from its environment, in one place: folders (kernel cache, tuned
files, the packaged templates and tuned files), DFGEN_* variables, and dtype names.

    DFGEN_CACHE_DIR   generated kernel sources and tuning studies
                      (default $XDG_CACHE_HOME/dfgen, else ~/.cache/dfgen)
    DFGEN_TUNED_DIR   the tuned folder searched first, where `dfgen tune` writes
                      (default $XDG_CONFIG_HOME/dfgen/tuned, else ~/.config/dfgen/tuned)
    DFGEN_DEBUG=1     checks that cost a host sync (cu_seqlens, |beta| <= 2); read at import
    DFGEN_STRICT=1    an unusable tuned file is an error, not a warning
    DFGEN_TRITON_LAUNCH=1  launch kernels through Triton's own path, not kept compiled kernels
                      (kernels/launcher.py); read when a kernel module is built
    TRITON_INTERPRET=1  kernels run in Triton's CPU interpreter

Imports nothing heavy (no torch at import).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEBUG = os.environ.get("DFGEN_DEBUG", "0") == "1"

# the short dtype names of tuned files, the CLI and cache names, and torch's names for them
DTYPE_NAMES = ("bf16", "fp16", "fp32")
_TORCH_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


_known: dict = {}  # dtype (any form) -> short name: the runtime asks on every call


def dtype_name(dtype) -> str:
    """torch.bfloat16 (or 'bfloat16', 'torch.bfloat16', 'bf16') -> 'bf16'; ValueError otherwise."""
    found = _known.get(dtype)
    if found is not None:
        return found
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_NAMES:
        if name not in _TORCH_NAMES:
            raise ValueError(f"dtype must be one of float16, bfloat16, float32; got {dtype}")
        name = _TORCH_NAMES[name]
    _known[dtype] = name
    return name


def torch_dtype(name: str):
    """'bf16' (or any form dtype_name takes) -> torch.bfloat16."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name(name)]


def interpreter_active() -> bool:
    """Kernels run in Triton's interpreter (read at each call: the CLI sets it without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_launch() -> bool:
    """DFGEN_TRITON_LAUNCH=1: every launch through Triton's JITFunction.run."""
    return os.environ.get("DFGEN_TRITON_LAUNCH", "0") in ("1", "true", "yes")


def strict() -> bool:
    return os.environ.get("DFGEN_STRICT") == "1"


def cache_root() -> Path:
    """DFGEN_CACHE_DIR, else $XDG_CACHE_HOME/dfgen, else ~/.cache/dfgen."""
    if os.environ.get("DFGEN_CACHE_DIR"):
        return Path(os.environ["DFGEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dfgen"


def config_tuned_dir() -> Path:
    """$XDG_CONFIG_HOME/dfgen/tuned, else ~/.config/dfgen/tuned."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "dfgen" / "tuned"


def user_tuned_dir() -> Path:
    """The tuned folder searched first, where `dfgen tune` writes: DFGEN_TUNED_DIR if set,
    else config_tuned_dir()."""
    return Path(os.environ["DFGEN_TUNED_DIR"]) if os.environ.get("DFGEN_TUNED_DIR") \
        else config_tuned_dir()


def packaged_dir(name: str) -> Path | None:
    """The folder of packaged data `name` ("templates" or "tuned"): the installed package's
    dfgen._templates / dfgen._tuned (found through importlib, as Inductor finds its
    templates), else the top of a source checkout (templates/, tuned/); None if neither."""
    spec = importlib.util.find_spec(f"dfgen._{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parent.parent / name
    return checkout if checkout.is_dir() else None


def tuned_search_dirs() -> list[Path]:
    """Where the runtime looks for tuned files, in order: the user's folder
    (DFGEN_TUNED_DIR, then $XDG_CONFIG_HOME/dfgen/tuned), then the packaged tuned/."""
    dirs = [user_tuned_dir()]
    if dirs[0] != config_tuned_dir():
        dirs.append(config_tuned_dir())
    packaged = packaged_dir("tuned")
    if packaged is not None:
        dirs.append(packaged)
    return dirs
