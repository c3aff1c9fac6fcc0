"""Trials per minute of tune journals, and their picks side by side (the `workers` phase of
bench/gpu/gpu-check.sh: one GPU against `--workers 2`).

    python bench/benchmarks/trial_rate.py JOURNAL [JOURNAL ...]

Per journal: the stage trials that ran to a time (timed, or failed on their own; not
duplicates, not cut), over the wall time from the first trial's start to the last one's
end, and per bucket and stage the fastest trial's knobs and time.
"""
import sys

import optuna

from dfgen.tools.tuning.stages import stage_studies
from dfgen.tools.tuning.tuner import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
State = optuna.trial.TrialState


def main(paths):
    picks = {}
    print("| journal | stage trials | wall (first start to last end) | trials/min |")
    print("|---|---|---|---|")
    for path in paths:
        storage = open_storage(path)
        trials = []
        for key, slot, study in stage_studies(storage):
            ran = [t for t in study.get_trials(deepcopy=False)
                   if t.state in (State.COMPLETE, State.FAIL) and t.datetime_start and t.datetime_complete
                   and "duplicate_of" not in t.user_attrs and not t.user_attrs.get("cut")]
            trials += ran
            timed = [t for t in ran if t.state == State.COMPLETE]
            if timed:
                best = min(timed, key=lambda t: t.value)
                picks.setdefault(f"{key}:{slot}", []).append(
                    f"{best.value:.4f} ms " + " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(best.params.items())))
        if not trials:
            print(f"| {path} | 0 | - | - |")
            continue
        wall = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
        print(f"| {path} | {len(trials)} | {wall:.0f} s | {len(trials) / wall * 60:.1f} |")
    print()
    for name, values in sorted(picks.items()):
        print(f"{name}:")
        for path, value in zip(paths, values):
            print(f"    {path}: {value}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
