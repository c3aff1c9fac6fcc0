"""Templates: declared knobs, validation, strict rendering, and every rendered source parses."""

import ast
import itertools
import random

import jinja2
import pytest
import torch

from dfgen.kernels.config import KernelConfig, default_config
from dfgen.errors import ConfigError
from dfgen.kernels.build import _environment, specialize
from dfgen.kernels.build import render as render_kernel
from dfgen.kernels.spec import STAGES, spec, templates_dir


def render(stage, dtype, head_dim, knobs):
    return render_kernel(specialize(stage, dtype, head_dim, knobs))


def specialization_name(stage, dtype, head_dim, knobs):
    return specialize(stage, dtype, head_dim, knobs).name


@pytest.mark.parametrize("stage", STAGES)
def test_header_declares_knobs(stage):
    tspec = spec(stage)
    assert tspec.stage == stage
    assert {"num_warps", "num_stages"} <= set(tspec.knobs)
    for knob in tspec.knobs.values():
        assert knob.values and knob.doc and knob.abbr
    assert tspec.constraints


def _feasible_points(stage, head_dim, limit, seed=0):
    tspec = spec(stage)
    names = sorted(tspec.knobs)
    points = [dict(zip(names, vals)) for vals in
              itertools.product(*(tspec.knobs[n].values for n in names))]
    feasible = [p for p in points if tspec.feasible(p, head_dim)]
    random.Random(seed).shuffle(feasible)
    return feasible[:limit], len(points), len(feasible)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_rendered_sources_parse(stage, dtype, head_dim):
    points, total, feasible = _feasible_points(stage, head_dim, limit=40)
    assert feasible > 0
    if head_dim == 128:
        assert feasible < total  # the constraints prune something
    for knobs in points:
        source = render(stage, dtype, head_dim, knobs)
        tree = ast.parse(source)  # indentation and syntax of the generated Python
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "launch" in names
        assert any(n.startswith(stage) and n.endswith("_kernel") for n in names)
        for name, value in knobs.items():
            if name not in ("num_warps", "num_stages", "maxnreg"):  # launch options
                assert f"{name}: tl.constexpr = " in source
        assert f"num_warps={knobs['num_warps']}, num_stages={knobs['num_stages']}" in source
        if knobs.get("maxnreg"):
            assert f"maxnreg={knobs['maxnreg']})" in source
        elif "maxnreg" in knobs:
            assert "maxnreg" not in source.split("LAUNCH = ")[1].splitlines()[0]
        assert "{{" not in source and "{%" not in source


def test_infeasible_and_unknown_knobs_are_rejected_by_name():
    knobs = dict(default_config(64).solve)
    with pytest.raises(ConfigError, match="CHUNK=48"):
        spec("solve_fwd").check({**knobs, "CHUNK": 48}, 64)
    with pytest.raises(ConfigError, match="CHUNK % BLOCK_N == 0 or BLOCK_N == 2 \\* CHUNK"):
        spec("solve_fwd").check({**knobs, "CHUNK": 16, "BLOCK_N": 64, "LOOKAHEAD": 1}, 64)
    spec("solve_fwd").check({**knobs, "CHUNK": 64, "BLOCK_N": 128}, 64)  # two chunks a block
    with pytest.raises(ConfigError, match="BLOCK_N <= CHUNK or BLOCK_N \\* HEAD_DIM <= 8192"):
        spec("solve_fwd").check({**knobs, "CHUNK": 64, "BLOCK_N": 128}, 128)
    with pytest.raises(ConfigError, match="unknown \\['BOGUS'\\]"):
        spec("solve_fwd").check({**knobs, "BOGUS": 1}, 64)
    with pytest.raises(ConfigError, match="missing \\['CHUNK'\\]"):
        spec("solve_fwd").check({k: v for k, v in knobs.items() if k != "CHUNK"}, 64)
    with pytest.raises(ConfigError, match="HEAD_DIM=256"):
        spec("solve_fwd").check({**knobs, "CHUNK": 128, "LOOKAHEAD": 1}, 256)


