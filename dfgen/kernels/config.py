"""Kernel configs: a forward strategy plus the knob values of every stage it runs, forward
and backward.

Forward strategies:
  fused      the solve stage writes o directly (o = g a + (1 - g) u); one launch.
  two_stage  the solve stage writes u, then a causal attention stage over (q, k, u).
The backward is the same for both: a reverse sweep (solve_bwd), then dq/dk (attn_bwd).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import ConfigError
from .spec import spec

STRATEGIES = ("fused", "two_stage")
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # what the kernels take (the runtime's and tuned files' check)
_SCALARS = (bool, int, float, str)  # knob values: anything else is rejected when a config is built
_SECTIONS = ("solve", "attn", "solve_bwd", "attn_bwd")
_STAGE_OF = {"solve": "solve_fwd", "attn": "attn_fwd", "solve_bwd": "solve_bwd", "attn_bwd": "attn_bwd"}
SECTION_OF_STAGE = {stage: section for section, stage in _STAGE_OF.items()}  # "solve_fwd" -> "solve"
_checked: set = set()  # (config key, head dim, backward) already validated: checks are pure
_filled: dict = {}  # (config key, defaults key) -> the config with empty sections filled
_parsed: dict = {}  # (id(defaults), dict form with value types) -> (defaults, config): from_dict
_PARSED_LIMIT = 1024


@dataclass(frozen=True)
class KernelConfig:
    strategy: str = "fused"
    solve: Mapping[str, Any] = field(default_factory=dict)
    attn: Mapping[str, Any] = field(default_factory=dict)  # two_stage only
    solve_bwd: Mapping[str, Any] = field(default_factory=dict)
    attn_bwd: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # read-only sections: a config may be shared (cached defaults, tuned entries)
        # knobs a section leaves out that have a default (knobs added after it was written)
        # are filled in, so that equal configs compare, hash and serialize equal
        # malformed sections are ConfigErrors here, before sorting, hashing or JSON (a
        # non-string knob name or a list value would raise TypeError there)
        if not isinstance(self.strategy, str):
            raise ConfigError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        for name in _SECTIONS:
            knobs = getattr(self, name)
            _check_section(name, knobs)
            if knobs:
                knobs = spec(_STAGE_OF[name]).complete(knobs)
            object.__setattr__(self, name, MappingProxyType(dict(knobs)))
        object.__setattr__(self, "json", json.dumps(self.to_dict(), sort_keys=True))
        # the key tells 64 from 64.0 and 1 from True (equal, with equal hashes): a memo of a
        # checked config must never vouch for a config of other types
        object.__setattr__(self, "_key", tuple(
            (name, tuple(sorted((k, type(v).__name__, v) for k, v in getattr(self, name).items())))
            for name in _SECTIONS) + (self.strategy,))
        # per-instance memos: a hit costs a small tuple's hash, not the key's
        object.__setattr__(self, "_checked_for", set())
        object.__setattr__(self, "_with", {})

    def forward_stages(self) -> dict[str, Mapping[str, Any]]:
        """{stage name: knobs} of the stages the forward runs."""
        out = {"solve_fwd": self.solve}
        if self.strategy == "two_stage":
            out["attn_fwd"] = self.attn
        return out

    def backward_stages(self) -> dict[str, Mapping[str, Any]]:
        return {"solve_bwd": self.solve_bwd, "attn_bwd": self.attn_bwd}

    def check(self, head_dim: int, backward: bool = False) -> "KernelConfig":
        """Raise ConfigError unless every stage that runs has a valid, feasible config."""
        if (head_dim, backward) in self._checked_for:
            return self
        memo = (self.key(), head_dim, backward)
        if memo in _checked:
            self._checked_for.add((head_dim, backward))
            return self
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        stages = dict(self.forward_stages())
        if backward:
            stages.update(self.backward_stages())
        for stage, knobs in stages.items():
            spec(stage).check(knobs, head_dim)
        _checked.add(memo)
        self._checked_for.add((head_dim, backward))
        return self

    def key(self) -> tuple:
        """Hashable identity of the config (computed once)."""
        return self._key

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"strategy": self.strategy}
        for name in _SECTIONS:
            knobs = getattr(self, name)
            if knobs and (name != "attn" or self.strategy == "two_stage"):
                out[name] = dict(sorted(knobs.items()))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], defaults: "KernelConfig | None" = None) -> "KernelConfig":
        """Parse the dict form. With `defaults`, sections missing from `data` come from
        `defaults`, and so do the knobs a given section leaves out; without, a given
        section is taken as it is (check() then wants every knob)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a kernel config must be a mapping, got {type(data).__name__}")
        memo = _parse_memo(data, defaults)  # a dict config passed on every call parses once
        hit = _parsed.get(memo) if memo is not None else None
        if hit is not None and hit[0] is defaults:
            return hit[1]
        config = cls._parse(data, defaults)
        if memo is not None:
            if len(_parsed) >= _PARSED_LIMIT:
                _parsed.clear()
            _parsed[memo] = (defaults, config)
        return config

    @classmethod
    def _parse(cls, data: Mapping[str, Any], defaults: "KernelConfig | None") -> "KernelConfig":
        unknown = set(data) - {"strategy", *_SECTIONS}
        if unknown:
            raise ConfigError(f"unknown kernel config keys {sorted(unknown, key=repr)}; "
                              f"expected strategy and {list(_SECTIONS)}")
        strategy = data.get("strategy", "fused")
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        sections = {}
        for name in _SECTIONS:
            value = data.get(name)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"config section {name!r} must be a mapping of knobs, "
                                  f"got {type(value).__name__}")
            if defaults is not None:
                value = {**getattr(defaults, name), **(value or {})}
            sections[name] = dict(value or {})
        if strategy == "two_stage" and not sections["attn"]:
            raise ConfigError("a two_stage config needs an `attn` section")
        if strategy != "two_stage":
            sections["attn"] = {}
        return cls(strategy=strategy, **sections)

    def with_defaults(self, defaults: "KernelConfig") -> "KernelConfig":
        """This config with its empty sections taken from `defaults` (itself when none is
        empty; memoized, as the runtime asks on every call)."""
        hit = self._with.get(id(defaults))
        if hit is not None and hit[0] is defaults:
            return hit[1]
        memo = (self._key, defaults._key)
        found = _filled.get(memo)
        if found is not None:
            self._with[id(defaults)] = (defaults, found)
            return found
        missing = [name for name in _SECTIONS if not getattr(self, name)
                   and (name != "attn" or self.strategy == "two_stage")]
        if not missing:
            found = self
        else:
            filled = {name: getattr(self, name) or getattr(defaults, name) for name in _SECTIONS}
            if self.strategy != "two_stage":
                filled["attn"] = {}
            found = KernelConfig(strategy=self.strategy, **filled)
        _filled[memo] = found
        self._with[id(defaults)] = (defaults, found)
        return found

    def __str__(self) -> str:
        parts = [self.strategy] + [f"{k}={v}" for k, v in sorted(self.solve.items())]
        if self.strategy == "two_stage":
            parts += [f"attn.{k}={v}" for k, v in sorted(self.attn.items())]
        return " ".join(parts)


