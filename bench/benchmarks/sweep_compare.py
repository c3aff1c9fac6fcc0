"""Optuna against an exhaustive sweep (bench/run.py sweep): for each bucket and stage, where
the knobs each sampler study picked rank in the sweep, and their time there (so both sides
come from the sweep's own timings, one process, one GPU session).

    python bench/run.py sweep-compare GRID_JOURNAL TPE_JOURNAL [TPE_JOURNAL ...]

Each journal holds the studies of one `dfgen tune` run, one per bucket and stage
(dfgen:{bucket}:{stage}:...); studies are matched by bucket key and stage.
"""
import os
import sys

import optuna

from dfgen.tools.tuning.stages import is_local, slot, stage_studies
from dfgen.tools.tuning.tuner import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
DONE = (optuna.trial.TrialState.COMPLETE,)


def studies(path):
    """{"bucket key stage": study} of one journal (the stages a grid sweeps: a training
    forward's local search is not one)."""
    return {f"{bucket} {stage}": study for bucket, stage, study in stage_studies(open_storage(path))
            if not is_local(slot(stage))}


def main(grid_path, *tpe_paths):
    grids = studies(grid_path)
    print("| bucket and stage | sweep trials | sweep best ms | sampler run | trials | its pick's sweep ms | "
          "pick / best | rank in sweep |")
    print("|---|---|---|---|---|---|---|---|")
    for key, grid in sorted(grids.items()):
        timed = {tuple(sorted(t.params.items())): t.value for t in grid.get_trials(states=DONE)}
        ranked = sorted(timed.values())
        best = ranked[0]
        for path in tpe_paths:
            study = studies(path).get(key)
            if study is None:
                continue
            trials = study.get_trials(states=DONE)
            pick = min(trials, key=lambda t: t.value)
            in_sweep = timed.get(tuple(sorted(pick.params.items())))
            cells = ["not in the sweep", "-", "-"] if in_sweep is None else [
                f"{in_sweep:.4f}", f"{in_sweep / best:.3f}", f"{ranked.index(in_sweep) + 1} of {len(ranked)}"]
            print(f"| {key} | {len(timed)} | {best:.4f} | {os.path.basename(path)} | "
                  f"{len(study.trials)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
