"""A PNG of one bucket's search (`dfgen tune --plot DIR`): every completed trial's median
time by trial number, the best so far, the default's re-timed time, and failed trials."""

from __future__ import annotations

from pathlib import Path

import optuna

from ...errors import DfgenError


def require_matplotlib() -> None:
    """Fail before a tune starts, not after its first bucket."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DfgenError("--plot needs matplotlib: pip install 'dfgen[plot]'") from None


def plot_search(study: optuna.Study, key: str, entry: dict, folder) -> Path:
    """Write <folder>/<key with / as _>.png and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
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
    else:
        top = 1.0
    if entry.get("default_ms"):
        ax.axhline(entry["default_ms"], color="C2", linestyle="--",
                   label=f"default, re-timed ({entry['default_ms']:.4g} ms)")
    if failed:
        ax.scatter(failed, [top] * len(failed), marker="x", color="C3",
                   label=f"failed ({len(failed)})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("median ms")
    ax.set_title(f"{key}: chosen {entry['median_ms']:.4g} ms, {entry['trials']} trials", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(folder) / (key.replace("/", "_") + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
