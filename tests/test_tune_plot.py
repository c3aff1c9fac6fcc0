"""The search plot (`dfgen tune --plot`): a PNG from a study with completed and failed
trials, and a clear error when matplotlib is missing."""

import sys

import optuna
import pytest

from dfgen.errors import DfgenError
from dfgen.tools.tuning import plot


def _study():
    study = optuna.create_study()
    for value in (0.5, 0.4, None, 0.45, 0.3):
        trial = study.ask()
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)
    return study


def test_plot_writes_a_png_named_after_the_bucket(tmp_path):
    entry = {"median_ms": 0.3, "default_ms": 0.5, "trials": 5}
    path = plot.plot_search(_study(), "fwd/bf16/d64/t1024/bh16", entry, tmp_path / "plots")
    assert path == tmp_path / "plots" / "fwd_bf16_d64_t1024_bh16.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(DfgenError, match=r"--plot needs matplotlib: pip install 'dfgen\[plot\]'"):
        plot.require_matplotlib()
