"""Which config serves a call: the tuned file for this GPU, its nearest bucket, fallbacks.

Files: the folders of dfgen.settings.tuned_search_dirs() in order (DFGEN_TUNED_DIR, the
user's folder, the packaged tuned/); in them a file for this exact GPU, then one tuned on
the same family or compute capability; else the built-in defaults. Files are read with a
safe loader and checked against their schema; a corrupt or foreign file gives a warning
and is skipped (DFGEN_STRICT=1 makes it an error).

Entries: see nearest(). A decoding step's bucket (pass decode) is served by decode
entries only, and a forward or training call never by one (DecodeChoice: the step's
knobs). An entry whose knobs do not pass the running templates' spec serves nothing (the
built-in default does, with a warning). An entry tuned with other
templates or another triton (stale) still serves if its knobs pass the spec: the runtime
never runs the reference; one warning per file names `dfgen check`, which runs the
entries against the reference and can record the result in the file (a recorded failure
under the running versions makes the default serve instead).

Which config serves a bucket is logged once at INFO (logger "dfgen"); every lookup at
DEBUG. Lookups are cached: after the first call for a shape, a call costs a dictionary
hit. Never tunes, never checks.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..kernels.config import KernelConfig, default_config
from ..kernels.decode import decode_knobs, default_decode_knobs, describe_decode_knobs
from ..settings import dtype_name, strict, torch_dtype, tuned_search_dirs
from . import tuned_file
from .bucket import DECODE, Bucket, decode_t
from .gpu import GpuIdentity, gpu_family, identify

log = logging.getLogger("dfgen")
# A tuned entry serves calls within this many doublings of its T and of its batch*heads.
REACH = 2.0
_REACH_DOUBLINGS = math.log2(REACH)
_CACHE_LIMIT = 4096  # cached lookups per GPU before the cache starts over


@dataclass(frozen=True)
class Choice:
    config: KernelConfig
    source: str  # file and entry, or 'built-in default'

    def described(self) -> str:
        return str(self.config)


@dataclass(frozen=True)
class DecodeChoice:
    """What serves a decoding step: the decode template's knobs (every one set)."""
    knobs: dict
    source: str

    def described(self) -> str:
        return describe_decode_knobs(self.knobs)


def running_versions() -> dict:
    """The versions that make an entry stale when they differ: triton's and the templates'
    (`templates` the KernelConfig stages', `decode_templates` the decode template's)."""
    import triton

    return {"triton": triton.__version__, "templates": tuned_file.templates_of("fwd"),
            "decode_templates": tuned_file.templates_of(DECODE)}


def nearest(entries: dict, bucket: Bucket):
    """(key, entry) of the tuned entry that serves `bucket`, or (None, None).

    The rule, in one place: only entries of the same dtype and head dim, within REACH (2x)
    of the bucket's T and of its batch*heads, can serve; among them the same pass wins
    (a forward+backward call prefers fwd+bwd entries, a forward call fwd entries), then the
    same variant (a q_solve call its qsolve entries), then the nearest, by the sum of the
    |log2| distances in T and in batch*heads. Past REACH the default serves: a config tuned
    far away measured slower than the built-in default (H200: the d64 T=1024 BH=256 entry
    at T=2048 BH=64 and at T=8192 BH=32). Decode entries and the others never serve each
    other's buckets: their configs configure different kernels."""
    best, best_rank = (None, None), None
    decode = bucket.pass_ == DECODE
    for key, entry in entries.items():
        if entry["dtype"] != bucket.dtype or entry["head_dim"] != bucket.head_dim or \
                (entry["pass"] == DECODE) != decode:
            continue
        t_dist = abs(math.log2(max(bucket.T, 1) / entry["T"]))
        bh_dist = abs(math.log2(max(bucket.BH, 1) / entry["BH"]))
        if max(t_dist, bh_dist) > _REACH_DOUBLINGS:
            continue
        rank = (entry["pass"] != bucket.pass_, entry.get("variant", "") != bucket.variant,
                t_dist + bh_dist)
        if best_rank is None or rank < best_rank:
            best, best_rank = (key, entry), rank
    return best


