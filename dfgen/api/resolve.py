"""The config a call runs under: the one given (missing sections from the built-in
default) or the tuned one for this GPU and shape, adapted to the call (q_solve needs the
two-stage strategy; large_beta the solves at float32 accuracy). Memoized: the runtime asks
on every call."""

from __future__ import annotations

from ..errors import ConfigError
from ..kernels.config import FLOAT32_ACCURATE, KernelConfig, default_config
from ..select.bucket import Bucket
from ..select.dispatch import dispatcher_for
from ..settings import dtype_name

CONFIG_TYPE = "config must be a KernelConfig, a dict or None, got {}"
_as_two_stage: dict = {}
_float32_solves: dict = {}


def two_stage(config: KernelConfig, head_dim: int, dtype) -> KernelConfig:
    """A separate solve query needs the two-stage strategy: keep the solve knobs, take the
    attention stage's from the built-in default if the config has none (memoized)."""
    if config.strategy == "two_stage":
        return config
    memo = (config.key(), head_dim, dtype)
    found = _as_two_stage.get(memo)
    if found is None:
        attn = default_config(head_dim, dtype, strategy="two_stage").attn
        found = KernelConfig("two_stage", config.solve, attn, config.solve_bwd, config.attn_bwd)
        _as_two_stage[memo] = found
    return found


def _with_float32_solve(config: KernelConfig) -> KernelConfig:
    """`config` with the solve stages' in-chunk inverse and products at float32 accuracy
    (large_beta; memoized, as the runtime asks on every call)."""
    found = _float32_solves.get(config.key())
    if found is None:
        precise = {knob: values[0] for knob, values in FLOAT32_ACCURATE.items()}
        found = KernelConfig(config.strategy, dict(config.solve, **precise), config.attn,
                             dict(config.solve_bwd, **precise), config.attn_bwd)
        _float32_solves[config.key()] = found
    return found


def resolve_config(config, q, needs_grad: bool, seqs=None, variant: str = "",
                   large_beta: bool = False) -> KernelConfig:
    """The validated config for a call: the given one (missing sections from the built-in
    default), or the tuned one for this GPU and shape (packed sequences count as their
    longest length and number); with large_beta, its solves at float32 accuracy; for the
    qsolve variant (a solve stage with its own queries), its two-stage form."""
    B, T, H, D = q.shape
    if seqs is not None:
        B, T = seqs[0].numel() - 1, seqs[1]
    if config is None:
        bucket = Bucket("fwd+bwd" if needs_grad else "fwd", dtype_name(q.dtype), D, T, B * H, variant)
        config = dispatcher_for(q.device).choose(bucket).config
    elif isinstance(config, dict):
        config = KernelConfig.from_dict(config, defaults=default_config(D, q.dtype))
    elif isinstance(config, KernelConfig):
        config = config.with_defaults(default_config(D, q.dtype))
    else:
        raise ConfigError(CONFIG_TYPE.format(type(config).__name__))
    if large_beta:
        config = _with_float32_solve(config)
    if variant == "qsolve":
        config = two_stage(config, D, q.dtype)
    return config.check(D, backward=needs_grad)
