"""The search space, read from the templates' declared knobs (nothing repeated here).

A knob that no constraint ties to another is one parameter, `section.KNOB`, with the
template's values. Knobs that constraints tie together (solve_fwd's CHUNK, BLOCK_N and
LOOKAHEAD) are one parameter, `section.CHUNK/BLOCK_N/LOOKAHEAD`, whose values are the
feasible combinations at the bucket's head dim, written "64/32/2": every sampled point
can run, so no trial is spent on a config the templates forbid.

The tuner searches each stage on its own (stage_choices: one section's parameters, the
same names); `choices` is the whole pass's space, for checking limits against a pass.
"""

from __future__ import annotations

import itertools

from ...errors import DfgenError
from ...kernels.config import STRATEGIES, KernelConfig, float32_limits, sixteen_bit_limits
from ...kernels.spec import spec

# (config section, template stage, needed by); a decode entry's config has the one
# section `decode` (the decoding step's knobs, tuned_file.decode_section)
SECTIONS = (("solve", "solve_fwd", "fwd"), ("attn", "attn_fwd", "two_stage"),
            ("solve_bwd", "solve_bwd", "bwd"), ("attn_bwd", "attn_bwd", "bwd"),
            ("decode", "decode", "decode"))


def _active(section_need: str, pass_: str, strategy: str) -> bool:
    if (section_need == "decode") != (pass_ == "decode"):
        return False
    if section_need == "decode":
        return True
    if section_need == "bwd":
        return pass_ == "fwd+bwd"
    if section_need == "two_stage":
        return strategy == "two_stage"
    return True


def _param(section: str, group: tuple) -> str:
    return f"{section}." + "/".join(group)


def _encode(combo: tuple) -> str:
    return "/".join(str(v) for v in combo)


def _decode(stage: str, group: tuple, value) -> dict:
    """{knob: typed value} of one parameter's value."""
    if len(group) == 1:
        return {group[0]: value}
    knobs = spec(stage).knobs
    parts = str(value).split("/")
    if len(parts) != len(group):
        raise DfgenError(f"{stage}: {value!r} does not give one value for each of {list(group)}")
    out = {}
    for name, text in zip(group, parts):
        by_text = {str(v): v for v in knobs[name].values}
        if text not in by_text:
            raise DfgenError(f"{stage}: {name}={text!r} is not one of {list(knobs[name].values)}")
        out[name] = by_text[text]
    return out


def choices(pass_: str, head_dim: int, variant: str = "", limits: dict | None = None) -> dict:
    """{parameter: values} of the whole space for a pass at a head dim, or of the part that
    `limits` keeps ({"strategy": [...], "solve.CHUNK": [...], ...}: each value list a
    subset of the template's, per knob). The qsolve variant (a solve stage with its own
    queries) runs only the two-stage strategy."""
    check_limits(limits)
    limits = dict(limits or {})
    out = {"strategy": strategies(variant, limits)}
    for section, stage, need in SECTIONS:
        if any(_active(need, pass_, s) for s in out["strategy"]):
            out.update(_section_choices(section, stage, head_dim, limits))
    return out


def strategies(variant: str = "", limits: dict | None = None) -> list:
    """The forward strategies a bucket of this variant searches, within `limits`."""
    values = ["two_stage"] if variant == "qsolve" else list(STRATEGIES)
    return _limit("strategy", values, dict(limits or {}))


def check_limits(limits: dict | None) -> None:
    """DfgenError if `limits` names a parameter no template declares (limits of sections a
    pass does not run are fine)."""
    known = {f"{section}.{name}" for section, stage, _ in SECTIONS for name in spec(stage).knobs}
    unknown = sorted(set(limits or {}) - known - {"strategy"})
    if unknown:
        raise DfgenError(f"search space limits name unknown parameters {unknown}; "
                         f"known: strategy, {', '.join(sorted(known))}")


def _section_choices(section: str, stage: str, head_dim: int, limits: dict) -> dict:
    """{parameter: feasible values} of one config section within `limits` (the limits it
    uses are popped)."""
    tspec = spec(stage)
    allowed = {name: _limit(f"{section}.{name}", list(knob.values), limits)
               for name, knob in tspec.knobs.items()}
    out = {}
    for group in tspec.knob_groups():
        combos = tspec.feasible_combinations(group, head_dim, allowed)
        if not combos:
            raise DfgenError(
                f"search space: no combination of {section} {list(group)} within "
                f"{ {n: allowed[n] for n in group} } satisfies {stage}'s constraints at "
                f"head dim {head_dim}")
        out[_param(section, group)] = ([c[0] for c in combos] if len(group) == 1
                                       else [_encode(c) for c in combos])
    return out