class Dispatcher:
    """Resolves configs for one GPU identity; thread-safe; caches every lookup."""

    def __init__(self, identity: GpuIdentity, dirs: list[Path] | None = None):
        self.identity = identity
        self.dirs = tuned_search_dirs() if dirs is None else dirs
        self._lock = threading.Lock()
        self._cache: dict[Bucket, Choice | DecodeChoice] = {}
        self._decode_memo: dict[tuple, dict] = {}  # (dtype, head dim, T bucket, BH) -> knobs
        self._logged: set[str] = set()  # sources already logged at INFO
        self.skipped: list[str] = []  # why each unusable file that would serve this GPU was skipped
        self.path, self.data, self.match = self._find_file()
        self.running = running_versions() if self.data else {}
        if self.data:
            self._warn_if_stale()

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
            if strict():
                raise err from None
            warnings.warn(f"dfgen: ignoring tuned file {path}: {err}", stacklevel=4)
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
                    return path, data, "exact GPU"
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
                    return path, data, f"same family ({file_key})"
                if str(prov.get("compute_capability")) == ident.compute_capability:
                    return path, data, f"same compute capability {ident.compute_capability} ({file_key})"
        return None, None, "none"

    def running_for(self, entry: dict) -> dict:
        """The running versions `entry` is compared with: triton's, and the hash of the
        templates of its kind (decode entries: the decode template's)."""
        if entry.get("pass") != DECODE:
            return {k: v for k, v in self.running.items() if k != "decode_templates"}
        return {"triton": self.running["triton"], "templates": self.running["decode_templates"]}

    def stale(self, entry: dict) -> list[str]:
        """What of the versions `entry` was tuned under differs from the running ones."""
        return tuned_file.differences(tuned_file.tuned_under(self.data, entry),
                                      self.running_for(entry))

    def checked_here(self, entry: dict):
        """The result `dfgen check --record` recorded for `entry` under the running triton
        and templates: True (passed), False (failed), or None (no such record)."""
        checked = entry.get("checked")
        if not checked or tuned_file.differences(checked, self.running_for(entry)):
            return None
        return checked.get("passed") is True

    def _warn_if_stale(self) -> None:
        """One warning for the file when an entry was tuned with other templates or triton
        and no check under the running ones vouches for it."""
        stale = {difference for entry in self.data["entries"].values()
                 if self.checked_here(entry) is None for difference in self.stale(entry)}
        if stale:
            warnings.warn(f"dfgen: {self.path} was tuned with {', '.join(sorted(stale))}; its "
                          "entries serve where their knobs fit the running templates, unchecked: "
                          "run `dfgen check` to check them against the reference (`dfgen check "
                          "--record` keeps the result)", stacklevel=5)

    # -- lookup --------------------------------------------------------------------------
    def decode_step_knobs(self, dtype, head_dim: int, cache_length: int, BH: int) -> dict:
        """The knobs of a decoding step (its DecodeChoice's) over a cache of `cache_length`
        tokens, `dtype` a torch dtype: the runtime's per-step lookup. Memoized on what
        decides the bucket (the length's bit length stands for its power-of-two T), so that
        a step costs one dictionary hit once its bucket was seen (a step's host time is
        about 90 us)."""
        memo = (dtype, head_dim, (cache_length - 1).bit_length(), BH)
        knobs = self._decode_memo.get(memo)
        if knobs is None or log.isEnabledFor(logging.DEBUG):  # choose() logs every lookup
            bucket = Bucket(DECODE, dtype_name(dtype), head_dim, decode_t(cache_length), BH)
            knobs = self.choose(bucket).knobs
            if len(self._decode_memo) >= _CACHE_LIMIT:
                self._decode_memo.clear()
            self._decode_memo[memo] = knobs
        return knobs

    def choose(self, bucket: Bucket) -> Choice | DecodeChoice:
        """What serves `bucket`: a Choice (a KernelConfig), a DecodeChoice for a decode
        bucket."""
        choice = self._cache.get(bucket)
        if choice is None:
            with self._lock:
                choice = self._cache.get(bucket) or self._resolve(bucket)
                if len(self._cache) >= _CACHE_LIMIT:  # packed inputs vary T: keep it bounded
                    self._cache.clear()
                self._cache[bucket] = choice
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dfgen: %s -> %s", bucket.key, choice.source)
        return choice

    def _resolve(self, bucket: Bucket) -> Choice | DecodeChoice:
        if bucket.decode:
            return self._resolve_decode(bucket)
        default = default_config(bucket.head_dim, torch_dtype(bucket.dtype))
        key, entry = nearest(self.data["entries"], bucket) if self.data else (None, None)
        if entry is None:
            return self._log(bucket, Choice(default, "built-in default"))
        source = f"{self.path} [{key}] ({self.match})"
        if self.checked_here(entry) is False:
            return self._log(bucket, Choice(default, f"built-in default ({source} failed "
                                                     "`dfgen check` under the running versions)"))
        try:
            config = KernelConfig.from_dict(entry["config"], defaults=default)
            return self._log(bucket, Choice(*self._for_pass(config, entry, bucket, default, source)))
        except ConfigError as err:  # knobs the running templates do not take: never fatal
            warnings.warn(f"dfgen: {source} does not fit the running templates ({err}); the "
                          "built-in default serves it (re-tune with `dfgen tune`)", stacklevel=6)
            return self._log(bucket, Choice(default, f"built-in default ({source} unusable)"))

    def _resolve_decode(self, bucket: Bucket) -> DecodeChoice:
        """The decode entry nearest `bucket`, its knobs over the built-in default's and
        checked against the decode template's spec; the default where none serves, where a
        recorded check failed it, or (with a warning) where the template does not take its
        knobs (an unknown knob, a value it does not declare, a failed constraint)."""
        dtype = torch_dtype(bucket.dtype)
        default = default_decode_knobs(bucket.head_dim, dtype)
        key, entry = nearest(self.data["entries"], bucket) if self.data else (None, None)
        if entry is None:
            return self._log(bucket, DecodeChoice(default, "built-in default"))
        source = f"{self.path} [{key}] ({self.match})"
        if self.checked_here(entry) is False:
            return self._log(bucket, DecodeChoice(default, f"built-in default ({source} failed "
                                                           "`dfgen check` under the running versions)"))
        try:
            knobs = decode_knobs(tuned_file.decode_section(entry["config"]), bucket.head_dim, dtype)
            return self._log(bucket, DecodeChoice(knobs, source))
        except ConfigError as err:  # knobs the running template does not take: never fatal
            warnings.warn(f"dfgen: {source} does not fit the running decode template ({err}); "
                          "the built-in default serves it (re-tune with `dfgen tune --passes "
                          "decode`)", stacklevel=7)
            return self._log(bucket, DecodeChoice(default, f"built-in default ({source} unusable)"))

    def _log(self, bucket: Bucket, choice):
        if choice.source not in self._logged:
            self._logged.add(choice.source)
            log.info("dfgen: %s (and calls near it) served by %s: %s", bucket.key, choice.source,
                     choice.described())
        return choice

    @staticmethod
    def _for_pass(config, entry, bucket: Bucket, default, source):
        """(config, source) valid for the bucket's pass. A forward entry serving a
        forward+backward call was tuned for the forward only: backward sections that fail
        the check are replaced by the built-in default's (the forward knobs still serve)."""
        if not bucket.backward or entry["pass"] == "fwd+bwd":
            return config.check(bucket.head_dim, backward=bucket.backward), source
        try:
            return config.check(bucket.head_dim, backward=True), source
        except ConfigError as err:
            log.debug("dfgen: %s: backward sections unusable (%s); the built-in default's "
                      "serve", source, err)
        patched = KernelConfig(config.strategy, config.solve, config.attn,
                               default.solve_bwd, default.attn_bwd)
        return (patched.check(bucket.head_dim, backward=True),
                f"{source} with backward sections from the built-in default")


_dispatchers: dict = {}  # (type, index) and each torch.device seen -> its Dispatcher
_dispatch_lock = threading.Lock()


def dispatcher_for(device) -> Dispatcher:
    """The dispatcher of `device` (a torch.device). Found by the device itself first: the
    runtime asks on every call, and the (type, index) key costs about a microsecond to make."""
    found = _dispatchers.get(device)
    if found is None:
        key = (device.type, device.index)
        with _dispatch_lock:
            found = _dispatchers.get(key) or Dispatcher(identify(device))
            _dispatchers[key] = _dispatchers[device] = found
    return found


def reset() -> None:
    """Forget every cached lookup (tests; after changing DFGEN_TUNED_DIR)."""
    with _dispatch_lock:
        _dispatchers.clear()


__all__ = ["Dispatcher", "Choice", "DecodeChoice", "nearest", "running_versions", "dispatcher_for",
           "reset"]
