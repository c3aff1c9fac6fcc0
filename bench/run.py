#!/usr/bin/env python3
"""The one runner of dfgen's benchmarks, over the named suites of bench/suites.yaml.

    python bench/run.py --list                    every benchmark and suite, one line each
    python bench/run.py NAME [options]            run one benchmark (NAME --help: its options)
    python bench/run.py --write KIND NAME FILE    write a suite in the form the `dfgen` command
                                                  reads (FILE '-': standard output)

It runs against the installed dfgen (`pip install .` first); the Python benchmarks in
bench/benchmarks/ and the `dfgen` command run as child processes, whose exit status the
runner returns. Where a benchmark hands a suite to the `dfgen` command (--shapes, --space,
--try, --configs), the runner writes it to a temporary YAML file and passes that path.
Without a CUDA device, the benchmarks that can run do so in Triton's interpreter at tiny
sizes (their timings are NOT GPU timings); the others say that they need a GPU and exit 2.
Benchmarks are registered below with @benchmark (name, what it needs, one line of help).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

HERE = Path(__file__).resolve().parent
SUITES = HERE / "suites.yaml"
SCRIPTS = HERE / "benchmarks"
KINDS = ("shapes", "buckets", "spaces", "candidates", "variants", "sweeps")
# what a benchmark needs: a CUDA GPU; a GPU, else Triton's interpreter at tiny sizes; neither
NEEDS_GPU, GPU_OR_INTERPRETER, NO_GPU = "GPU", "GPU/interpreter", "no GPU"


# ---- suites ---------------------------------------------------------------------------------

def load_suites(path=SUITES) -> dict:
    data = yaml.safe_load(Path(path).read_text())
    missing = [kind for kind in KINDS if not isinstance(data.get(kind), dict)]
    if missing:
        raise SystemExit(f"{path}: no mapping of {', '.join(missing)}")
    return data


def suite(suites: dict, kind: str, name: str):
    found = suites[kind].get(name)
    if found is None:
        raise SystemExit(f"bench/run.py: no {kind} suite {name!r} in {SUITES.name}; "
                         f"known: {', '.join(suites[kind])}")
    return found


def shapes_text(shapes) -> str:
    """[[B, T, H, D], ...] as the 'B,T,H,D;...' that --shapes options take."""
    return ";".join(",".join(str(x) for x in shape) for shape in shapes)


def shapes_arg(suites: dict, value: str) -> str:
    """A --shapes value: a shape suite's name, or 'B,T,H,D;...' as it is."""
    if value in suites["shapes"]:
        return shapes_text(suites["shapes"][value])
    if any(c.isalpha() for c in value):
        suite(suites, "shapes", value)  # exits naming the known suites
    return value


def bucket_key(fields: dict) -> str:
    """'fwd/bf16/d128/t4096/bh16' (dfgen.select.bucket.Bucket.key, without importing dfgen)."""
    return (f"{fields['pass']}/{fields['dtype']}/d{fields['head_dim']}/t{fields['T']}/bh{fields['BH']}"
            + (f"/{fields['variant']}" if fields.get("variant") else ""))


def suite_for_cli(suites: dict, kind: str, name: str):
    """What --write and the benchmarks hand to the `dfgen` command for a suite."""
    found = suite(suites, kind, name)
    if kind == "shapes":
        return shapes_text(found)
    return found


def write_suite(suites: dict, kind: str, name: str, path) -> str:
    data = suite_for_cli(suites, kind, name)
    text = data + "\n" if isinstance(data, str) else \
        f"# bench/suites.yaml {kind}: {name}\n" + yaml.safe_dump(data, sort_keys=False)
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)
    return str(path)


def describe(kind: str, name: str, item) -> str:
    if kind == "shapes":
        return f"{len(item)} shapes: {shapes_text(item).replace(';', ' ')}"
    if kind == "buckets":
        return f"{len(item)} buckets: " + " ".join(bucket_key(b) for b in item)
    if kind == "spaces":
        fixed = sum(not isinstance(v, list) for v in item.values())
        return f"{len(item)} knob limits ({fixed} fixed): " + " ".join(sorted({p.split('.')[0] for p in item}))
    if kind == "candidates":
        return f"{len(item)} configs (" + ", ".join(sorted({c.get('strategy', 'fused') for c in item})) + ")"
    if kind == "variants":
        return f"shapes {item['shapes']}: " + " ".join(item["variants"])
    return f"buckets {item['buckets']}, space {item.get('space', 'the whole 16-bit space')}"


