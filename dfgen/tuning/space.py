"""The search space, read from the templates' declared knobs (nothing repeated here)."""

from __future__ import annotations

from ..config import STRATEGIES, KernelConfig
from ..errors import DfgenError
from ..templating import spec

# (config section, template stage, needed by)
SECTIONS = (("solve", "solve_fwd", "fwd"), ("attn", "attn_fwd", "two_stage"),
            ("solve_bwd", "solve_bwd", "bwd"), ("attn_bwd", "attn_bwd", "bwd"))


def _active(section_need: str, pass_: str, strategy: str) -> bool:
    if section_need == "bwd":
        return pass_ == "fwd+bwd"
    if section_need == "two_stage":
        return strategy == "two_stage"
    return True


def choices(pass_: str, variant: str = "", limits: dict | None = None) -> dict:
    """{parameter: values} of the whole space for a pass, or of the part that `limits` keeps
    ({"strategy": [...], "solve.CHUNK": [...], ...}: each value list a subset of the
    template's). The qsolve variant (a solve stage with its own queries) runs only the
    two-stage strategy."""
    limits = dict(limits or {})
    strategies = ["two_stage"] if variant == "qsolve" else list(STRATEGIES)
    out = {"strategy": _limit("strategy", strategies, limits)}
    for section, stage, need in SECTIONS:
        if any(_active(need, pass_, s) for s in out["strategy"]):
            for name, knob in spec(stage).knobs.items():
                param = f"{section}.{name}"
                out[param] = _limit(param, list(knob.values), limits)
    known = {f"{section}.{name}" for section, stage, _ in SECTIONS for name in spec(stage).knobs}
    unknown = sorted(set(limits) - known)  # limits of sections this pass does not run are fine
    if unknown:
        raise DfgenError(f"search space limits name unknown parameters {unknown}; "
                         f"known: strategy, {', '.join(sorted(known))}")
    return out


def _limit(param: str, values: list, limits: dict) -> list:
    if param not in limits:
        return values
    wanted = limits.pop(param)
    wanted = wanted if isinstance(wanted, list) else [wanted]
    bad = [w for w in wanted if w not in values]
    if bad or not wanted:
        raise DfgenError(f"search space limit {param}: {bad or wanted} not among {values}")
    return [v for v in values if v in wanted]


def grid(pass_: str, variant: str = "", limits: dict | None = None) -> dict:
    """The space as an Optuna GridSampler search space (every parameter always present, so
    the limits must fix one strategy)."""
    space = choices(pass_, variant, limits)
    if len(space["strategy"]) != 1:
        raise DfgenError("an exhaustive sweep needs one strategy: limit 'strategy' to one value")
    strategy = space["strategy"][0]
    return {p: v for p, v in space.items()
            if p == "strategy" or _active(_need(p.split(".")[0]), pass_, strategy)}


def _need(section: str) -> str:
    return next(need for name, _, need in SECTIONS if name == section)


def suggest(trial, pass_: str, variant: str = "", limits: dict | None = None) -> KernelConfig:
    """Sample a config with an Optuna trial: parameters are named section.KNOB."""
    space = choices(pass_, variant, limits)
    strategy = trial.suggest_categorical("strategy", space["strategy"])
    sections = {}
    for section, stage, need in SECTIONS:
        if _active(need, pass_, strategy):
            sections[section] = {name: trial.suggest_categorical(f"{section}.{name}", space[f"{section}.{name}"])
                                 for name in spec(stage).knobs}
    return KernelConfig(strategy=strategy, **sections)


def params_of(config: KernelConfig, pass_: str) -> dict:
    """The trial parameters that `suggest` would need to return `config`."""
    out = {"strategy": config.strategy}
    for section, _, need in SECTIONS:
        if _active(need, pass_, config.strategy):
            out.update({f"{section}.{k}": v for k, v in getattr(config, section).items()})
    return out


def config_of(params: dict) -> KernelConfig:
    sections: dict = {}
    for name, value in params.items():
        if "." in name:
            section, knob = name.split(".", 1)
            sections.setdefault(section, {})[knob] = value
    return KernelConfig(strategy=params["strategy"], **sections)
