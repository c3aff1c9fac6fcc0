"""The tuner's stage search replayed offline against an exhaustive sweep (bench/run.py
replay): the sweep's timings are the table a stand-in worker answers from, so a search
setting can be judged over many seeds without a GPU (docs/tuner.md, "Quality against
sweeps", used it to choose the refinement and the lookahead rule).

    python bench/run.py replay GRID_JOURNAL [--seeds 30] [--trials 25%] [--converge]
                               [--noise 0.005] [--forward-ms F] [--ahead 8] [--space FILE]

GRID_JOURNAL is the journal of a sweep (`dfgen tune --sampler grid`, or `bench/run.py sweep`,
which keeps it as sweep-<name>-grid.journal) of forward+backward buckets. Each seed runs
the real search (tuner.tune_bucket: TPE, refinement, the lookahead rule with --ahead
compile processes, cold start, every stage sampled) with each candidate's time read from
the sweep, times a relative Gaussian noise (--noise, as a GPU's repeated timings differ).
(--space: the space the sweep covered, when it was limited, as `dfgen tune --space` takes
it.) A seed's pick is each stage's fastest trial as the search saw it; its quality is the
pass's time under the sweep's true timings, the forward's --forward-ms plus the picked
stages, over the same sum at the sweep's best. The table gives, per bucket, how many seeds
came within 3 % and 1 %, the median and worst ratio, and the trials each stage used.
"""
import argparse
import json
import random
import statistics

import optuna

from dfgen.select.bucket import Bucket
from dfgen.tools.tuning import tuner, worker
from dfgen.tools.tuning.space import stage_knobs
from dfgen.tools.tuning.stages import is_local, slot, stage_studies

optuna.logging.set_verbosity(optuna.logging.WARNING)
COMPLETE = optuna.trial.TrialState.COMPLETE


def sweep_tables(grid_path: str) -> dict:
    """{bucket key: {section: {knobs as JSON: ms}}} of a sweep's journal (the stages it
    swept: a training forward's local search is no sweep)."""
    out: dict = {}
    for key, name, study in stage_studies(tuner.open_storage(grid_path)):
        stage_slot = slot(name)
        if is_local(stage_slot):
            continue
        table = out.setdefault(key, {}).setdefault(stage_slot.section, {})
        for trial in study.get_trials(deepcopy=False, states=(COMPLETE,)):
            if "duplicate_of" not in trial.user_attrs:
                table[_knobs_key(stage_knobs(stage_slot.stage, trial.params))] = trial.value
    return out


def _knobs_key(knobs: dict) -> str:
    return json.dumps(knobs, sort_keys=True)


def _lookup(table: dict, section: dict) -> float | None:
    """The sweep's time of a config section (its knobs that the sweep's points name)."""
    names = json.loads(next(iter(table)))
    return table.get(_knobs_key({name: section.get(name) for name in names}))


class SweepWorker:
    """Stands in for worker.evaluate: a stage candidate takes its sweep time (with noise),
    a whole pass the forward's time plus its stages'; a stage point the sweep lacks fails,
    and in a pass it counts as the sweep's slowest (the default may lie outside a sweep
    of part of the space; the picks are judged on the stages alone). The training
    forward, which the sweep does not cover, takes the forward's time whatever its knobs."""

    def __init__(self, tables: dict, forward_ms: float, noise: float, seed: int):
        self.tables, self.forward_ms, self.noise = tables, forward_ms, noise
        self.rng = random.Random(seed)

    def _noisy(self, ms: float) -> float:
        return ms * (1.0 + self.rng.gauss(0.0, self.noise))

    def __call__(self, request: dict, timeout_s: float, deadline=None) -> dict:
        if request["op"] == "stage" and is_local(slot(request["slot"])):
            ms = self.forward_ms
        elif request["op"] == "stage":
            section = slot(request["slot"]).section
            ms = _lookup(self.tables[section], request["knobs"])
        else:
            times = [_lookup(table, request["config"].get(section, {}))
                     for section, table in self.tables.items()]
            ms = self.forward_ms + sum(max(table.values()) if t is None else t
                                       for t, table in zip(times, self.tables.values()))
        if ms is None:
            return {"ok": False, "reason": "not a point of the sweep"}
        return {"ok": True, "median_ms": self._noisy(ms), "error": 0.0, "seconds": 0.0}


