"""bench/: the suites in bench/suites.yaml are what the `dfgen` command reads, and the runner
(bench/run.py) lists them. bench/ is not part of the installed package: it is found beside
this tests folder (the checkout), and these tests skip when it is absent."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
pytestmark = pytest.mark.skipif(not (BENCH / "suites.yaml").is_file() or not (BENCH / "run.py").is_file(),
                                reason=f"no bench/ beside the tests ({BENCH}): not a checkout")
# the phases gpu-check.sh has always taken (GPU sessions and notes call them by name)
GPU_CHECK_PHASES = {"tests", "bench", "benchfwd", "benchbwd", "layer", "overhead", "trace", "stages",
                    "variants", "varlen", "tune", "sweep", "models",
                    "tuneset", "workers", "cold", "compare"}


@pytest.fixture(scope="module")
def runner():
    """bench/run.py as a module, loaded from its file (it is no package)."""
    spec = importlib.util.spec_from_file_location("dfgen_bench_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def suites(runner):
    return runner.load_suites()


def test_bucket_suites_are_what_dfgen_tune_reads(runner, suites, tmp_path):
    from dfgen.tools.tuning.tuner import load_buckets

    for name in suites["buckets"]:
        buckets = load_buckets(runner.write_suite(suites, "buckets", name, tmp_path / f"{name}.yaml"))
        assert buckets, name
        keys = [b.key for b in buckets]
        assert len(set(keys)) == len(keys), f"buckets {name} repeats a bucket: {keys}"
        assert keys == [runner.bucket_key(b) for b in suites["buckets"][name]]


def test_spaces_are_within_the_templates_space(runner, suites, tmp_path):
    from dfgen.kernels.spec import spec
    from dfgen.kernels.config import STRATEGIES
    from dfgen.tools.tuning.space import SECTIONS, bucket_limits, choices
    from dfgen.tools.tuning.tuner import load_space

    stages = {section: stage for section, stage, _ in SECTIONS}
    for name in suites["spaces"]:
        limits = load_space(runner.write_suite(suites, "spaces", name, tmp_path / f"{name}.yaml"))
        assert limits, name
        for param, value in limits.items():
            values = value if isinstance(value, list) else [value]
            if param == "strategy":
                assert set(values) <= set(STRATEGIES), (name, param)
                continue
            section, _, knob = param.partition(".")
            assert section in stages, f"space {name}: {param} names no config section"
            declared = spec(stages[section]).knobs
            assert knob in declared, f"space {name}: {param} is not a knob of {stages[section]}"
            assert values and all(declared[knob].allows(v) for v in values), \
                f"space {name}: {param} = {value!r} not within {list(declared[knob].values)}"
        for pass_ in ("fwd", "fwd+bwd"):
            for head_dim in (64, 128):  # raises if a limit leaves a knob group nothing feasible
                space = choices(pass_, head_dim, "", bucket_limits("bf16", dict(limits)))
                assert space["strategy"], (name, pass_, head_dim)


def test_candidates_are_what_dfgen_bench_and_tune_read(runner, suites, tmp_path):
    from dfgen.errors import ConfigError
    from dfgen.tools.arguments import load_configs

    for name, raw in suites["candidates"].items():
        assert not any("SPLIT_SOLVE" in (c.get("solve") or {}) for c in raw), \
            f"candidates {name}: SPLIT_SOLVE is being retired; leave it out"
        configs = load_configs(runner.write_suite(suites, "candidates", name, tmp_path / f"{name}.yaml"))
        assert len(configs) == len(raw)
        assert len({c.key() for c in configs}) == len(configs), f"candidates {name} repeats a config"
        for number, config in enumerate(configs, start=1):
            fits = []
            for head_dim in (64, 128):
                try:
                    config.check(head_dim)
                    fits.append(head_dim)
                except ConfigError:
                    pass
            assert fits, f"candidates {name} #{number} fits neither head dim 64 nor 128: {config}"


def test_shape_variant_and_sweep_suites(runner, suites):
    from dfgen.kernels.config import default_config
    from dfgen.kernels.spec import spec
    from dfgen.tools.arguments import CPU_SHAPES, parse_shapes
    from dfgen.tools.bench import GPU_SHAPES
    from dfgen.tools.tuning.tuner import CPU_BUCKETS, GPU_BUCKETS

    for name, shapes in suites["shapes"].items():
        assert parse_shapes(runner.shapes_text(shapes)) == [tuple(s) for s in shapes], name
    # the named copies of dfgen's own defaults stay equal to them
    assert [tuple(s) for s in suites["shapes"]["bench"]] == list(GPU_SHAPES)
    assert [tuple(s) for s in suites["shapes"]["cpu"]] == list(CPU_SHAPES)
    assert suites["buckets"]["cpu"] == [b.fields() for b in CPU_BUCKETS]
    assert suites["buckets"]["h200"] == [b.fields() for b in GPU_BUCKETS]  # the shipped set
    for name, item in suites["variants"].items():
        for shape in suites["shapes"][item["shapes"]]:
            head_dim = shape[3]
            for variant, knobs in item["variants"].items():
                spec("solve_fwd").check(dict(default_config(head_dim, "bfloat16").solve, **knobs), head_dim)
    for name, item in suites["sweeps"].items():
        assert item["buckets"] in suites["buckets"] and item.get("space", "sweep") in suites["spaces"], name


def test_run_list_names_every_benchmark_and_suite(runner, suites, tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "run.py"), "--list"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in runner.BENCHMARKS:
        assert any(line.split()[:1] == [name] for line in lines), name
    for kind in runner.KINDS:
        for name in suites[kind]:
            assert any(line.split()[:2] == [kind, name] for line in lines), (kind, name)


def test_gpu_scripts_call_registered_benchmarks_and_keep_their_phases(runner, suites):
    text = (BENCH / "gpu" / "gpu-check.sh").read_text()
    phases = set(re.findall(r"^    ([a-z]+)\)", text, re.M))
    assert GPU_CHECK_PHASES <= phases, GPU_CHECK_PHASES - phases
    called = set(re.findall(r"\$run ([a-z][a-z-]*)", text))
    assert called and called <= set(runner.BENCHMARKS), called - set(runner.BENCHMARKS)
    for default in re.findall(r"\$\{SHAPES(?:_WORKERS|_COLD)?:-([a-z0-9-]+)\}", text):
        assert default in suites["buckets"]


def test_no_bench_file_edits_the_import_path():
    for path in BENCH.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            assert "sys.path" not in path.read_text(errors="replace"), path


def test_every_bench_file_is_named_by_the_readme_or_the_runner():
    named = (BENCH / "README.md").read_text() + (BENCH / "run.py").read_text()
    for path in BENCH.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith("."):
            relative = path.relative_to(BENCH).as_posix()
            assert relative in named or path.name in named, f"bench/{relative} is named nowhere"


def test_replay_reads_a_sweep_and_judges_seeds_against_its_best(tmp_path, monkeypatch):
    """bench/run.py replay: a sweep journal (here of a fake worker whose times fall knob by
    knob towards one attn_bwd point) is the table the search is replayed against; each
    seed's pick is judged by the sweep's times, and a search given every point finds the
    best in every seed."""
    from dfgen.select.bucket import Bucket
    from dfgen.tools.tuning import tuner, worker

    space = {"attn_bwd.BLOCK_M": [16, 32], "attn_bwd.BLOCK_N": [16, 32], "attn_bwd.num_warps": 4, "attn_bwd.ONE_LAUNCH": False,
             "attn_bwd.num_stages": [1, 2], "solve_bwd.CHUNK": 16, "solve_bwd.BLOCK_M": 16,
             "solve_bwd.SOLVE_PRECISION": "tf32", "solve_bwd.INV_FP16": [True, False],
             "solve_bwd.num_warps": 4, "solve_bwd.num_stages": 2}

    def fake(request, timeout_s, deadline=None):
        def ms(section, knobs):
            if section == "attn_bwd":
                return 1.0 + (knobs["BLOCK_M"] != 32) + (knobs["BLOCK_N"] != 16) + 0.5 * (knobs["num_stages"] != 2)
            return 2.0 + (knobs["INV_FP16"] is not True)
        if request["op"] == "stage":
            return {"ok": True, "median_ms": ms(request["slot"], request["knobs"]), "error": 0.0}
        config = request["config"]
        total = ms("attn_bwd", config["attn_bwd"]) + ms("solve_bwd", config["solve_bwd"])
        return {"ok": True, "median_ms": total, "error": 0.0, "seconds": 0.0}

    monkeypatch.setattr(worker, "evaluate", fake)
    grid = tmp_path / "grid.journal"
    (tmp_path / "space.yaml").write_text("\n".join(f"{k}: {v}" for k, v in space.items()))
    tuner.tune_bucket(Bucket("fwd+bwd", "bf16", 32, 24, 1), trials=1, sampler="grid", seed=0,
                      storage=tuner.open_storage(str(grid)), timeout_s=10, log=lambda *a: None,
                      limits=tuner.load_space(tmp_path / "space.yaml"))
    run = lambda *args: subprocess.run([sys.executable, str(BENCH / "run.py"), "replay", str(grid),  # noqa: E731
                                        "--space", str(tmp_path / "space.yaml"), *args],
                                       capture_output=True, text=True, timeout=300)
    whole = run("--seeds", "2", "--trials", "100%", "--noise", "0")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    row = [line for line in whole.stdout.splitlines() if line.startswith("| fwd+bwd/bf16/d32/t24/bh1 |")]
    assert row and row[0].split("|")[2:6] == [" 2 / 2 ", " 2 / 2 ", " 1.000x ", " 1.000x "], whole.stdout
    assert "attn_bwd 8, solve_bwd 2" in row[0]
    one = run("--seeds", "3", "--trials", "1", "--noise", "0")  # one trial a stage: a random point
    assert one.returncode == 0 and "/ 3 |" in one.stdout, one.stdout + one.stderr