# ---- running --------------------------------------------------------------------------------

@dataclass
class Context:
    suites: dict
    on_gpu: bool
    tmp: Path  # a temporary folder for suite files, removed when the benchmark ends

    def file(self, kind: str, name: str) -> str:
        return write_suite(self.suites, kind, name, self.tmp / f"{kind}-{name}.yaml")


def dfgen_command() -> list[str]:
    """The `dfgen` command of this Python; -P keeps the working folder (a checkout, maybe)
    off the import path, so that the installed dfgen runs."""
    return [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "dfgen"]


_running: dict = {}  # pid -> whether it leads its own process group (a capped call)


def _stop(signum, frame):
    """SIGTERM (gpu-check.sh's phase cap, timeout(1)): stop the children too, then exit."""
    for pid, own_group in list(_running.items()):
        try:
            os.killpg(pid, signal.SIGTERM) if own_group else os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def call(cmd: list, cap: float | None = None, log=None) -> int:
    """Run cmd (stdout and stderr to `log`, a path, or inherited) and return its exit status.
    With a `cap` (seconds) it runs in its own process group, which is stopped past the cap
    (TERM, then KILL 10 s later; status 124), candidates of a `dfgen tune` included."""
    print("bench/run.py: " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    handle = open(log, "w") if log else None
    try:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=handle,
                                stderr=subprocess.STDOUT if handle else None,
                                start_new_session=cap is not None)
        _running[proc.pid] = cap is not None
        try:
            return proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
            print(f"(stopped at the {cap:g} s cap)", flush=True)
            return 124
        except KeyboardInterrupt:
            _stop(signal.SIGINT, None)
        finally:
            _running.pop(proc.pid, None)
    finally:
        if handle:
            handle.close()


def script(name: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / name)]