def _parse_memo(data: Mapping, defaults) -> tuple | None:
    """from_dict's memo key: the dict form with every value's type (64 and 64.0 differ),
    and the defaults' identity; None when it cannot be hashed (from_dict then reports)."""
    try:
        key = (id(defaults),) + tuple(sorted(
            (name, type(value), tuple(sorted((k, type(v), v) for k, v in value.items()))
             if isinstance(value, Mapping) else value) for name, value in data.items()))
        hash(key)
        return key
    except TypeError:  # unhashable values or unsortable (non-string) names
        return None


def _check_section(name: str, knobs) -> None:
    """ConfigError unless `knobs` is a mapping of knob names (strings) to scalar values."""
    if not isinstance(knobs, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping of knobs, "
                          f"got {type(knobs).__name__}")
    for knob, value in knobs.items():
        if not isinstance(knob, str):
            raise ConfigError(f"config section {name!r}: knob names must be strings, got {knob!r}")
        if not isinstance(value, _SCALARS):
            declared = spec(_STAGE_OF[name]).knobs.get(knob)
            expected = f"one of {list(declared.values)}" if declared else "a bool, int, float or string"
            raise ConfigError(f"config section {name!r}: {knob}={value!r} is not {expected}")


# The solve stages' precision knob values that keep float32 inputs' accuracy (the float32
# tolerance, 1e-4): the default's choice for float32 (the first) and all that a float32
# bucket's search tries. 16-bit inverses and products (INV_FP16, SOLVE_PRECISION fp16 or
# bf16) and plain tf32 products round to 10 or fewer mantissa bits: fine for 16-bit
# inputs, a candidate that fails or passes the float32 check by the luck of its inputs.
FLOAT32_ACCURATE = {"SOLVE_PRECISION": ("tf32x3", "ieee"), "INV_FP16": (False,)}
FLOAT32_SECTIONS = ("solve", "solve_bwd")