def stage_choices(stage: str, head_dim: int, limits: dict | None = None) -> dict:
    """{parameter: values} of one stage's space at a head dim (the parameters of its
    config section, named as in `choices`), within the limits that name that section."""
    check_limits(limits)
    return _section_choices(_section(stage), stage, head_dim, dict(limits or {}))


def stage_limits(stage: str, limits: dict | None) -> dict:
    """The part of `limits` that limits `stage` (what its study's name records)."""
    prefix = _section(stage) + "."
    return {name: value for name, value in (limits or {}).items() if name.startswith(prefix)}


def stage_points(space: dict) -> list[dict]:
    """Every point of a stage's space (all feasible), in declaration order."""
    names = list(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n] for n in names))]


def stage_params(stage: str, knobs) -> dict:
    """The parameters of a stage's space that give `knobs` (a config section)."""
    section = _section(stage)
    out = {}
    for group in spec(stage).knob_groups():
        combo = tuple(knobs[name] for name in group)
        out[_param(section, group)] = combo[0] if len(group) == 1 else _encode(combo)
    return out


def stage_knobs(stage: str, params: dict) -> dict:
    """The knobs (a config section) of a point of a stage's space."""
    out: dict = {}
    for name, value in params.items():
        out.update(_decode(stage, tuple(name.split(".", 1)[1].split("/")), value))
    return out


def _section(stage: str) -> str:
    return next(name for name, stage_, _ in SECTIONS if stage_ == stage)


# What every search leaves out of the solve stages (a --space that names the knob brings
# it back): a CHUNK x CHUNK float32 tile of 128 rows, or any in-chunk solve on 2 warps,
# holds 64 to 256 registers a thread for that tile alone. On the H200 those points spill,
# run 2x to 10x slower than the default, and take 10 to 40 s each to compile (one
# solve_bwd point, CHUNK 128 on 2 warps, ran past 30 s in every bucket it was tried in,
# run 13), so a short tune spent its budget on them.
SEARCH_LIMITS = {
    "solve.CHUNK": [16, 32, 64], "solve.num_warps": [4, 8],
    "solve_bwd.CHUNK": [16, 32, 64], "solve_bwd.num_warps": [4, 8],
}


def bucket_limits(dtype: str, limits: dict | None = None) -> dict:
    """The limits a bucket of this dtype ("bf16", "fp32", ...) searches under: a float32
    bucket's space holds only the solve precisions that keep float32 accuracy
    (config.FLOAT32_ACCURATE), a 16-bit bucket's only the others (the float32-accurate
    ones are slower and buy accuracy 16-bit inputs cannot hold: config.sixteen_bit_limits);
    SEARCH_LIMITS hold for every dtype. `limits` (a user's --space) override both for the
    knobs they name."""
    precision = float32_limits() if dtype == "fp32" else sixteen_bit_limits()
    return {**precision, **SEARCH_LIMITS, **(limits or {})}


def _limit(param: str, values: list, limits: dict) -> list:
    if param not in limits:
        return values
    wanted = limits.pop(param)
    wanted = wanted if isinstance(wanted, list) else [wanted]
    bad = [w for w in wanted if w not in values]
    if bad or not wanted:
        raise DfgenError(f"search space limit {param}: {bad or wanted} not among {values}")
    return [v for v in values if v in wanted]


def grid_size(space: dict) -> int:
    """The number of points of a space ({parameter: values}): all are feasible."""
    size = 1
    for values in space.values():
        size *= len(values)
    return size


def _stage(section: str) -> str:
    return next(stage for name, stage, _ in SECTIONS if name == section)


def params_of(config: KernelConfig, pass_: str) -> dict:
    """The parameters of the whole pass's space (`choices`) that give `config`."""
    out = {"strategy": config.strategy}
    for section, stage, need in SECTIONS:
        if _active(need, pass_, config.strategy):
            knobs = getattr(config, section)
            for group in spec(stage).knob_groups():
                combo = tuple(knobs[name] for name in group)
                out[_param(section, group)] = combo[0] if len(group) == 1 else _encode(combo)
    return out


def config_of(params: dict) -> KernelConfig:
    sections: dict = {}
    for name, value in params.items():
        if "." in name:
            section, knobs = name.split(".", 1)
            group = tuple(knobs.split("/"))
            sections.setdefault(section, {}).update(_decode(_stage(section), group, value))
    return KernelConfig(strategy=params["strategy"], **sections)
