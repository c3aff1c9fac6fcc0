"""Which config serves a call: tuned files found for this GPU, nearest bucket, fallbacks.

Lookup order for files: DFGEN_TUNED_DIR, then the per-user folder
($XDG_CONFIG_HOME/dfgen/tuned, else ~/.config/dfgen/tuned), then the packaged tuned/.
For the GPU: a file for this exact GPU, then one tuned on the same family or compute
capability, then the built-in defaults. Within a file: the entry of the same pass, dtype
and head dim nearest in T and batch*heads on a log scale. Files are read with a safe
loader and checked against their schema; a corrupt or foreign file gives a warning and
is skipped (DFGEN_STRICT=1 makes it an error). Entries tuned with another triton or
template version give a warning and are validated against the reference before their
first use; DFGEN_VALIDATE=1 validates every config at its first use. Lookups are cached:
after the first call for a shape, a call costs a dictionary hit. Never tunes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import tuned_file
from .config import KernelConfig, default_config
from .errors import ConfigError

log = logging.getLogger("dfgen.dispatch")
# A tuned entry serves calls within this many doublings of its T and of its batch*heads.
REACH = 2.0
_REACH_DOUBLINGS = math.log2(REACH)
_CACHE_LIMIT = 4096  # cached lookups per GPU before the cache starts over
_VENDOR_WORDS = ("geforce", "tesla", "quadro")


@dataclass(frozen=True)
class GpuIdentity:
    key: str  # file key: 'h200', 'a100-sxm4-80gb'
    family: str  # 'h200', 'a100'
    compute_capability: str  # '9.0'
    sm_count: int
    name: str


def gpu_key(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100-sxm4-80gb'."""
    name = device_name.lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def gpu_family(key: str) -> str:
    """'a100-sxm4-80gb' -> 'a100'; 'geforce-rtx-4090' -> 'rtx-4090'."""
    parts = key.split("-")
    while len(parts) > 1 and parts[0] in _VENDOR_WORDS:
        parts = parts[1:]
    if parts[0] == "rtx" and len(parts) > 1:
        return "-".join(parts[:2])
    return parts[0]


def identify(device) -> GpuIdentity:
    """The identity of a torch device (CPU: the interpreter, which has no tuned files)."""
    if device.type != "cuda":
        return GpuIdentity("cpu-interpreter", "cpu-interpreter", "none", 0, "CPU")
    import torch

    props = torch.cuda.get_device_properties(device)
    key = gpu_key(props.name)
    return GpuIdentity(key, gpu_family(key), f"{props.major}.{props.minor}",
                       props.multi_processor_count, props.name)


def _config_tuned_dir() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "dfgen" / "tuned"


def user_tuned_dir() -> Path:
    """The user's tuned folder, the first one searched: DFGEN_TUNED_DIR if set, else
    $XDG_CONFIG_HOME/dfgen/tuned (~/.config/dfgen/tuned). `dfgen tune` writes there."""
    return Path(os.environ["DFGEN_TUNED_DIR"]) if os.environ.get("DFGEN_TUNED_DIR") \
        else _config_tuned_dir()


def search_dirs() -> list[Path]:
    dirs = [user_tuned_dir()]
    if dirs[0] != _config_tuned_dir():
        dirs.append(_config_tuned_dir())
    here = Path(__file__).resolve().parent
    for packaged in (here / "_tuned", here.parent / "tuned"):
        if packaged.is_dir():
            dirs.append(packaged)
            break
    return dirs


@dataclass(frozen=True)
class Choice:
    config: KernelConfig
    source: str  # file and entry, or 'built-in default'


def _tuned_with_other_versions(record) -> list[str]:
    """What of a file's provenance, or of an entry's tuned_with, differs from the running
    triton and templates ("triton 3.5.0 (now 3.6.0)", ...); empty when nothing does."""
    import triton

    from .templating import templates_hash

    stale = []
    for name, now in (("triton", triton.__version__), ("templates", templates_hash())):
        if record.get(name) and str(record[name]) != now:
            stale.append(f"{name} {record[name]} (now {now})")
    return stale