class NoCompile:
    """Compile-ahead's interface without processes: only its number of jobs matters here
    (it sets how many candidates the search asks for before it has their results)."""

    def __init__(self, jobs: int):
        self.jobs = jobs

    def submit(self, request) -> None:
        pass

    def forget(self) -> None:
        pass


def replay_seed(bucket: Bucket, tables: dict, opts, seed: int) -> tuple[float, dict]:
    """(the pick's pass time over the sweep's best, trials per section) of one seed."""
    stand_in = SweepWorker(tables, opts.forward_ms, opts.noise, seed)
    real = worker.evaluate
    worker.evaluate = stand_in
    try:
        result = tuner.tune_bucket(
            bucket, trials=opts.trials, sampler="tpe", seed=seed,
            storage=optuna.storages.InMemoryStorage(), timeout_s=60.0, log=lambda *a: None,
            limits=tuner.load_space(opts.space) if opts.space else None,
            cold_start=True, sweep_max=0, converge=opts.converge, strategy_margin=None,
            ahead=NoCompile(opts.ahead) if opts.ahead else None)
    finally:
        worker.evaluate = real
    picked, used = opts.forward_ms, {}
    for name, study in result.studies.items():
        section = slot(name).section
        if section not in tables:  # the training forward: not judged here
            continue
        done = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
                if "duplicate_of" not in t.user_attrs]
        best = min(done, key=lambda t: t.value)  # as the search saw it (noise included)
        picked += tables[section][_knobs_key(stage_knobs(slot(name).stage, best.params))]
        used[section] = len(study.trials)
    fastest = opts.forward_ms + sum(min(table.values()) for table in tables.values())
    return picked / fastest, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="journal of an exhaustive sweep of forward+backward buckets")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--trials", default="25%", help="per sampled stage (a number or a share)")
    parser.add_argument("--converge", action="store_true",
                        help="refine past --trials to a local optimum, as a tune without --trials does")
    parser.add_argument("--noise", type=float, default=0.005,
                        help="relative standard deviation of a timing (default 0.005)")
    parser.add_argument("--forward-ms", type=float, default=0.0,
                        help="the forward's time in the pass (default 0: the stages alone, harsher)")
    parser.add_argument("--ahead", type=int, default=8, help="compile-ahead jobs (default 8)")
    parser.add_argument("--space", help="YAML limits of the sweep's space (`dfgen tune --space`)")
    opts = parser.parse_args()
    opts.trials = opts.trials if opts.trials.endswith("%") else int(opts.trials)
    print(f"replay of {opts.grid}: {opts.seeds} seeds, trials {opts.trials}"
          f"{', converge' if opts.converge else ''}, noise {opts.noise:g}, forward "
          f"{opts.forward_ms:g} ms, {opts.ahead} ahead")
    print("| bucket | seeds within 3 % | within 1 % | median | worst | trials per stage (median) |")
    print("|---|---|---|---|---|---|")
    for key, tables in sorted(sweep_tables(opts.grid).items()):
        bucket = Bucket.from_key(key)
        if not bucket.backward:
            print(f"| {key} | forward buckets are not replayed (their end-to-end time is not a sum "
                  "of stage times in the sweep) | | | | |")
            continue
        runs = [replay_seed(bucket, tables, opts, seed) for seed in range(opts.seeds)]
        ratios = [r for r, _ in runs]
        used = {section: statistics.median(u[section] for _, u in runs) for section in runs[0][1]}
        print(f"| {key} | {sum(r <= 1.03 for r in ratios)} / {len(ratios)} | "
              f"{sum(r <= 1.01 for r in ratios)} / {len(ratios)} | {statistics.median(ratios):.3f}x | "
              f"{max(ratios):.3f}x | " + ", ".join(f"{s} {n:g}" for s, n in sorted(used.items())) + " |")


if __name__ == "__main__":
    main()
