"""The search space, read from the templates' declared knobs (nothing repeated here)."""

from __future__ import annotations

from ..config import STRATEGIES, KernelConfig
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


def suggest(trial, pass_: str, variant: str = "") -> KernelConfig:
    """Sample a config with an Optuna trial: parameters are named section.KNOB. The qsolve
    variant (a solve stage with its own queries) runs only the two-stage strategy."""
    strategies = ["two_stage"] if variant == "qsolve" else list(STRATEGIES)
    strategy = trial.suggest_categorical("strategy", strategies)
    sections = {}
    for section, stage, need in SECTIONS:
        if _active(need, pass_, strategy):
            sections[section] = {name: trial.suggest_categorical(f"{section}.{name}", list(knob.values))
                                 for name, knob in spec(stage).knobs.items()}
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