def test_a_knob_with_a_default_may_be_left_out():
    """Knobs added after configs were written (maxnreg, SPLIT_PREFIX, POLL, SPLIT_AT) have a default: a
    config that leaves them out is valid, and equal to the same config with the defaults set
    (same key, name and file form), so tuned files written before them keep working."""
    tspec = spec("solve_fwd")
    assert tspec.optional() == ["POLL", "SPLIT_AT", "SPLIT_PREFIX", "maxnreg"]
    assert tspec.knobs["SPLIT_AT"].default == 75
    assert tspec.knobs["maxnreg"].default == 0 and tspec.knobs["SPLIT_PREFIX"].default is False
    assert tspec.knobs["POLL"].default == "acquire"
    full = dict(default_config(64).solve)
    old = {k: v for k, v in full.items() if k not in ("maxnreg", "SPLIT_PREFIX", "POLL", "SPLIT_AT")}
    tspec.check(old, 64)
    assert tspec.complete(old) == full
    assert specialization_name("solve_fwd", "bf16", 64, old) == specialization_name("solve_fwd", "bf16", 64, full)
    assert render("solve_fwd", "bf16", 64, old) == render("solve_fwd", "bf16", 64, full)
    parsed = KernelConfig.from_dict({"strategy": "fused", "solve": old})
    assert parsed.solve["maxnreg"] == 0 and parsed.solve["SPLIT_PREFIX"] is False and parsed.to_dict()["solve"] == dict(sorted(full.items()))
    assert parsed.key() == KernelConfig.from_dict({"strategy": "fused", "solve": full}).key()
    with pytest.raises(ConfigError, match="maxnreg=100"):
        tspec.check({**full, "maxnreg": 100}, 64)


def test_a_header_default_must_be_one_of_the_values(tmp_path):
    from dfgen.kernels.spec import parse_header
    text = ("{#- dfgen-knobs\nstage: solve_fwd\nknobs:\n  A:\n    abbr: a\n    values: [1, 2]\n"
            "    default: 3\nconstraints: []\n-#}\n")
    with pytest.raises(ConfigError, match="default of A, 3, is not one of its values"):
        parse_header(text, tmp_path / "x.py.jinja")


def test_forward_config_round_trip_and_errors():
    cfg = default_config(128, strategy="two_stage")
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert KernelConfig.from_dict(cfg.to_dict()).key() == cfg.key()
    with pytest.raises(ConfigError, match="strategy"):
        KernelConfig("three_stage", cfg.solve, cfg.attn).check(128)
    with pytest.raises(ConfigError, match="attn"):
        KernelConfig.from_dict({"strategy": "two_stage", "solve": dict(cfg.solve)})
    with pytest.raises(ConfigError, match="unknown kernel config keys"):
        KernelConfig.from_dict({"solve": {}, "extra": 1})


def test_rendering_is_strict():
    with pytest.raises(jinja2.UndefinedError):
        _environment().from_string("x = {{ not_defined }}").render()
    with pytest.raises(jinja2.UndefinedError):  # a template missing a context variable
        _environment().get_template("solve_fwd.py.jinja").render(knobs={}, head_dim=64)


def test_specialization_names_are_readable_and_distinct():
    knobs = dict(default_config(64).solve)
    name = specialization_name("solve_fwd", "torch.bfloat16", 64, knobs)
    assert name.startswith("solve_fwd__bf16_d64__")
    assert "c64" in name and "n64" in name and "w4" in name
    other = specialization_name("solve_fwd", "bf16", 64, {**knobs, "num_warps": 8})
    assert other != name
    assert specialization_name("solve_fwd", "fp16", 64, knobs) != name
    assert specialization_name("solve_fwd", "bf16", 128, knobs) != name


def test_templates_dir_holds_every_stage():
    for stage in STAGES:
        assert (templates_dir() / f"{stage}.py.jinja").is_file()


def test_constraints_tie_knobs_into_groups_of_feasible_combinations():
    fwd = spec("solve_fwd")
    groups = fwd.knob_groups()
    assert ("CHUNK", "BLOCK_N", "LOOKAHEAD") in groups and ("num_warps",) in groups
    assert sorted(k for g in groups for k in g) == sorted(fwd.knobs)  # each knob in one group
    combos = fwd.feasible_combinations(("CHUNK", "BLOCK_N", "LOOKAHEAD"), 128,
                                       {"CHUNK": [64, 128], "BLOCK_N": [64, 128]})
    assert (128, 128, 2) in combos and (64, 128, 1) not in combos and (128, 64, 3) not in combos
    assert spec("attn_bwd").feasible_combinations(("BLOCK_M",), 128) == [(16,), (32,), (64,)]


@pytest.mark.parametrize("knob, value", [
    ("CHUNK", 64.0), ("CHUNK", True), ("LOOKAHEAD", True), ("num_stages", True),
    ("INV_FP16", 0), ("INV_FP16", 1), ("INV_FP16", "true"), ("SOLVE_PRECISION", 1),
    ("CHUNK", "64"), ("CHUNK", [64]), ("CHUNK", None)])
def test_a_knob_value_must_have_its_values_type(knob, value):
    """64.0 == 64 and True == 1 == LOOKAHEAD's 1: equal is not enough, the type must be the
    declared values' type (else 64.0 reaches torch.zeros, and its memo key is 64's)."""
    knobs = dict(default_config(64).solve)
    with pytest.raises(ConfigError, match=f"solve_fwd: {knob}="):
        spec("solve_fwd").check({**knobs, knob: value}, 64)
    with pytest.raises(ConfigError, match=f"{knob}="):
        KernelConfig.from_dict({"solve": {**knobs, knob: value}}).check(64)


