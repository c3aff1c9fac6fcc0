"""Configs for the same buckets timed side by side, end to end, in one process: the
built-in default, the entries of tuned files, and the stages' bests of tune journals (a
sweep's, a cold-start sampler's), each checked against the reference first.

    python bench/run.py compare-configs --buckets BUCKETS.yaml NAME=FILE [NAME=FILE ...]
    python bench/run.py compare-configs --tuned tuned/h200.yaml NAME=FILE ...

A FILE ending in .yaml is a tuned file (its entry for the bucket; none: the column is
empty); any other FILE is an Optuna journal of `dfgen tune`: its stage studies for the
bucket (dfgen:{bucket}:{stage}:...), the fastest trial of each stage put together (a
forward bucket: the strategy whose stage bests sum lowest; a forward+backward bucket:
the default forward, as a tune of that bucket alone keeps). Every config is timed
--rounds times, interleaved (drift spreads over all), with triton.testing.do_bench
medians on fresh random inputs; the table gives the fastest round and each config's
time over the fastest config of its bucket.
"""
import argparse
import sys

import optuna
import torch

from dfgen.kernels.config import KernelConfig, default_config
from dfgen.select import tuned_file
from dfgen.settings import torch_dtype
from dfgen.tools.check import check, passes, random_pass_inputs
from dfgen.tools.timing import timer
from dfgen.tools.tuning.space import stage_knobs
from dfgen.tools.tuning.stages import slot, stage_studies
from dfgen.tools.tuning.tuner import bucket_default, load_buckets, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def journal_config(storage, bucket):
    """The stage bests of `bucket` in a journal, as one config (None: no study timed any)."""
    bests = {}  # slot name -> (knobs, ms)
    for key, name, study in stage_studies(storage):
        done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if "duplicate_of" not in t.user_attrs]
        if key == bucket.key and done:
            top = min(done, key=lambda t: t.value)
            if name not in bests or top.value < bests[name][1]:
                bests[name] = (stage_knobs(slot(name).stage, top.params), top.value)
    if not bests:
        return None
    if bucket.backward:
        base = bucket_default(bucket)
        sections = {slot(name).section: knobs for name, (knobs, _) in bests.items()}
        return KernelConfig(strategy=base.strategy, solve=base.solve, attn=base.attn,
                            solve_bwd=sections.get("solve_bwd", base.solve_bwd),
                            attn_bwd=sections.get("attn_bwd", base.attn_bwd))
    by_strategy = {}
    for name, (knobs, ms) in bests.items():
        by_strategy.setdefault(slot(name).strategy, {})[slot(name).section] = (knobs, ms)
    strategy = min(by_strategy, key=lambda s: sum(ms for _, ms in by_strategy[s].values()))
    base = default_config(bucket.head_dim, torch_dtype(bucket.dtype), strategy)
    sections = {section: knobs for section, (knobs, _) in by_strategy[strategy].items()}
    return KernelConfig(strategy=strategy, solve=sections.get("solve", base.solve),
                        attn=sections.get("attn", base.attn))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--buckets", help="YAML bucket list (as `dfgen tune --shapes`)")
    p.add_argument("--tuned", help="take the buckets from this tuned file's entries")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("sources", nargs="*", metavar="NAME=FILE")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("compare-configs times on a GPU")
    from dfgen.select.bucket import Bucket

    if args.tuned:
        buckets = [Bucket.from_fields(e, k) for k, e in sorted(tuned_file.read(args.tuned)["entries"].items())]
    elif args.buckets:
        buckets = load_buckets(args.buckets)
    else:
        sys.exit("give --buckets or --tuned")
    decode = [b.key for b in buckets if b.decode]  # a step's knobs, no pass config to time here
    if decode:
        print(f"# not compared (decode buckets: `python bench/run.py decode`): {', '.join(decode)}")
        buckets = [b for b in buckets if not b.decode]
    sources = []
    for item in args.sources:
        name, _, path = item.partition("=")
        if not path:
            sys.exit(f"{item!r}: expected NAME=FILE")
        sources.append((name, tuned_file.read(path)["entries"] if path.endswith(".yaml")
                        else open_storage(path)))
    names = ["default"] + [n for n, _ in sources]
    print("| bucket | " + " | ".join(f"{n} ms" for n in names) + " | fastest | spread |")
    print("|---|" + "---|" * (len(names) + 2))
    device = torch.device("cuda")
    time_it = timer(True)
    for bucket in buckets:
        dtype = torch_dtype(bucket.dtype)
        default = bucket_default(bucket)
        configs = {"default": default}
        for name, source in sources:
            if isinstance(source, dict):
                entry = source.get(bucket.key)
                config = KernelConfig.from_dict(entry["config"], defaults=default) if entry else None
            else:
                config = journal_config(source, bucket)
            if config is not None:
                configs[name] = config
        shape = (1, bucket.T, bucket.BH, bucket.head_dim)
        q, k, v, beta, do, q_solve = random_pass_inputs(shape, dtype, device, args.seed,
                                                        bucket.variant == "qsolve")
        runs, cells = {}, {}
        for name, config in configs.items():
            try:
                err, run = check(config, bucket.backward, q, k, v, beta, do, q_solve=q_solve)
            except Exception as exc:  # noqa: BLE001 - reported in its cell
                cells[name] = f"failed ({type(exc).__name__})"
                continue
            if not passes(err, dtype, bucket.backward):
                cells[name] = f"wrong ({err:.1e})"
                continue
            runs[name] = run
            torch.cuda.empty_cache()
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                times[name].append(time_it(run))
        fastest = min((min(t) for t in times.values()), default=None)
        for name, t in times.items():
            cells[name] = f"{min(t):.4f} ({min(t) / fastest:.3f})"
        spread = max((max(t) / min(t) - 1 for t in times.values()), default=0.0)
        winner = min(times, key=lambda n: min(times[n])) if times else "-"
        print(f"| {bucket.key} | " + " | ".join(cells.get(n, "-") for n in names)
              + f" | {winner} | {spread:.1%} |", flush=True)
        del q, k, v, beta, do, q_solve, runs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
