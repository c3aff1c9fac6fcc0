"""dfgen tune for decode buckets without a GPU: the interpreter pipeline (--passes decode,
--shapes), the entry it writes serving deltaformer_decode, resuming, the search space read
from the decode template, and the rules every bucket follows: a candidate that fails the
reference check never wins, nothing slower than the default is written."""

import argparse
import os
import subprocess

import optuna
import pytest
import torch

from conftest import crash_candidates_with_two_warps, dfgen_command, tune_studies
from dfgen.errors import DfgenError
from dfgen.kernels.decode import default_decode_knobs
from dfgen.kernels.spec import spec
from dfgen.select import tuned_file
from dfgen.select.bucket import Bucket
from dfgen.select.dispatch import Dispatcher
from dfgen.select.gpu import GpuIdentity
from dfgen.tools.tuning import decode_tune, evaluate, space, tuner, worker

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter tune")

CPU = GpuIdentity("cpu-interpreter", "cpu-interpreter", "none", 0, "CPU")
BUCKET = tuner.CPU_DECODE_BUCKETS[0]


def run(*args, cwd):
    proc = subprocess.run(dfgen_command() + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_tune_passes_decode_writes_an_entry_that_serves_and_resumes(tmp_path):
    out_file, journal = tmp_path / "cpu-interpreter.yaml", tmp_path / "s.journal"
    out = run("tune", "--passes", "decode", "--trials", "2", "--out", str(out_file),
              "--storage", str(journal), cwd=tmp_path)
    assert "NOT GPU TIMINGS" in out and f"{BUCKET.key}: the default, end to end:" in out
    entry = tuned_file.read(out_file)["entries"][BUCKET.key]
    assert entry["pass"] == "decode" and entry["trials"] == 2
    assert entry["median_ms"] > 0 and entry["default_ms"] >= entry["median_ms"]
    assert entry["tuned_with"] == {"templates": tuned_file.templates_of("decode")}
    knobs = entry["config"]["decode"]
    spec("decode").check(knobs, BUCKET.head_dim)  # every knob set, as the template declares
    (name, study), = tune_studies(journal).items()
    assert name.startswith(f"dfgen:{BUCKET.key}:decode:templates-{tuned_file.templates_of('decode')}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 2
    assert study.trials[0].params == space.stage_params("decode", default_decode_knobs(32, torch.bfloat16))
    # the runtime serves it to a step whose cache rounds to the bucket
    choice = Dispatcher(CPU, [tmp_path]).choose(Bucket("decode", "bf16", 32, 64, 2))
    assert choice.knobs == knobs and f"[{BUCKET.key}]" in choice.source
    # a rerun resumes the study: 3 trials asked, 2 there, 1 more
    out = run("tune", "--passes", "decode", "--trials", "3", "--out", str(out_file),
              "--storage", str(journal), cwd=tmp_path)
    assert "1 trials of 960 points (2 already in the study)" in out, out
    assert tuned_file.read(out_file)["entries"][BUCKET.key]["trials"] == 3


def test_a_shapes_file_names_decode_buckets_and_the_entry_serves_deltaformer_decode(tmp_path):
    shapes = tmp_path / "b.yaml"
    shapes.write_text("- {pass: decode, dtype: fp32, head_dim: 32, T: 32, BH: 2}\n")
    out_file = tmp_path / "tuned" / "cpu-interpreter.yaml"
    run("tune", "--shapes", str(shapes), "--trials", "1", "--out", str(out_file),
        "--storage", str(tmp_path / "s.journal"), cwd=tmp_path)
    entry = tuned_file.read(out_file)["entries"]["decode/fp32/d32/t32/bh2"]
    code = ("import torch, dfgen.api.decode as d\n"
            "from dfgen.runtime import deltaformer_attn, deltaformer_decode\n"
            "seen = []; real = d.decode_step\n"
            "d.decode_step = lambda *a, **k: (seen.append(a[9]), real(*a, **k))[1]\n"
            "q, k, v = (torch.randn(1, 25, 2, 32) for _ in range(3)); beta = torch.rand(1, 25, 2)\n"
            "with torch.no_grad():\n"
            "    _, cache = deltaformer_attn(q[:, :24], k[:, :24], v[:, :24], beta[:, :24], return_cache=True)\n"
            "    o = deltaformer_decode(q[:, 24:], k[:, 24:], v[:, 24:], beta[:, 24:], cache)\n"
            "assert torch.isfinite(o).all()\n"
            "from dfgen.select.bucket import Bucket\n"
            "from dfgen.select.dispatch import dispatcher_for\n"
            "print(dispatcher_for(q.device).choose(Bucket('decode', 'fp32', 32, 32, 2)).source)\n"
            "print(sorted(seen[0].items()))\n")
    python = os.path.join(os.path.dirname(dfgen_command()[0]), "python")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, DFGEN_TUNED_DIR=str(out_file.parent), TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    source, knobs = proc.stdout.strip().splitlines()
    assert f"{out_file} [decode/fp32/d32/t32/bh2]" in source  # the entry, not the default
    assert knobs == str(sorted(entry["config"]["decode"].items()))


def _buckets(interpreted, passes=None, shapes=None):
    from dfgen.tools.cli import _tune_buckets

    return _tune_buckets(argparse.Namespace(shapes=shapes, head_dims=None, passes=passes), interpreted)


def test_which_buckets_a_tune_takes():
    """The interpreter's plain run keeps its one forward bucket (CI runs it: a decode bucket
    would add about two thirds); --passes decode takes its decode bucket; a GPU's plain run
    takes the shipped set, decode buckets last."""
    assert _buckets(True) == tuner.CPU_BUCKETS
    assert _buckets(True, "decode") == tuner.CPU_DECODE_BUCKETS
    assert _buckets(True, "fwd,decode") == tuner.CPU_BUCKETS + tuner.CPU_DECODE_BUCKETS
    assert [b.pass_ for b in _buckets(False)[-2:]] == ["decode", "decode"]
    assert _buckets(False) == tuner.GPU_BUCKETS
    with pytest.raises(DfgenError, match="expected a comma list of fwd, fwd\\+bwd and decode"):
        _buckets(True, "dec")


def test_the_decode_space_is_the_template_header():
    """Every declared value of every decode knob, nothing repeated by hand; each point feasible."""
    choices = space.stage_choices("decode", 128)
    declared = spec("decode").knobs
    assert choices == {f"decode.{name}": list(knob.values) for name, knob in declared.items()}
    assert space.grid_size(choices) == 960
    for point in space.stage_points(choices)[::37]:
        spec("decode").check(space.stage_knobs("decode", point), 128)
    assert space.choices("fwd", 128).keys().isdisjoint(choices)  # a forward searches no decode knob
    with pytest.raises(DfgenError, match=r"decode.BLOCK_N: \[48\] not among"):
        space.stage_choices("decode", 128, {"decode.BLOCK_N": [48]})


def _fake_worker(monkeypatch, time_of, wrong=lambda knobs: False):
    """worker.evaluate replaced by a quick stand-in: a candidate (its knobs over the
    default's) takes time_of(knobs) ms, or fails the reference check where wrong(knobs)."""
    requests = []
    default = default_decode_knobs(BUCKET.head_dim, torch.bfloat16)

    def fake(request, timeout_s, deadline=None):
        requests.append(request)
        given = request["config"]["decode"] if request["op"] == "pass" else request["knobs"]
        knobs = dict(default, **given)
        if wrong(knobs):
            return {"ok": False, "reason": "wrong: relative error 3e-01 against the reference"}
        return {"ok": True, "median_ms": time_of(knobs), "error": 0.0, "seconds": 0.01}

    monkeypatch.setattr(worker, "evaluate", fake)
    return requests, default


def _tune(tmp_path, **kwargs):
    return decode_tune.tune_decode_bucket(BUCKET, trials=12, sampler="random", seed=0, timeout_s=60,
                                          sweep_max=0, log=lambda *a: None,
                                          storage=tuner.open_storage(str(tmp_path / "d.journal")),
                                          **kwargs)


def test_the_default_goes_first_and_a_faster_candidate_is_written(tmp_path, monkeypatch):
    requests, default = _fake_worker(monkeypatch, lambda k: 2.0 if k["BLOCK_N"] == 128 else 1.0)
    result = _tune(tmp_path)
    assert requests[0]["op"] == "pass" and requests[0]["config"] == {"decode": default}
    assert requests[1]["op"] == "stage" and requests[1]["slot"] == "decode" and \
        requests[1]["knobs"] == default
    assert result.entry["config"]["decode"]["BLOCK_N"] != 128
    assert result.entry["median_ms"] == 1.0 and result.entry["default_ms"] == 2.0
    assert result.entry["tuned_with"] == {"templates": tuned_file.templates_of("decode")}


def test_nothing_slower_than_the_default_is_written(tmp_path, monkeypatch):
    _, default = _fake_worker(monkeypatch, lambda k: 1.0 if k == default_decode_knobs(32, torch.bfloat16)
                              else 1.5)
    result = _tune(tmp_path)
    assert result.entry["config"] == {"decode": default} and result.entry["median_ms"] == 1.0


def test_a_candidate_that_fails_the_reference_check_never_wins(tmp_path, monkeypatch):
    """The fastest points (BLOCK_N 16, 0.1 ms) give wrong results: they are failed trials
    with their reason, and the entry is the fastest point that passed."""
    fast_and_wrong = lambda k: k["BLOCK_N"] == 16  # noqa: E731
    _fake_worker(monkeypatch, lambda k: 0.1 if k["BLOCK_N"] == 16 else 2.0 if k["BLOCK_N"] == 128 else 1.0,
                 wrong=fast_and_wrong)
    result = _tune(tmp_path)
    (study,) = result.studies.values()
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all(t.params["decode.BLOCK_N"] == 16 for t in failed)
    assert all("against the reference" in t.user_attrs["failure"] for t in failed)
    assert result.entry["config"]["decode"]["BLOCK_N"] in (32, 64) and result.entry["median_ms"] == 1.0
    assert result.failures == len(failed)


def test_a_failing_tuned_entry_is_replaced_and_a_faster_one_stays(tmp_path, monkeypatch):
    """The tuned file's decode entry is the one to beat, as every bucket's: kept while
    faster, replaced when it fails the check."""
    entry = dict(default_decode_knobs(32, torch.bfloat16), num_stages=1)
    _fake_worker(monkeypatch, lambda k: 0.5 if k == entry else 2.0 if k["BLOCK_N"] == 128 else 1.0)
    assert _tune(tmp_path, incumbent={"decode": entry}).entry["config"]["decode"] == entry
    _fake_worker(monkeypatch, lambda k: 2.0 if k["BLOCK_N"] == 128 else 1.0, wrong=lambda k: k == entry)
    kept = _tune(tmp_path / "again", incumbent={"decode": entry}).entry["config"]["decode"]
    assert kept != entry


def _stage_request(knobs, seed=0):
    return dict(BUCKET.fields(), variant="", op="stage", slot="decode", knobs=knobs, seed=seed,
                forward=None)


def test_the_worker_checks_a_decode_candidate_against_the_reference_before_timing(monkeypatch):
    """In the worker's code (in process): a good candidate passes both checks and is
    timed; one whose steps the reference check fails, or whose step at the bucket's shape
    differs from the default knobs' step, is refused with its reason and never timed."""
    from dfgen.kernels import decode as kernels_decode
    from dfgen.tools import check

    evaluate._benches.clear()
    good = dict(default_decode_knobs(32, torch.bfloat16), BLOCK_N=32, MIN_PROGRAMS=1)
    reply = evaluate.handle(_stage_request(good))
    assert reply["ok"] and reply["median_ms"] > 0 and reply["error"] < 1e-2, reply
    real_check = check.decode_check
    monkeypatch.setattr(check, "decode_check", lambda knobs, *a, **k: 0.5 if knobs["BLOCK_N"] == 64
                        else real_check(knobs, *a, **k))
    reply = evaluate.handle(_stage_request(dict(good, BLOCK_N=64)))
    assert not reply["ok"] and "against the reference" in reply["reason"] and "median_ms" not in reply
    # a step at the bucket's shape that is off where its knobs say BLOCK_N 16
    evaluate._benches.clear()
    real_step = kernels_decode.decode_step

    def off(*args, **kwargs):
        o = real_step(*args, **kwargs)
        return o * 1.1 if args[9]["BLOCK_N"] == 16 else o

    monkeypatch.setattr(kernels_decode, "decode_step", off)
    reply = evaluate.handle(_stage_request(dict(good, BLOCK_N=16), seed=1))
    assert not reply["ok"] and "against the default knobs' decode output" in reply["reason"]
    # an unknown knob is refused naming it; the pass op of a decode bucket is the same check
    reply = evaluate.handle(_stage_request(dict(good, BLOCK_K=16), seed=1))
    assert not reply["ok"] and "BLOCK_K" in reply["reason"]
    reply = evaluate.handle(dict(_stage_request(None, seed=1), op="pass", config={"decode": good}))
    assert reply["ok"] and reply["median_ms"] > 0
    evaluate._benches.clear()


def test_a_crashing_decode_candidate_is_a_failed_trial_and_the_tune_goes_on(tmp_path, monkeypatch):
    """In the real worker (the test hook): the candidate on two warps kills its process; it
    is a failed trial naming the crash, the next candidate gets a new worker, the bucket is
    still written, and never with the crashed knobs."""
    crash_candidates_with_two_warps(monkeypatch)
    default = default_decode_knobs(BUCKET.head_dim, torch.bfloat16)
    limits = {f"decode.{name}": value for name, value in default.items()}
    limits["decode.num_warps"] = [2, 4]  # two points, swept
    try:
        result = decode_tune.tune_decode_bucket(
            BUCKET, trials=1, sampler="tpe", seed=0, timeout_s=120, limits=limits, sweep_max=16,
            storage=tuner.open_storage(str(tmp_path / "s.journal")), log=lambda *a: None)
    finally:
        worker.shared().close()
    (study,) = result.studies.values()
    states = {t.params["decode.num_warps"]: t for t in study.trials}
    assert states[2].state == optuna.trial.TrialState.FAIL
    assert states[2].user_attrs["failure"].startswith("crashed (exit 1)")
    assert states[4].state == optuna.trial.TrialState.COMPLETE
    assert result.entry["failures"] == 1 and result.entry["config"]["decode"]["num_warps"] == 4
