"""The tuner's long-lived worker process (dfgen.tools.tuning.worker): many candidates in one
process, a crashing or hanging candidate recorded as a failure and the process replaced,
the fault hook only under its test flag, and a crash inside a tune recorded as that
trial's failure while the search goes on."""

import os

import optuna
import pytest
import torch

from conftest import crash_candidates_with_two_warps
from dfgen.kernels.config import default_config
from dfgen.select.bucket import Bucket
from dfgen.tools.tuning import tuner, worker

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter tune")

BASE = {"pass": "fwd", "dtype": "bf16", "head_dim": 32, "T": 24, "BH": 1, "variant": "", "seed": 0}
TWO = default_config(32, torch.bfloat16, "two_stage")


def stage(slot, knobs, **extra):
    return dict(BASE, op="stage", slot=slot, knobs=dict(knobs), forward=None, **extra)


@pytest.fixture
def faulty():
    """A worker whose requests may ask for a fault (the test flag set in its environment)."""
    process = worker.Worker(env=dict(os.environ, **{worker.TEST_FAULTS: "1"}))
    yield process
    process.close()


def test_one_process_serves_many_candidates_and_is_replaced_after_a_crash_or_a_hang(faulty):
    first = faulty.call(stage("attn_fwd", TWO.attn), timeout_s=120)
    assert first["ok"] and first["median_ms"] > 0 and first["error"] == 0.0  # the default's own
    pid = first["pid"]
    for knobs in (dict(TWO.attn, BLOCK_M=32, BLOCK_N=16), dict(TWO.attn, num_warps=2)):
        reply = faulty.call(stage("attn_fwd", knobs), timeout_s=120)
        assert reply["ok"] and reply["pid"] == pid and reply["error"] < 1e-2
    reply = faulty.call(stage("solve_fwd(fused)", default_config(32).solve), timeout_s=120)
    assert reply["ok"] and reply["pid"] == pid  # another stage, the same process
    assert faulty.starts == 1

    crashed = faulty.call(stage("attn_fwd", TWO.attn, test_fault="exit"), timeout_s=120)
    assert crashed["ok"] is False and crashed["reason"].startswith("crashed (exit 1)")
    after = faulty.call(stage("attn_fwd", TWO.attn), timeout_s=120)
    assert after["ok"] and after["pid"] != pid
    assert faulty.starts == 2

    hung = faulty.call(stage("attn_fwd", TWO.attn, test_fault="hang"), timeout_s=2)
    assert hung == {"ok": False, "reason": "timed out after 2 s"}
    again = faulty.call(stage("attn_fwd", TWO.attn), timeout_s=120)
    assert again["ok"] and again["pid"] not in (pid, after["pid"])

    cut = faulty.call(stage("attn_fwd", TWO.attn, test_fault="hang"), timeout_s=120,
                      deadline=__import__("time").monotonic() + 1)
    assert cut["ok"] is False and cut["cut"] is True


def test_the_fault_hook_is_ignored_without_its_flag():
    process = worker.Worker(env={k: v for k, v in os.environ.items() if k != worker.TEST_FAULTS})
    try:
        reply = process.call(stage("attn_fwd", TWO.attn, test_fault="exit"), timeout_s=120)
        assert reply["ok"], reply
    finally:
        process.close()


def test_a_stage_candidate_is_checked_against_the_default_knobs(faulty):
    """Knobs the templates refuse are a failed reply with the reason, not a dead worker;
    so is a stage of the backward (its inputs from a real forward at the bucket's shape)."""
    bad = faulty.call(stage("attn_fwd", dict(TWO.attn, BLOCK_M=48)), timeout_s=120)
    assert bad["ok"] is False and "BLOCK_M=48 is not one of" in bad["reason"]
    both = dict(stage("attn_bwd", dict(TWO.attn_bwd, BLOCK_M=16)), **{"pass": "fwd+bwd"})
    reply = faulty.call(both, timeout_s=120)
    assert reply["ok"] and reply["pid"] == bad["pid"] and reply["error"] < 2e-2


def test_a_crashing_candidate_is_a_failed_trial_and_the_search_goes_on(tmp_path, monkeypatch):
    """In a tune: the candidate with two warps kills its worker (the test hook); it is a
    failed trial naming the crash, the next candidate gets a new worker, and the bucket
    still writes its entry."""
    crash_candidates_with_two_warps(monkeypatch)
    space = {"strategy": "two_stage",  # attn_fwd: two points, swept; the solve: its default only
             "attn.BLOCK_M": 64, "attn.BLOCK_N": 64, "attn.num_warps": [2, 4], "attn.num_stages": 2}
    logs = []
    try:
        result = tuner.tune_bucket(Bucket("fwd", "bf16", 32, 24, 1), trials=1, sampler="tpe", seed=0,
                                   storage=tuner.open_storage(str(tmp_path / "s.journal")),
                                   timeout_s=120, limits=space, log=logs.append, sweep_max=16)
    finally:
        worker.shared().close()
    study = result.studies["attn_fwd"]
    states = {t.params["attn.num_warps"]: t for t in study.trials}
    assert states[2].state == optuna.trial.TrialState.FAIL
    assert states[2].user_attrs["failure"].startswith("crashed (exit 1)")
    assert states[4].state == optuna.trial.TrialState.COMPLETE
    assert result.entry["failures"] == 1 and result.entry["median_ms"] > 0
    assert any("attn_fwd trial" in line and "crashed (exit 1)" in line for line in logs)