def test_a_rejected_config_leaves_no_memo_behind():
    """The default (CHUNK=64) checked first must not let CHUNK=64.0 through its memo, and a
    rejected config must not make the valid one fail afterwards."""
    good = default_config(64)
    good.check(64, backward=True)
    bad = KernelConfig.from_dict({"solve": {**good.solve, "CHUNK": 64.0}}, defaults=good)
    assert bad.key() != good.key()
    with pytest.raises(ConfigError, match="CHUNK=64.0"):
        bad.check(64, backward=True)
    with pytest.raises(ConfigError, match="CHUNK=64.0"):  # again: nothing was remembered
        bad.check(64)
    assert good.check(64, backward=True) is good


@pytest.mark.parametrize("data, message", [
    ([{"strategy": "fused"}], "must be a mapping, got list"),
    ("fused", "must be a mapping, got str"),
    ({"solve": [["CHUNK", 64]]}, "section 'solve' must be a mapping"),
    ({"solve": {1: 64}}, "knob names must be strings"),
    ({"solve": {"CHUNK": [64]}}, "CHUNK=\\[64\\]"),
    ({"solve": {"CHUNK": {"a": 1}}}, "CHUNK="),
    ({"strategy": ["fused"]}, "strategy must be one of"),
    ({1: {}}, "unknown kernel config keys"),
])
def test_malformed_config_dicts_are_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        KernelConfig.from_dict(data, defaults=default_config(64)).check(64, backward=True)
    with pytest.raises(ConfigError, match=message):
        KernelConfig.from_dict(data).check(64, backward=True)


def test_a_section_may_leave_out_knobs_when_defaults_are_given():
    """With defaults, the knobs a given section leaves out come from the default's section;
    without, the section must name every knob."""
    default = default_config(64)
    parsed = KernelConfig.from_dict({"solve": {"CHUNK": 32, "BLOCK_N": 32, "LOOKAHEAD": 1},
                                     "attn_bwd": {"num_warps": 8}}, defaults=default)
    parsed.check(64, backward=True)
    assert parsed.solve == {**default.solve, "CHUNK": 32, "BLOCK_N": 32, "LOOKAHEAD": 1}
    assert parsed.attn_bwd == {**default.attn_bwd, "num_warps": 8}
    assert parsed.solve_bwd == default.solve_bwd
    with pytest.raises(ConfigError, match="missing \\['BLOCK_N'"):
        KernelConfig.from_dict({"solve": {"CHUNK": 32}}).check(64)


def test_from_dict_parses_an_equal_dict_once_but_tells_types_apart():
    """A dict config passed on every call is parsed once (the per-call path stays a memo
    hit); a dict equal to it but for 64.0 is parsed again, and rejected."""
    default = default_config(64)
    data = {"solve": {"CHUNK": 32, "BLOCK_N": 32, "LOOKAHEAD": 1}}
    first = KernelConfig.from_dict(data, defaults=default)
    assert KernelConfig.from_dict({"solve": dict(data["solve"])}, defaults=default) is first
    assert KernelConfig.from_dict(data) is not first  # other defaults: another config
    floats = KernelConfig.from_dict({"solve": {**data["solve"], "CHUNK": 32.0}}, defaults=default)
    assert floats is not first and floats.key() != first.key()
    with pytest.raises(ConfigError, match="CHUNK=32.0"):
        floats.check(64)
    assert first.check(64) is first


def test_a_retired_knob_at_its_fixed_value_is_dropped_and_any_other_is_refused():
    """solve_fwd retired SPLIT_SOLVE (the kernel always runs as False): an old tuned entry
    that still says SPLIT_SOLVE: false loads as if it did not, True names the removal."""
    from dfgen.errors import ConfigError
    from dfgen.kernels.config import KernelConfig, default_config

    tspec = spec("solve_fwd")
    assert tspec.retired == {"SPLIT_SOLVE": False} and "SPLIT_SOLVE" not in tspec.knobs
    knobs = dict(default_config(64, torch.bfloat16).solve)
    old = dict(knobs, SPLIT_SOLVE=False)
    tspec.check(old, 64)
    assert dict(tspec.complete(old)) == dict(knobs)
    assert KernelConfig.from_dict({"solve": old}).solve == knobs
    assert specialization_name("solve_fwd", "bf16", 64, old) == specialization_name("solve_fwd", "bf16", 64, knobs)
    for value in (True, 0):  # 0 equals False but is not the same value
        with pytest.raises(ConfigError, match="SPLIT_SOLVE was removed"):
            tspec.check(dict(knobs, SPLIT_SOLVE=value), 64)
