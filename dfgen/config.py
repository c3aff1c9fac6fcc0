"""Kernel configs of a forward pass: a strategy plus the knob values of each stage it runs.

Strategies:
  fused      the solve stage writes o directly (o = g a + (1 - g) u); one launch.
  two_stage  the solve stage writes u, then a causal attention stage over (q, k, u).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .templating import spec

STRATEGIES = ("fused", "two_stage")


@dataclass(frozen=True)
class ForwardConfig:
    strategy: str = "fused"
    solve: Mapping[str, Any] = field(default_factory=dict)
    attn: Mapping[str, Any] = field(default_factory=dict)

    def stages(self) -> dict[str, Mapping[str, Any]]:
        """{stage name: knobs} of the stages this config runs."""
        out = {"solve_fwd": self.solve}
        if self.strategy == "two_stage":
            out["attn_fwd"] = self.attn
        return out

    def check(self, head_dim: int) -> "ForwardConfig":
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        for stage, knobs in self.stages().items():
            spec(stage).check(knobs, head_dim)
        return self

    def key(self) -> tuple:
        return (self.strategy, tuple(sorted(self.solve.items())),
                tuple(sorted(self.attn.items())) if self.strategy == "two_stage" else ())

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"strategy": self.strategy, "solve": dict(sorted(self.solve.items()))}
        if self.strategy == "two_stage":
            out["attn"] = dict(sorted(self.attn.items()))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ForwardConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a forward config must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"strategy", "solve", "attn"}
        if unknown:
            raise ConfigError(f"unknown forward config keys {sorted(unknown)}")
        strategy = data.get("strategy", "fused")
        solve = dict(data.get("solve") or {})
        attn = dict(data.get("attn") or {})
        if strategy == "two_stage" and not attn:
            raise ConfigError("a two_stage config needs an `attn` section")
        return cls(strategy=strategy, solve=solve, attn=attn if strategy == "two_stage" else {})

    def __str__(self) -> str:
        parts = [self.strategy] + [f"{k}={v}" for k, v in sorted(self.solve.items())]
        if self.strategy == "two_stage":
            parts += [f"attn.{k}={v}" for k, v in sorted(self.attn.items())]
        return " ".join(parts)


def default_config(head_dim: int, dtype=None, strategy: str = "fused") -> ForwardConfig:
    """Built-in config, used when no tuned entry applies: the H200's best knobs where
    they also fit smaller GPUs (at head dim 128 two pipeline stages, about 80 KB of
    shared memory, instead of three, about 112 KB)."""
    fp32 = dtype is not None and str(dtype).endswith("float32")
    solve = dict(CHUNK=64, BLOCK_N=64, LOOKAHEAD=2, SPLIT_SOLVE=False,
                 # float32 inputs keep float32 accuracy in the solve; fp16/bf16 need only tf32's
                 SOLVE_PRECISION="tf32x3" if fp32 else "tf32", INV_FP16=not fp32,
                 num_warps=4, num_stages=2 if head_dim > 64 else 3)
    attn = dict(BLOCK_M=64, BLOCK_N=32 if head_dim > 64 else 64, num_warps=4, num_stages=2)
    return ForwardConfig(strategy=strategy, solve=solve, attn=attn).check(head_dim)