class Dispatcher:
    """Resolves configs for one GPU identity; thread-safe; caches every lookup."""

    def __init__(self, identity: GpuIdentity, dirs: list[Path] | None = None):
        self.identity = identity
        self.dirs = search_dirs() if dirs is None else dirs
        self._lock = threading.Lock()
        self._cache: dict[tuple, Choice] = {}
        self._validated: dict[tuple, bool] = {}
        self.skipped: list[str] = []  # why each unusable file that would serve this GPU was skipped
        self.path, self.data, self.match = self._find_file()

    # -- files ---------------------------------------------------------------------------
    def _read(self, path: Path, ours: bool = True):
        """The file's validated data, or None if it is unusable in any way. `ours`: it
        would serve this GPU (its exact file, or one named for its family), so a defect
        warns (DFGEN_STRICT=1: raises); another GPU's broken file, met while scanning for
        a family or compute-capability match, is skipped with a debug message only."""
        try:
            return tuned_file.read(path)
        except ConfigError as err:  # read() turns every defect of a file into one
            if not ours:
                log.debug("dfgen: skipping another GPU's tuned file %s: %s", path, err)
                return None
            if os.environ.get("DFGEN_STRICT") == "1":
                raise err from None
            warnings.warn(f"dfgen: ignoring tuned file {path}: {err}", stacklevel=3)
            self.skipped.append(str(err))
            return None

    def _find_file(self):
        """(path, data, how it matched) of the file that serves this GPU, or Nones."""
        ident = self.identity
        for directory in self.dirs:
            path = directory / f"{ident.key}.yaml"
            if path.is_file():
                data = self._read(path)
                if data is not None:
                    return path, self._check_versions(path, data), "exact GPU"
        for directory in self.dirs:
            for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else ():
                if path.stem == ident.key:
                    continue
                data = self._read(path, ours=gpu_family(path.stem) == ident.family)
                if data is None:
                    continue
                prov = data.get("provenance", {})
                file_key = str(prov.get("gpu", path.stem))
                if gpu_family(file_key) == ident.family:
                    return path, self._check_versions(path, data), f"same family ({file_key})"
                if str(prov.get("compute_capability")) == ident.compute_capability:
                    return path, self._check_versions(path, data), \
                        f"same compute capability {ident.compute_capability} ({file_key})"
        return None, None, "none"

    def _check_versions(self, path: Path, data: dict) -> dict:
        stale = _tuned_with_other_versions(data.get("provenance", {}))
        data["_stale"] = bool(stale)
        if stale:
            warnings.warn(f"dfgen: {path} was tuned with {', '.join(stale)}; its entries are "
                          "validated against the reference before first use", stacklevel=3)
        return data

    # -- lookup --------------------------------------------------------------------------
    def choose(self, pass_: str, dtype: str, head_dim: int, T: int, BH: int,
               variant: str = "") -> Choice:
        key = (pass_, dtype, head_dim, T, BH, variant)
        choice = self._cache.get(key)
        if choice is None:
            with self._lock:
                choice = self._cache.get(key) or self._resolve(*key)
                if len(self._cache) >= _CACHE_LIMIT:  # packed inputs vary T: keep it bounded
                    self._cache.clear()
                self._cache[key] = choice
        return choice

    def _resolve(self, pass_, dtype, head_dim, T, BH, variant) -> Choice:
        torch_dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}[dtype]
        default = default_config(head_dim, torch_dtype)
        entry_key, entry = self.nearest(pass_, dtype, head_dim, T, BH, variant)
        if entry is None:
            log.debug("dfgen: %s/%s/d%d/T%d/BH%d -> built-in default (no tuned entry)",
                      pass_, dtype, head_dim, T, BH)
            return Choice(default, "built-in default")
        source = f"{self.path} [{entry_key}] ({self.match})"
        try:
            config = KernelConfig.from_dict(entry["config"], defaults=default)
            config, source = self._for_pass(config, entry, pass_, head_dim, default, source)
        except ConfigError as err:  # the file was validated: should not happen, never fatal
            warnings.warn(f"dfgen: {source} is unusable here ({err}); using the built-in "
                          "default", stacklevel=4)
            return Choice(default, f"built-in default ({source} unusable)")
        must_validate = self.data.get("_stale") or os.environ.get("DFGEN_VALIDATE") == "1" \
            or bool(_tuned_with_other_versions(entry.get("tuned_with", {})))
        if must_validate and not self._validate(config, entry, source):
            return Choice(default, f"built-in default ({source} failed validation)")
        log.debug("dfgen: %s/%s/d%d/T%d/BH%d -> %s", pass_, dtype, head_dim, T, BH, source)
        return Choice(config, source)

    @staticmethod
    def _for_pass(config, entry, pass_, head_dim, default, source):
        """(config, source) valid for `pass_`. A forward entry serving a forward+backward
        call was validated for the forward only: backward sections that fail the check
        are replaced by the built-in default's (the forward knobs still serve)."""
        backward = pass_ == "fwd+bwd"
        if not backward or entry["pass"] == "fwd+bwd":
            return config.check(head_dim, backward=backward), source
        try:
            return config.check(head_dim, backward=True), source
        except ConfigError as err:
            log.debug("dfgen: %s: backward sections unusable (%s); the built-in default's "
                      "serve", source, err)
        patched = KernelConfig(config.strategy, config.solve, config.attn,
                               default.solve_bwd, default.attn_bwd)
        return (patched.check(head_dim, backward=True),
                f"{source} with backward sections from the built-in default")

    def nearest(self, pass_, dtype, head_dim, T, BH, variant=""):
        """(key, entry) of the nearest tuned bucket, or (None, None). A forward+backward
        call prefers fwd+bwd entries, a forward call fwd entries, and a q_solve call
        (variant qsolve) its own entries; each falls back to the others. An entry serves
        only shapes within REACH of its T and of its batch*heads: a config tuned far away
        was measured slower than the built-in default (H200: the d64 T=1024 BH=256 entry
        at T=2048 BH=64 and T=8192 BH=32), so beyond that the default serves."""
        if not self.data:
            return None, None
        entries = self.data["entries"]
        best, best_score = (None, None), None
        for key, entry in entries.items():
            if entry["dtype"] != dtype or entry["head_dim"] != head_dim:
                continue
            t_dist = abs(math.log2(max(T, 1) / entry["T"]))
            bh_dist = abs(math.log2(max(BH, 1) / entry["BH"]))
            if max(t_dist, bh_dist) > _REACH_DOUBLINGS:
                continue
            score = (t_dist + bh_dist
                     + (0.0 if entry["pass"] == pass_ else 100.0)
                     + (0.0 if entry.get("variant", "") == variant else 50.0))
            if best_score is None or score < best_score:
                best, best_score = (key, entry), score
        return best

    def _validate(self, config, entry, source) -> bool:
        memo = config.key()
        if memo not in self._validated:
            from .validation import validate_config

            ok, message = validate_config(config, entry, device=self._device())
            if not ok:
                warnings.warn(f"dfgen: {source} failed validation ({message}); using the "
                              "built-in default", stacklevel=4)
            self._validated[memo] = ok
        return self._validated[memo]

    def _device(self):
        import torch

        return torch.device("cuda" if self.identity.key != "cpu-interpreter" else "cpu")


_dispatchers: dict[tuple, Dispatcher] = {}
_dispatch_lock = threading.Lock()


def dispatcher_for(device) -> Dispatcher:
    key = (device.type, device.index)
    found = _dispatchers.get(key)
    if found is None:
        with _dispatch_lock:
            found = _dispatchers.get(key) or Dispatcher(identify(device))
            _dispatchers[key] = found
    return found


def reset() -> None:
    """Forget every cached lookup (tests; after changing DFGEN_TUNED_DIR)."""
    with _dispatch_lock:
        _dispatchers.clear()


__all__ = ["GpuIdentity", "Dispatcher", "Choice", "gpu_key", "gpu_family", "identify",
           "search_dirs", "user_tuned_dir", "dispatcher_for", "reset"]
