"""A PNG of one bucket's search (`dfgen tune --plot DIR`): for each stage's study, every
completed trial's median time by trial number, the best so far and failed trials; the
title gives the bucket's end-to-end pick and the default's time."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import optuna

from ...errors import DfgenError


def require_matplotlib() -> None:
    """Fail before a tune starts, not after its first bucket."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DfgenError("--plot needs matplotlib: pip install 'dfgen[plot]'") from None


def plot_search(studies: "Mapping[str, optuna.Study] | optuna.Study", key: str, entry: dict,
                folder) -> Path:
    """Write <folder>/<key with / as _>.png (one panel per stage study) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    if isinstance(studies, optuna.Study):
        studies = {"search": studies}
    fig, axes = plt.subplots(1, len(studies), figsize=(5 * len(studies) + 2, 4), dpi=110,
                             squeeze=False)
    for ax, (name, study) in zip(axes[0], studies.items()):
        _panel(ax, study, name)
    default = f", default {entry['default_ms']:.4g} ms" if entry.get("default_ms") else ""
    fig.suptitle(f"{key}: chosen {entry['median_ms']:.4g} ms end to end{default}, "
                 f"{entry['trials']} trials", fontsize=10)
    fig.tight_layout()
    path = Path(folder) / (key.replace("/", "_") + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _panel(ax, study, name: str) -> None:
    import matplotlib.ticker

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    top = 1.0
    if done:
        numbers = [t.number for t in done]
        values = [t.value for t in done]
        ax.scatter(numbers, values, s=14, label="trial (median ms)")
        best, running = [], float("inf")
        for value in values:
            running = min(running, value)
            best.append(running)
        ax.step(numbers, best, where="post", color="C1", label="best so far")
        top = max(values)
    if failed:
        ax.scatter(failed, [top] * len(failed), marker="x", color="C3",
                   label=f"failed ({len(failed)})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("median ms")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=8)
