"""The `dfgen` command. Each subcommand is a small function returning an exit code;
heavy modules are imported inside them, so `dfgen --help` stays fast."""

from __future__ import annotations

import argparse
import os
import time
import sys

from ..errors import DfgenError
from ..settings import DTYPE_NAMES


def _default_for(head_dim: int, dtype: str, strategy: str = "fused"):
    """The built-in default config at this head dim and dtype, after checking the head dim."""
    from ..errors import InputError
    from ..kernels.config import SUPPORTED_HEAD_DIMS, default_config
    from ..settings import torch_dtype

    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise InputError(f"--head-dim {head_dim} is not supported; expected one of "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    return default_config(head_dim, torch_dtype(dtype), strategy)


def _use_interpreter_without_gpu() -> bool:
    """Without a CUDA device, run kernels in Triton's interpreter. Returns True if so."""
    import torch

    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def cmd_emit(args) -> int:
    from ..errors import InputError
    from ..kernels.build import emit, specialize
    from ..kernels.config import SECTION_OF_STAGE
    from ..kernels.decode import default_decode_knobs
    from ..kernels.padding import kernel_head_dim
    from ..kernels.spec import ALL_STAGES, DECODE
    from ..settings import torch_dtype
    from .arguments import parse_sets

    head_dim = args.head_dim
    defaults = _default_for(head_dim, args.dtype)
    sets = parse_sets(args.set)
    if sets and not args.stage:
        raise InputError("--set needs --stage (each knob belongs to one stage)")
    wide = kernel_head_dim(head_dim, torch_dtype(args.dtype))  # what runs (kernels/padding.py)
    if wide != head_dim:
        print(f"# head dim {head_dim} in {args.dtype} runs the head-dim-{wide} kernels (inputs "
              "zero-padded; the decode kernels mask the extra columns): those are printed",
              file=sys.stderr)
    stages = [args.stage] if args.stage else list(ALL_STAGES)
    parts = []
    for stage in stages:
        base = (default_decode_knobs(head_dim, torch_dtype(args.dtype)) if stage == DECODE
                else getattr(defaults, SECTION_OF_STAGE[stage]))
        knobs = {**base, **sets}
        path, text = emit(specialize(stage, args.dtype, wide, knobs))
        if not args.stage:  # all of them, one after another: say which is which
            text = (f"# dfgen emit: {stage}, {args.dtype}, head dim {head_dim}, knobs "
                    + " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) + "\n" + text)
        parts.append(text)
        print(f"# {stage} cached as {path}", file=sys.stderr)
    text = "\n".join(parts)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_bench(args) -> int:
    interpreted = _use_interpreter_without_gpu()
    from ..errors import ConfigError
    from ..settings import torch_dtype
    from .arguments import check_cpu_sizes, load_configs, parse_shapes
    from .bench import run

    dtype = torch_dtype(args.dtype)
    shapes = parse_shapes(args.shapes) if args.shapes is not None else None
    try:
        configs = load_configs(args.configs) if args.configs else None
    except ConfigError as err:
        raise ConfigError(f"--configs {err}") from None
    if interpreted and shapes and not args.force:
        check_cpu_sizes(shapes)
    if interpreted:
        print("dfgen bench: no CUDA device; running in Triton's interpreter at a tiny size "
              "(timings are NOT GPU timings)", flush=True)
    print(run(shapes, dtype, configs, with_fla=not args.no_fla, verbose=args.verbose,
              backward=args.backward))
    return 0


GPU_MINUTES = 3.0  # a plain `dfgen tune`'s cap per bucket on a GPU
GPU_TOTAL_MINUTES = 20.0  # ... and on the whole tune (the shipped set: 31 buckets, about 39 s each)
MIN_BUCKET_S = 20.0  # a bucket given less of the total than this is not started
INTERPRETER_MINUTES = 10.0  # ... and in the interpreter (its one tiny bucket: about a minute)
CANDIDATE_TIMEOUT_S = 120.0  # one candidate in the worker: compiling (unless compiled ahead), checking, timing
GPU_SWEEP_MAX = 128  # stages.SWEEP_MAX (named here so that `dfgen --help` imports no optuna)
INTERPRETER_SWEEP_MAX = 16  # the interpreter's times show only that the pipeline runs: sample its stages


def _tune_workers(args) -> int:
    """`--workers N`: N tune processes on one shared study, one per GPU (CUDA_VISIBLE_DEVICES);
    without a GPU, N interpreter processes."""
    import subprocess

    import torch

    from ..settings import cache_root

    gpus = torch.cuda.device_count()
    if gpus and args.workers > gpus:
        raise DfgenError(f"--workers {args.workers} but only {gpus} GPU(s) are present")
    storage = args.storage or str(cache_root() / "studies" / f"workers-{os.getpid()}.journal")
    argv = list(args.argv)
    if "--workers" in argv:  # drop the flag and its value; the workers run one each
        i = argv.index("--workers")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--workers=")]
    if not args.storage:
        argv += ["--storage", storage]
    procs = []
    for worker in range(args.workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(worker)
        procs.append(subprocess.Popen([sys.executable, "-m", "dfgen", *argv, "--seed",
                                       str(args.seed + worker)], env=env))
    codes = [p.wait() for p in procs]
    print(f"dfgen tune: {args.workers} workers finished with exit codes {codes}")
    return max(codes)


def _earlier_entries(out) -> dict:
    """The entries of the tuned file a tune merges into (their configs are tried first);
    none if it is missing or unreadable (the merge then reports the problem)."""
    from ..errors import ConfigError
    from ..select import tuned_file

    try:
        return tuned_file.read(out)["entries"] if out.exists() else {}
    except ConfigError as err:
        print(f"dfgen tune: {err}; its configs are not re-tried", flush=True)
        return {}


def _configs_to_try(path) -> list:
    """--try FILE (a config or a list, as `dfgen bench --configs` reads): their dict forms;
    sections a config lacks come from each bucket's default."""
    from ..errors import ConfigError
    from .arguments import load_configs

    try:
        return [config.to_dict() for config in load_configs(path)]
    except ConfigError as err:  # load_configs turns every defect of the file into one
        raise DfgenError(f"--try {err}") from None


def _check_gpu(args, provenance: dict, interpreted: bool) -> str:
    """The key of what is tuned: the GPU present (or the interpreter); a --gpu naming
    anything else is refused."""
    present = provenance["gpu"]
    if args.gpu is None or args.gpu == present:
        return present
    if interpreted:
        raise DfgenError(f"--gpu {args.gpu}: no CUDA GPU is present (key {present}, Triton's "
                         "interpreter); leave --gpu out to run the tune in the interpreter")
    if not present.startswith(args.gpu + "-"):
        raise DfgenError(f"--gpu {args.gpu} is not the GPU present ({provenance['device']}, "
                         f"key {present}); leave --gpu out to tune the GPU present")
    return present


def _check_numbers(args) -> None:
    if args.trials is not None:
        text = args.trials.strip()
        try:
            number = float(text[:-1]) if text.endswith("%") else int(text)
        except ValueError:
            number = None
        if number is None or not number > 0 or (text.endswith("%") and not number <= 100):
            raise DfgenError(f"--trials must be a number of trials >= 1 or a share of each "
                             f"stage's points such as 25%, got {args.trials!r}")
        args.trials = text if text.endswith("%") else int(text)
    for flag, value, low, strict in (("--jobs", args.jobs, 0, False),
                                     ("--sweep-max", args.sweep_max, 0, False),
                                     ("--workers", args.workers, 1, False),
                                     ("--minutes", args.minutes, 0, False),
                                     ("--total-minutes", args.total_minutes, 0, False),
                                     ("--timeout", args.timeout, 0, True)):
        if value is not None and (value <= low if strict else value < low):
            raise DfgenError(f"{flag} must be {'>' if strict else '>='} {low}, got {value:g}")


def _tune_buckets(args, interpreted: bool) -> list:
    """The buckets to tune: the built-in set (or --shapes), filtered by --passes. The
    interpreter's plain run tunes its forward bucket alone (its decode bucket, with
    --passes decode): CI runs it, and a decode bucket would add about two thirds."""
    from ..select.bucket import PASSES
    from .tuning import tuner

    if args.shapes:
        buckets = tuner.load_buckets(args.shapes)
    elif not interpreted:
        buckets = tuner.GPU_BUCKETS
    else:  # the plain run's one bucket; its decode bucket only when --passes asks
        buckets = tuner.CPU_BUCKETS + (tuner.CPU_DECODE_BUCKETS if args.passes else [])
    if args.head_dims is not None:
        try:
            dims = {int(d) for d in args.head_dims.split(",")}
        except ValueError:
            raise DfgenError(f"--head-dims {args.head_dims!r}: expected a comma list of head "
                             "dims, e.g. 64,128") from None
        kept = [b for b in buckets if b.head_dim in dims]
        if not kept:
            raise DfgenError(f"--head-dims {args.head_dims} keeps none of the {len(buckets)} "
                             f"bucket(s) (their head dims: "
                             f"{', '.join(map(str, sorted({b.head_dim for b in buckets})))})")
        buckets = kept
    if args.passes is None:
        return buckets
    wanted = [p.strip() for p in args.passes.split(",")]
    if not all(p in PASSES for p in wanted):
        raise DfgenError(f"--passes {args.passes!r}: expected a comma list of "
                         f"{', '.join(PASSES[:-1])} and {PASSES[-1]}")
    kept = [b for b in buckets if b.pass_ in wanted]
    if not kept:
        source = f"of --shapes {args.shapes}" if args.shapes else \
            ("the interpreter tunes" if interpreted else "of the built-in set")
        raise DfgenError(f"--passes {args.passes} keeps none of the {len(buckets)} "
                         f"bucket(s) {source}; nothing to tune")
    return kept


def _where_the_runtime_reads(out, interpreted: bool) -> str:
    """Which folder the runtime reads the written file from, or a warning that it will
    not (outside its folders, or another file is found first for this GPU)."""
    import warnings
    from pathlib import Path

    import torch

    from ..select.dispatch import Dispatcher
    from ..select.gpu import identify
    from ..settings import tuned_search_dirs, user_tuned_dir

    dirs = tuned_search_dirs()
    folder = Path(out).resolve().parent
    if folder not in [d.resolve() for d in dirs]:
        return (f"note: the runtime does not read {out}: it searches "
                f"{', '.join(str(d) for d in dirs)}; copy the file into {user_tuned_dir()} "
                "(or set DFGEN_TUNED_DIR) to use it")
    with warnings.catch_warnings():  # only which file serves matters here
        warnings.simplefilter("ignore")
        served = Dispatcher(identify(torch.device("cpu" if interpreted else "cuda")), dirs).path
    if served is not None and served.resolve() != Path(out).resolve():
        return (f"warning: the runtime reads {served} for this GPU, found before {out}; "
                "move it away to use the new file")
    return f"the runtime reads it from {folder} (`dfgen show` lists what serves each bucket)"


def cmd_tune(args) -> int:
    _check_numbers(args)
    interpreted = _use_interpreter_without_gpu()
    from pathlib import Path

    import functools

    from ..select import tuned_file
    from ..settings import cache_root, user_tuned_dir
    from .tuning import decode_tune, tuner
    from .tuning.progress import TuneProgress, clock_text

    provenance = tuner.device_provenance()
    key = _check_gpu(args, provenance, interpreted)
    buckets = _tune_buckets(args, interpreted)
    limits = tuner.load_space(args.space) if args.space else None
    tried_first = _configs_to_try(args.try_configs) if args.try_configs else []
    if args.workers > 1:
        return _tune_workers(args)
    out = Path(args.out) if args.out else user_tuned_dir() / f"{key}.yaml"
    if interpreted:
        print("dfgen tune: no CUDA device; tuning in Triton's interpreter at a tiny size. "
              "NOT GPU TIMINGS: they only show that the pipeline runs.", flush=True)
    else:
        print(f"dfgen tune: tuning {provenance['device']} (key {key})", flush=True)
    trials = args.trials or (4 if interpreted else 30)
    minutes = args.minutes if args.minutes is not None else \
        (INTERPRETER_MINUTES if interpreted else GPU_MINUTES)
    minutes = minutes or None  # 0: no cap
    total = args.total_minutes if args.total_minutes is not None else \
        (None if interpreted else GPU_TOTAL_MINUTES)
    total = total or None
    if args.plot:
        from .tuning import plot

        plot.require_matplotlib()
    from .tuning.compile_ahead import CompileAhead

    jobs = 0 if interpreted else (args.jobs if args.jobs is not None else
                                  max(1, min(8, (os.cpu_count() or 2) // 2)))
    sweep_max = args.sweep_max if args.sweep_max is not None else \
        (INTERPRETER_SWEEP_MAX if interpreted else GPU_SWEEP_MAX)
    storage_spec = args.storage or str(cache_root() / "studies" / f"{key}.journal")
    storage = tuner.open_storage(storage_spec)
    converge = args.trials is None  # the default trials refine on to a local optimum
    progress = TuneProgress(len(buckets), trials, minutes, total, converge=converge)
    ahead = CompileAhead.for_device(jobs, args.timeout)
    print(f"dfgen tune: {progress.budget_text(args.timeout, sweep_max)}; one timing worker"
          + (f", {jobs} compiling ahead" if ahead else "") + f", sampler {args.sampler}"
          + (f", space limited by {args.space}" if args.space else "")
          + f", study storage {storage_spec} (optuna-dashboard reads it); results go to {out}",
          flush=True)
    earlier = _earlier_entries(out)
    results, failed, chosen, skipped = [], [], {}, []
    learned: dict = {}  # (pass, dtype, head dim, variant) -> the stage bests of its buckets so far
    started = time.monotonic()
    for number, bucket in enumerate(buckets):
        bucket_key = bucket.key
        bucket_minutes = minutes
        if total is not None:  # an equal share of what is left (a bucket done early leaves more)
            share = (total * 60 - (time.monotonic() - started)) / (len(buckets) - number)
            if share < MIN_BUCKET_S:
                skipped = [b.key for b in buckets[number:]]
                break
            bucket_minutes = share / 60 if minutes is None else min(minutes, share / 60)
        forward = None
        if bucket.backward:  # the forward bucket's choice for this shape: this tune's, else the file's
            forward_key = bucket._replace(pass_="fwd").key
            forward = chosen.get(forward_key) or earlier.get(forward_key, {}).get("config")
        group = (bucket.pass_, bucket.dtype, bucket.head_dim, bucket.variant)
        # after the tuned file's entry (incumbent): the nearest bucket's bests, then --try
        starts = learned.get(group, [])[-2:][::-1] + tried_first
        # a decoding step's bucket: its one stage, its own kind of config (decode_tune.py)
        tune = decode_tune.tune_decode_bucket if bucket.decode else functools.partial(
            tuner.tune_bucket, forward=forward,
            strategy_margin=None if interpreted else tuner.STRATEGY_MARGIN)
        try:
            result = tune(bucket, trials=trials, sampler=args.sampler, seed=args.seed,
                          storage=storage, timeout_s=args.timeout, minutes=bucket_minutes,
                          limits=limits, starts=starts, cold_start=args.cold_start,
                          progress=progress, sweep_max=sweep_max, ahead=ahead, converge=converge,
                          incumbent=earlier.get(bucket_key, {}).get("config"))
        except DfgenError as err:  # this bucket found nothing; the others may
            print(f"dfgen tune: {err}", flush=True)
            failed.append(bucket_key)
            continue
        results.append(result)
        chosen[bucket_key] = result.entry["config"]
        learned.setdefault(group, []).extend(c.to_dict() for c in result.bests)
        # written after every bucket: an interrupted tune keeps what it finished
        tuned_file.merge(out, provenance, {result.key: result.entry})
        if args.plot:
            print(f"{result.key}: search plotted in "
                  f"{plot.plot_search(result.studies, result.key, result.entry, args.plot)}", flush=True)
    if ahead is not None:
        print(f"dfgen tune: {ahead.summary()}")
        ahead.close()
    if results:
        print(tuner.summary_table(results))
        print(f"wrote {out} ({len(results)} bucket(s))")
        print(_where_the_runtime_reads(out, interpreted))
    print(f"dfgen tune: {len(results)} bucket(s) in {clock_text(time.monotonic() - started)} "
          "of wall time" + (f" (--total-minutes {total:g})" if total else ""), flush=True)
    if skipped:
        print(f"dfgen tune: the --total-minutes {total:g} budget ran out before {len(skipped)} "
              f"bucket(s): {', '.join(skipped)}; not tuned (run again with more --total-minutes, "
              "or --shapes with those buckets: the studies resume)")
    if failed:
        print(f"dfgen tune: nothing written for {len(failed)} bucket(s) (a tuned entry they had "
              f"stays; the reason is above): {', '.join(failed)}"
              + ("" if results else f"; nothing written to {out}"))
        return 1
    return 0


def _this_dispatcher():
    import torch

    from ..select.dispatch import dispatcher_for

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return dispatcher_for(device)


def cmd_show(args) -> int:
    if args.default:
        import yaml

        config = _default_for(args.head_dim, args.dtype, args.strategy)
        print(f"# dfgen's built-in default config: head dim {args.head_dim}, {args.dtype}, "
              f"{args.strategy} (a config may leave out any section or knob: these fill it)")
        sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    disp = _this_dispatcher()
    ident = disp.identity
    print(f"GPU: {ident.name} (key {ident.key}, family {ident.family}, compute capability "
          f"{ident.compute_capability}, {ident.sm_count} SMs)")
    print("tuned folders searched: " + ", ".join(str(d) for d in disp.dirs))
    for message in disp.skipped:
        print(f"skipped (unusable): {message}")
    if disp.path is None:
        print("no tuned file serves this GPU: every call uses the built-in defaults")
        return 0
    print(f"tuned file: {disp.path} ({disp.match})")
    from ..select.bucket import Bucket

    for key, entry in sorted(disp.data["entries"].items()):
        choice = disp.choose(Bucket.from_fields(entry, key))
        stale, checked = disp.stale(entry), disp.checked_here(entry)
        note = ("" if not stale and checked is None else
                " [" + (f"tuned with {', '.join(stale)}; " if stale else "")
                + {None: "unchecked", True: "`dfgen check` passed it here",
                   False: "`dfgen check` failed it here"}[checked] + "]")
        print(f"  {key} -> {choice.source}: {choice.described()}{note}")
    return 0


def cmd_check(args) -> int:
    _use_interpreter_without_gpu()
    import datetime

    import torch

    from ..kernels.config import KernelConfig
    from ..select import tuned_file
    from .check import validate_config, validate_decode_entry

    disp = _this_dispatcher()
    for message in disp.skipped:
        print(f"FAIL {message}")
    if disp.path is None:
        print(f"dfgen check: no usable tuned file for {disp.identity.key}; nothing to check")
        return 1 if disp.skipped else 0
    device = torch.device("cpu" if disp.identity.key == "cpu-interpreter" else "cuda")
    versions = dict(torch=str(torch.__version__),
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    failed, records = len(disp.skipped), {}
    for key, entry in sorted(disp.data["entries"].items()):
        try:
            if entry["pass"] == "decode":
                ok, message = validate_decode_entry(entry, device, max_T=args.max_t)
            else:
                ok, message = validate_config(KernelConfig.from_dict(entry["config"]), entry,
                                              device, max_T=args.max_t)
        except DfgenError as err:  # knobs the running templates do not take
            ok, message = False, str(err)
        failed += not ok
        # recorded under the versions the entry goes stale against (its kind's templates)
        records[key] = dict(disp.running_for(entry), **versions, passed=ok, result=message[:300])
        print(f"{'PASS' if ok else 'FAIL'} {key}: {message}", flush=True)
    passed = len(disp.data["entries"]) + len(disp.skipped) - failed
    print(f"{passed} passed, {failed} failed ({disp.path})")
    if args.record:
        target = _record_target(disp.path, disp.identity.key)
        if target != disp.path:
            _copy_atomically(disp.path, target)
        tuned_file.record_checks(target, records)
        print(f"recorded in {target}" + ("" if target == disp.path else
              f" (a copy of {disp.path}, which is not yours to change; the runtime reads the copy first)"))
    return 1 if failed else 0


def _record_target(path, key: str):
    """Where `dfgen check --record` writes: the file itself, unless it is inside the
    installed package (or not writable): then a copy in the user's tuned folder."""
    from pathlib import Path

    from ..settings import packaged_dir, user_tuned_dir

    packaged = packaged_dir("tuned")
    inside_package = packaged is not None and Path(path).resolve().parent == packaged.resolve()
    if inside_package or not os.access(path, os.W_OK):
        return user_tuned_dir() / f"{key}.yaml"
    return Path(path)


def _copy_atomically(source, target) -> None:
    from pathlib import Path

    from ..files import atomic_write_text

    atomic_write_text(target, Path(source).read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    emit = sub.add_parser("emit", help="print (or write) the generated Triton source of a stage")
    emit.add_argument("--stage", choices=["solve_fwd", "attn_fwd", "solve_bwd", "attn_bwd", "decode"],
                      help="the stage to print (default: all of them, each headed by a comment "
                      "naming it and its knobs)")
    emit.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16")
    emit.add_argument("--head-dim", type=int, default=128)
    emit.add_argument("--set", action="append", metavar="KNOB=VALUE",
                      help="override a knob of --stage's section of the default config "
                      "(repeatable)")
    emit.add_argument("--out", help="write the source to this file instead of stdout")
    emit.set_defaults(func=cmd_emit)

    bench = sub.add_parser("bench", help="benchmark against torch SDPA and fla")
    bench.add_argument("--shapes", help="'B,T,H,D;B,T,H,D;...' (default: the standard set)")
    bench.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16")
    bench.add_argument("--configs", help="YAML file with a forward config or a list of them; "
                       "each is checked against the reference, the fastest is reported "
                       "(default: the built-in config)")
    bench.add_argument("--verbose", action="store_true", help="print every candidate's time")
    bench.add_argument("--backward", action="store_true",
                       help="time forward+backward (and report peak memory) instead of forward")
    bench.add_argument("--no-fla", action="store_true", help="skip fla's column")
    bench.add_argument("--force", action="store_true", help="without a GPU, run shapes larger "
                       "than the interpreter's limit anyway (slow: minutes to hours)")
    bench.set_defaults(func=cmd_bench)
    tune = sub.add_parser("tune", help="search kernel configs on the GPU present (without one: "
                          "in Triton's interpreter); merge them into <user tuned folder>/<gpu>.yaml")
    tune.add_argument("--gpu", help="refuse to run unless this is the GPU present (its file key, "
                      "e.g. h200); default: tune whatever is present")
    tune.add_argument("--out", help="tuned file to merge into (default: <gpu key>.yaml in the "
                      "folder the runtime searches first: $DFGEN_TUNED_DIR, else "
                      "$XDG_CONFIG_HOME/dfgen/tuned, else ~/.config/dfgen/tuned; in a checkout, "
                      "--out tuned/<gpu>.yaml updates the packaged file)")
    tune.add_argument("--shapes", help="YAML list of buckets {pass: fwd|fwd+bwd|decode, dtype: "
                      "bf16|fp16|fp32, head_dim: 16|32|64|128, T, BH, variant: qsolve (optional)}")
    tune.add_argument("--passes", help="comma list of fwd, fwd+bwd, decode (default: all "
                      "three on a GPU; fwd and fwd+bwd in the interpreter, whose decode bucket "
                      "--passes decode tunes). A decode bucket searches the decoding step's "
                      "knobs, each candidate checked against the reference")
    tune.add_argument("--head-dims", help="comma list: tune only the buckets of these head dims "
                      "(e.g. 128)")
    tune.add_argument("--trials", help="trials per sampled stage, or a share of each stage's "
                      "points (e.g. 25%%); the last third refine the best point one knob at a "
                      "time. Default 30 (4 without a GPU), and refinement then goes on, at most "
                      "as many again, until every one-knob neighbour of the best was tried. A "
                      "stage of at most --sweep-max points runs every point")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe",
                      help="how a stage larger than --sweep-max is searched: tpe (default), "
                      "random, or grid: every stage swept whole (limit it with --space)")
    tune.add_argument("--sweep-max", type=int, metavar="N",
                      help="a stage whose space has at most N points is swept whole, every "
                      f"point once (default {GPU_SWEEP_MAX} on a GPU, {INTERPRETER_SWEEP_MAX} in the "
                      "interpreter; 0: sample every stage, as a cold-start comparison does)")
    tune.add_argument("--space", help="YAML mapping that limits the space: {strategy: fused, "
                      "solve.CHUNK: [32, 64], ...}; each list a subset of the template's values")
    tune.add_argument("--minutes", type=float, help="wall-clock budget per bucket, the final "
                      "end-to-end timing included: candidates still running at its end are "
                      f"stopped and recorded as cut (default {GPU_MINUTES:g} on a GPU, "
                      f"{INTERPRETER_MINUTES:g} in the interpreter; 0: no cap)")
    tune.add_argument("--total-minutes", type=float, help="wall-clock budget of the whole tune, "
                      "shared equally among the buckets not yet tuned (one that finishes early "
                      "leaves the rest more), each still capped by --minutes; buckets left when "
                      f"less than {MIN_BUCKET_S:g} s each remain are not started (default "
                      f"{GPU_TOTAL_MINUTES:g} on a GPU, none in the interpreter; 0: none)")
    tune.add_argument("--jobs", type=int, help="compile-only processes that compile the next "
                      "candidates while one worker times them, one at a time (default: half the "
                      "CPU cores, at most 8; 0: none; the interpreter compiles nothing ahead)")
    tune.add_argument("--storage", help="Optuna storage: a file path (a journal, the default "
                      "kind, for processes on one host) or a database URL (sqlite:///..., "
                      "postgresql://..., mysql://...) that processes on many hosts share")
    tune.add_argument("--workers", type=int, default=1,
                      help="tune processes sharing the studies, one per GPU, each with its "
                      "own timing worker (default 1)")
    tune.add_argument("--plot", metavar="DIR", help="write a PNG of each bucket's search "
                      "into DIR (needs matplotlib: pip install 'dfgen[plot]')")
    tune.add_argument("--try", dest="try_configs", metavar="FILE",
                      help="YAML config or list of configs to try first in every bucket, after "
                      "the default and the --out file's entry (e.g. `python bench/run.py --write candidates h200 FILE` writes the H200 candidates)")
    tune.add_argument("--cold-start", action="store_true",
                      help="try neither the shipped default, the --out file's config for the "
                      "bucket nor --try configs first in any stage (to measure what the sampler "
                      "finds on its own, e.g. with --sweep-max 0 against a --sampler grid sweep; "
                      "the default is still timed end to end for the entry)")
    tune.add_argument("--timeout", type=float, default=CANDIDATE_TIMEOUT_S,
                      help="seconds one candidate may take in the worker: compiling (unless "
                      f"compiled ahead), checking and timing (default {CANDIDATE_TIMEOUT_S:g}; "
                      "never past the bucket's --minutes); one that runs past it, or crashes, "
                      "is a failed trial and the worker is replaced")
    tune.set_defaults(func=cmd_tune)

    show = sub.add_parser("show", help="which tuned file, entry and config serve each bucket "
                          "here; --default: the built-in default config")
    show.add_argument("--default", action="store_true",
                      help="print the built-in default config (YAML) instead")
    show.add_argument("--head-dim", type=int, default=128, help="with --default (default 128)")
    show.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16",
                      help="with --default (default bf16)")
    show.add_argument("--strategy", choices=["fused", "two_stage"], default="fused",
                      help="with --default (default fused)")
    show.set_defaults(func=cmd_show)

    check = sub.add_parser("check", help="check every entry of the tuned file that serves this "
                           "GPU against the reference on fresh inputs (the runtime never does)")
    check.add_argument("--record", action="store_true",
                       help="write each entry's result into the tuned file (`checked`), so that "
                       "the runtime stops warning about entries that passed under the running "
                       "triton and templates and skips those that failed; a packaged file is "
                       "copied into the user's tuned folder first")
    check.add_argument("--max-t", type=int, help="cap on T for the checks (default 1024 on a "
                       "GPU, 48 in the interpreter)")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    import yaml

    try:
        return args.func(args)
    except BrokenPipeError:  # the reader left (`dfgen show | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (DfgenError, OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        # a user's mistake (an argument, a missing or malformed file): one line, exit 2
        message = " ".join(str(err).split())
        if not isinstance(err, DfgenError):
            message = f"{type(err).__name__}: {message}"
        print(f"dfgen {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