def option_given(args: list, option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


@dataclass
class Benchmark:
    name: str
    needs: str
    doc: str
    run: Callable[[list, Context], int]


BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(name: str, needs: str, doc: str):
    def register(fn):
        BENCHMARKS[name] = Benchmark(name, needs, doc, fn)
        return fn
    return register


def parser_for(name: str, passes_to: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"bench/run.py {name}", allow_abbrev=False, description=BENCHMARKS[name].doc,
        epilog=f"Other options go to {passes_to}." if passes_to else None)


def script_benchmark(name: str, file: str, needs: str, doc: str, shapes: str | None = None,
                     cpu_args: tuple = ()):
    """A benchmark that is one script of bench/benchmarks/: options go to it; a --shapes
    value may name a shape suite (`shapes`: the suite given when none is), and without a GPU
    `cpu_args` come first (the options given after them win)."""
    def run(args, ctx):
        args = list(args)
        if shapes is not None:
            for i, arg in enumerate(args[:-1]):
                if arg == "--shapes":
                    args[i + 1] = shapes_arg(ctx.suites, args[i + 1])
            if not option_given(args, "--shapes") and "-h" not in args and "--help" not in args:
                args = ["--shapes", shapes_arg(ctx.suites, shapes if ctx.on_gpu else "cpu"), *args]
        if not ctx.on_gpu:
            args = [*cpu_args, *args]
        return call([*script(file), *args])
    BENCHMARKS[name] = Benchmark(name, needs, doc, run)


def bench_table(name: str, backward: bool):
    def run(args, ctx):
        p = parser_for(name, "`dfgen bench` (--verbose, --no-fla, --dtype, --force)")
        p.add_argument("--shapes", help="a shape suite or 'B,T,H,D;...' (default: bench on a "
                       "GPU, cpu without)")
        p.add_argument("--candidates", help="a candidates suite: each config checked, the "
                       "fastest reported (default: the config the runtime picks)")
        known, rest = p.parse_known_args(args)
        cmd = [*dfgen_command(), "bench", "--shapes",
               shapes_arg(ctx.suites, known.shapes or ("bench" if ctx.on_gpu else "cpu"))]
        if known.candidates:
            cmd += ["--configs", ctx.file("candidates", known.candidates)]
        return call(cmd + (["--backward"] if backward else []) + rest)
    return run


benchmark("fwd", GPU_OR_INTERPRETER, "forward table, dfgen against SDPA and fla: `dfgen bench` "
          "over a shape suite (--shapes bench), as the runtime picks or over --candidates")(
    bench_table("fwd", backward=False))
benchmark("fwdbwd", GPU_OR_INTERPRETER, "forward+backward table with peak memory: "
          "`dfgen bench --backward` (same options as fwd)")(bench_table("fwdbwd", backward=True))

script_benchmark("stages", "stages.py", NEEDS_GPU, "each stage of the forward and backward alone "
                 "beside SDPA, and the forward solve without its wavefront waits (--shapes bench)",
                 shapes="bench")
script_benchmark("step-trace", "step_trace.py", NEEDS_GPU, "where a forward wavefront step goes, "
                 "from the GPU's timer inside the kernel (--shapes trace)", shapes="trace")


@benchmark("variants", NEEDS_GPU, "the forward solve under knob variants side by side, per "
           "variants suite (d128 d64 by default; --variants 'name: K=v,...;...' overrides)")
def run_variants(args, ctx):
    p = parser_for("variants", "bench/benchmarks/solve_variants.py (--module d128=FILE)")
    p.add_argument("suites", nargs="*", help="variants suites (default: all)")
    p.add_argument("--variants", help="'name: KNOB=value,...;...' instead of the suite's")
    p.add_argument("--shapes", help="a shape suite or 'B,T,H,D;...' instead of the suite's")
    known, rest = p.parse_known_args(args)
    status = 0
    for name in known.suites or list(ctx.suites["variants"]):
        item = suite(ctx.suites, "variants", name)
        variants = known.variants or ";".join(
            f"{v}: " + ",".join(f"{k}={x if isinstance(x, str) else json.dumps(x)}" for k, x in knobs.items())
            for v, knobs in item["variants"].items())
        shapes = shapes_arg(ctx.suites, known.shapes or item["shapes"])
        status = max(status, call([*script("solve_variants.py"), "--shapes", shapes,
                                   "--variants", variants, *rest]))
    return status


script_benchmark("varlen", "varlen.py", NEEDS_GPU, "packed variable-length throughput against an "
                 "equal-length batch of the same tokens")
script_benchmark("decode", "decode.py", NEEDS_GPU, "a decode step against SDPA's one-query "
                 "attention over the same cache, and a prefill with return_cache against the forward")
script_benchmark("overhead", "overhead.py", GPU_OR_INTERPRETER, "dfgen's CPU time per call above "
                 "the kernels (dispatch anywhere; call, launch and stubbed launch on a GPU)")
script_benchmark("probe-stages", "probe_stages.py", GPU_OR_INTERPRETER, "each stage alone over a "
                 "matrix of dtypes, head dims, 'B,T,H' shapes and knob overrides, one process per "
                 "case: ok / WRONG / CRASH", cpu_args=("--dtypes", "bf16,fp32", "--head-dims", "16,32",
                                                        "--shapes", "1,40,1"))
script_benchmark("compile-check", "compile_check.py", NO_GPU, "compile every kernel variant for "
                 "sm_90 without a GPU (Triton AOT) and report ptxas registers and spills (CI runs it)")


@benchmark("tune", GPU_OR_INTERPRETER, "`dfgen tune` over a bucket suite (--buckets h200; cpu "
           "without a GPU) in a space (--space h200-bf16), candidates tried first (--candidates h200)")
def run_tune(args, ctx):
    p = parser_for("tune", "`dfgen tune` (--gpu, --minutes, --trials, --storage, --out, ...)")
    p.add_argument("--buckets", help="a bucket suite (default: h200 on a GPU, cpu without)")
    p.add_argument("--space", default="h200-bf16", help="a space suite, or none")
    p.add_argument("--candidates", default="h200", help="a candidates suite, or none")
    known, rest = p.parse_known_args(args)
    cmd = [*dfgen_command(), "tune", "--shapes",
           ctx.file("buckets", known.buckets or ("h200" if ctx.on_gpu else "cpu"))]
    if known.space != "none":
        cmd += ["--space", ctx.file("spaces", known.space)]
    if known.candidates != "none":
        cmd += ["--try", ctx.file("candidates", known.candidates)]
    return call(cmd + rest)


def _packaged_tuned_file():
    """The packaged tuned file of the GPU present (None: none ships)."""
    import torch

    from dfgen.select.gpu import gpu_key
    from dfgen.settings import packaged_dir

    folder = packaged_dir("tuned")
    path = folder / f"{gpu_key(torch.cuda.get_device_name())}.yaml" if folder else None
    return path if path is not None and path.exists() else None


@benchmark("sweep", NEEDS_GPU, "Optuna against an exhaustive sweep per sweeps suite: every stage "
           "swept, then TPE (3 seeds, cold start, at most a quarter of each stage's points), then "
           "sweep-compare (ranks in the sweep) and compare-configs (the picks end to end)")
def run_sweep(args, ctx):
    p = parser_for("sweep")
    p.add_argument("sweeps", nargs="*", help="sweeps suites (default: all)")
    p.add_argument("--gpu", help="passed to `dfgen tune --gpu`")
    p.add_argument("--logs", help="folder for the journals and logs (default: a new one in /tmp)")
    p.add_argument("--grid-cap", type=float, default=360, help="seconds per grid (default 360)")
    p.add_argument("--tpe-cap", type=float, default=60, help="seconds per TPE seed (default 60)")
    p.add_argument("--jobs", type=int, default=8, help="compile-ahead processes of the grid and the "
                   "seeds, as `dfgen tune --jobs` (8)")
    p.add_argument("--seeds", type=int, default=3, help="TPE seeds (default 3)")
    p.add_argument("--tuned", help="a tuned file whose entries join the end-to-end comparison "
                   "(default: the packaged file for this GPU, if any)")
    p.add_argument("--skip-grid", action="store_true", help="keep the grid journal already in "
                   "--logs (sweep-NAME-grid.journal, e.g. carried from an earlier session)")
    known = p.parse_args(args)
    from dfgen.tools.tuning.tuner import load_space

    logs = Path(known.logs or tempfile.mkdtemp(prefix="dfgen-sweep-"))
    logs.mkdir(parents=True, exist_ok=True)
    gpu = ["--gpu", known.gpu] if known.gpu else []
    tuned = known.tuned or _packaged_tuned_file()
    status = 0
    for name in known.sweeps or list(ctx.suites["sweeps"]):
        item = suite(ctx.suites, "sweeps", name)
        buckets = ctx.file("buckets", item["buckets"])
        tune = [*dfgen_command(), "tune", *gpu, "--shapes", buckets, "--total-minutes", "0"]
        space = load_space(ctx.file("spaces", item["space"])) if item.get("space") else None
        if space is not None:
            tune += ["--space", ctx.file("spaces", item["space"])]
        grid = logs / f"sweep-{name}-grid.journal"
        failed = 0 if known.skip_grid and grid.exists() else call(tune + [  # the tune's own clock stops the grid before the cap kills it
            "--sampler", "grid", "--minutes", f"{known.grid_cap / 60:g}", "--jobs", str(known.jobs),
            "--storage", grid, "--out", logs / f"sweep-{name}.yaml"], known.grid_cap + 60,
            logs / f"sweep-{name}-grid.txt")
        seeds = []
        for seed in range(known.seeds):  # every stage sampled (--sweep-max 0), a quarter of its points
            seeds.append(logs / f"sweep-{name}-tpe-seed{seed}.journal")
            failed |= call(tune + [
                "--trials", "25%", "--sweep-max", "0", "--jobs", str(known.jobs), "--seed",
                str(seed), "--cold-start", "--minutes", f"{known.tpe_cap / 60:g}", "--storage",
                seeds[-1], "--out", logs / f"optuna-{name}.yaml"], known.tpe_cap + 60,
                logs / f"sweep-{name}-tpe-seed{seed}.txt")
        status = status or (1 if failed else 0)
        for log in sorted(logs.glob(f"sweep-{name}-*.txt")):
            print("".join(line for line in log.read_text().splitlines(True) if ": best" in line), end="")
        compared = call([*script("sweep_compare.py"), grid, *seeds], log=logs / f"sweep-{name}-compare.txt")
        retimed = call([*script("compare_configs.py"), "--buckets", buckets, f"sweep={grid}",
                        *(f"seed{i}={j}" for i, j in enumerate(seeds)),
                        *([f"tuned={tuned}"] if tuned else [])],
                       log=logs / f"sweep-{name}-end-to-end.txt")
        status = status or compared or retimed
        for part in ("compare", "end-to-end"):
            print((logs / f"sweep-{name}-{part}.txt").read_text(), end="")
    print(f"sweep logs and journals: {logs}")
    return status


script_benchmark("sweep-compare", "sweep_compare.py", NO_GPU, "rank the picks of sampler studies "
                 "in an exhaustive sweep: GRID_JOURNAL TPE_JOURNAL...")
script_benchmark("replay", "replay.py", NO_GPU, "replay the tuner's stage search against an "
                 "exhaustive sweep's timings, many seeds, no GPU: GRID_JOURNAL [--seeds N] ...")
script_benchmark("trial-rate", "trial_rate.py", NO_GPU, "trials per minute of tune journals and "
                 "their picks side by side: JOURNAL...")
script_benchmark("compare-configs", "compare_configs.py", NEEDS_GPU, "the default, tuned files' "
                 "entries and tune journals' stage bests, end to end side by side: --buckets FILE "
                 "(or --tuned FILE) NAME=FILE...")


# ---- the command ----------------------------------------------------------------------------

def list_all(suites: dict) -> None:
    print("benchmarks: python bench/run.py NAME [options] (NAME --help lists its options)")
    for b in BENCHMARKS.values():
        print(f"  {b.name:14s} [{b.needs}] {b.doc}")
    print(f"suites in {SUITES.relative_to(HERE.parent)} "
          "(python bench/run.py --write KIND NAME FILE writes one for the dfgen command):")
    for kind in KINDS:
        for name, item in suites[kind].items():
            print(f"  {kind:10s} {name:11s} {describe(kind, name, item)}")


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Benchmarks: " + ", ".join(BENCHMARKS) +
                                     " (--list says what each does and needs).")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and suites")
    parser.add_argument("--write", nargs=3, metavar=("KIND", "NAME", "FILE"),
                        help=f"write a suite ({', '.join(KINDS[:4])}) for the dfgen command")
    parser.add_argument("name", nargs="?", help="the benchmark to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its options")
    opts = parser.parse_args(argv)
    suites = load_suites()
    if opts.list:
        list_all(suites)
        return 0
    if opts.write:
        kind, name, path = opts.write
        if kind not in KINDS[:4]:
            parser.error(f"--write KIND is one of {', '.join(KINDS[:4])}")
        write_suite(suites, kind, name, path)
        return 0
    if opts.name is None:
        parser.print_help()
        return 2
    if opts.name not in BENCHMARKS:
        parser.error(f"no benchmark {opts.name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[opts.name]
    asks_help = "-h" in opts.args or "--help" in opts.args
    on_gpu = bench.needs != NO_GPU and not asks_help and gpu_present()
    if bench.needs == NEEDS_GPU and not on_gpu and not asks_help:
        print(f"bench/run.py {bench.name}: needs a CUDA GPU and none is present; nothing run",
              file=sys.stderr)
        return 2
    if bench.needs == GPU_OR_INTERPRETER and not on_gpu and not asks_help:
        os.environ["TRITON_INTERPRET"] = "1"
        print(f"bench/run.py {bench.name}: no CUDA device: running in Triton's interpreter at a "
              "tiny size; its timings are NOT GPU timings", file=sys.stderr, flush=True)
    import dfgen

    print(f"bench/run.py {bench.name}: dfgen {dfgen.__version__} from "
          f"{Path(dfgen.__file__).resolve().parent}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _stop)
    with tempfile.TemporaryDirectory(prefix="dfgen-bench-") as tmp:
        return bench.run(opts.args, Context(suites, on_gpu, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