def float32_limits() -> dict:
    """FLOAT32_ACCURATE as search space limits ({"solve.INV_FP16": [False], ...})."""
    return {f"{section}.{knob}": list(values) for section in FLOAT32_SECTIONS
            for knob, values in FLOAT32_ACCURATE.items()}


def sixteen_bit_limits() -> dict:
    """The complement for 16-bit inputs, as search space limits: every precision value
    except FLOAT32_ACCURATE's. Those do more work (three tf32 products, or float32 FMAs,
    or a float32 inverse) for accuracy that bf16 and fp16 inputs cannot hold, so a 16-bit
    bucket never wins with them (H200: the fp16 inverse 10 to 18 % faster, tf32x3 and ieee
    slower still) and its search does not spend trials on them."""
    out = {}
    for section in FLOAT32_SECTIONS:
        knobs = spec(_STAGE_OF[section]).knobs
        for knob, precise in FLOAT32_ACCURATE.items():
            out[f"{section}.{knob}"] = [v for v in knobs[knob].values if v not in precise]
    return out


def default_config(head_dim: int, dtype=None, strategy: str = "fused") -> KernelConfig:
    """Built-in config (cached; sections are read-only)"""
    return _default_config(head_dim, str(dtype), strategy)


@functools.lru_cache(maxsize=None)
def _default_config(head_dim: int, dtype: str, strategy: str) -> KernelConfig:
    """Built-in config, used when no tuned entry applies: the H200's best forward knobs
    where they also fit smaller GPUs (at head dim 128 two pipeline stages, about 80 KB of
    shared memory, instead of three, about 112 KB). At head dim 128 prefix-split programs take
    the first part of each prefix (SPLIT_PREFIX: 3 to 17 % faster at T = 4096 to 16384 on
    the H200 with half of it; three quarters, the template's SPLIT_AT default, 2 to 3 % faster
    again); at head dim 64 they win only at long T, where a tuned entry picks them."""
    fp32 = dtype.endswith("float32")
    precision = dict(  # float32 inputs keep float32 accuracy in the solve; fp16/bf16 need only tf32's
        SOLVE_PRECISION=FLOAT32_ACCURATE["SOLVE_PRECISION"][0] if fp32 else "tf32", INV_FP16=not fp32)
    solve = dict(CHUNK=64, BLOCK_N=64, LOOKAHEAD=2, **precision,
                 num_warps=4, num_stages=2 if head_dim > 64 else 3, SPLIT_PREFIX=head_dim > 64)
    attn = dict(BLOCK_M=64, BLOCK_N=32 if head_dim > 64 else 64, num_warps=4, num_stages=2)
    solve_bwd = dict(CHUNK=64, BLOCK_M=32, **precision, num_warps=4, num_stages=2)
    # 64 query rows per dq/dk program: at head dim 128, 32 rows compiled the dq kernel to
    # mma.sync instead of wgmma; 64 made forward+backward 1.14x to 1.19x faster at every
    # head-dim-128 bucket from T = 1024 to 16384 of the H200 tune (run 14). float32 tiles at
    # head dim 128 need 257 KB of shared memory with 64 rows (the H200 has 227): 32 there.
    # One launch (program j: key block j's dk, then row block j's dq) at head dim 128 in
    # 16 bits: the dq/dk pass 12 % faster at (1, 4096, 16, 128), 2 to 4 % slower at
    # (1, 16384, 8, 128); at head dim 64 it was 18 to 25 % slower (run 25).
    attn_bwd = dict(BLOCK_M=32 if fp32 and head_dim > 64 else 64, BLOCK_N=64, num_warps=4,
                    num_stages=2, ONE_LAUNCH=head_dim > 64 and not fp32)
    return KernelConfig(strategy=strategy, solve=solve, attn=attn, solve_bwd=solve_bwd,
                        attn_bwd=attn_bwd).check(head_dim, backward=True)
