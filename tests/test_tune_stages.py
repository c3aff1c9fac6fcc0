"""The per-stage search (dfgen.tools.tuning.stages): each stage of a bucket in a study of its
own, small spaces swept whole and resumably, the stages' bests combined and checked
against the reference, a forward+backward bucket keeping the forward's choice, and
compile-ahead's bookkeeping (its processes run on a GPU only)."""

import json
import subprocess
import zlib

import optuna
import pytest
import torch

from conftest import dfgen_command, tune_studies
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.select import tuned_file
from dfgen.select.bucket import Bucket
from dfgen.tools.check import validate_config
from dfgen.tools.tuning import compile_ahead, stages, tuner, worker
from dfgen.tools.tuning.progress import BucketBudget, TuneProgress
from dfgen.tools.tuning.space import bucket_limits, stage_choices, stage_knobs, stage_params, stage_points

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter tune")

# a forward+backward bucket whose backward stages are small spaces: attn_bwd 4 points,
# solve_bwd 2 (the interpreter sweeps a stage of at most 16 points whole)
BACKWARD_SPACE = """\
attn_bwd.BLOCK_M: [32, 64]
attn_bwd.BLOCK_N: 64
attn_bwd.num_warps: 4
attn_bwd.num_stages: [1, 2]
attn_bwd.ONE_LAUNCH: false
solve_bwd.CHUNK: 32
solve_bwd.BLOCK_M: [16, 32]
solve_bwd.SOLVE_PRECISION: tf32
solve_bwd.INV_FP16: true
solve_bwd.num_warps: 4
solve_bwd.num_stages: 2
"""
SHAPES = "- {pass: fwd, dtype: bf16, head_dim: 32, T: 24, BH: 1}\n" \
         "- {pass: fwd+bwd, dtype: bf16, head_dim: 32, T: 24, BH: 1}\n"


def run(*args, cwd):
    proc = subprocess.run(dfgen_command() + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "timed out" not in proc.stdout and "crashed" not in proc.stdout, proc.stdout
    return proc.stdout


def test_forward_then_backward_per_stage_sweeps_resume_and_pass_the_reference(tmp_path):
    """A forward bucket and the forward+backward bucket of its shape, the backward's stages
    in small spaces: every stage has its own study; the backward's are swept, each point
    once; the training forward is searched locally from the forward entry's config; the
    fwd+bwd entry takes its forward from that search and each backward section from its
    stage's best (or all from the default), and that combination passes the reference.
    Run again, the sweeps have nothing left to run; a cold start is a study of its own
    that sweeps again (and starts the training forward from the kept forward), with the
    default still timed end to end."""
    (tmp_path / "space.yaml").write_text("strategy: fused\n" + BACKWARD_SPACE)
    (tmp_path / "shapes.yaml").write_text(SHAPES)
    out_file, journal = tmp_path / "t.yaml", tmp_path / "s.journal"
    args = ["tune", "--trials", "2", "--shapes", "shapes.yaml", "--space", "space.yaml",
            "--out", str(out_file), "--storage", str(journal)]
    out = run(*args, cwd=tmp_path)
    assert "fwd+bwd/bf16/d32/t24/bh1 attn_bwd: every point of 4 (0 already in the study)" in out
    assert "fwd+bwd/bf16/d32/t24/bh1 solve_bwd: every point of 2 (0 already in the study)" in out
    studies = tune_studies(journal)
    by_slot = {(name.split(":")[1], name.split(":")[2]): study for name, study in studies.items()}
    assert set(by_slot) == {("fwd/bf16/d32/t24/bh1", "solve_fwd(fused)"),
                            ("fwd+bwd/bf16/d32/t24/bh1", "solve_fwd(fused, training)"),
                            ("fwd+bwd/bf16/d32/t24/bh1", "solve_bwd"),
                            ("fwd+bwd/bf16/d32/t24/bh1", "attn_bwd")}
    limits = tuner.load_space(tmp_path / "space.yaml")
    for stage, size in (("attn_bwd", 4), ("solve_bwd", 2)):
        study = by_slot[("fwd+bwd/bf16/d32/t24/bh1", stage)]
        points = sorted(json.dumps(p, sort_keys=True) for p in stage_points(stage_choices(stage, 32, limits)))
        assert sorted(json.dumps(t.params, sort_keys=True) for t in study.trials) == points
        assert len(points) == size
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    entries = tuned_file.read(out_file)["entries"]
    forward, both = entries["fwd/bf16/d32/t24/bh1"], entries["fwd+bwd/bf16/d32/t24/bh1"]
    assert both["trials"] == 8 and both["failures"] == 0  # 2 + 2 + 4
    assert both["config"]["strategy"] == forward["config"]["strategy"]
    default = default_config(32, torch.bfloat16)
    training = by_slot[("fwd+bwd/bf16/d32/t24/bh1", "solve_fwd(fused, training)")]
    assert training.trials[0].params == stage_params("solve_fwd", forward["config"]["solve"])
    assert both["config"]["solve"] in (stage_knobs("solve_fwd", training.best_trial.params),
                                       dict(default.solve))
    for stage in ("solve_bwd", "attn_bwd"):
        study = by_slot[("fwd+bwd/bf16/d32/t24/bh1", stage)]
        best = stage_knobs(stage, study.best_trial.params)
        assert both["config"][stage] in (best, dict(getattr(default, stage)))
    ok, message = validate_config(KernelConfig.from_dict(both["config"]), both, torch.device("cpu"))
    assert ok, message

    again = run(*args, "--passes", "fwd+bwd", cwd=tmp_path)  # resumed: the sweeps are complete
    assert "attn_bwd: every point of 4 (4 already in the study)" in again
    assert "fwd+bwd/bf16/d32/t24/bh1 solve_bwd: every point of 2 (2 already in the study)" in again
    assert sum(len(s.trials) for s in tune_studies(journal).values()) == \
        sum(len(s.trials) for s in studies.values())

    cold = run(*args, "--cold-start", "--passes", "fwd+bwd", cwd=tmp_path)
    assert "fwd+bwd/bf16/d32/t24/bh1: the default, end to end:" in cold
    cold_studies = [s for name, s in tune_studies(journal).items() if name.endswith(":cold-start")]
    assert sorted(len(s.trials) for s in cold_studies) == [2, 2, 4]


def _timed_by_knobs(monkeypatch, stage_ms, forward_ms=lambda knobs: 0.0):
    """worker.evaluate replaced: a backward stage candidate takes stage_ms(slot, knobs) ms,
    the training forward forward_ms(knobs), a pass the sum over its stages (so the stages'
    bests put together are the fastest pass)."""
    requests = []

    def fake(request, timeout_s, deadline=None):
        requests.append(request)
        if request["op"] == "stage":
            ms = forward_ms(request["knobs"]) if request["slot"].startswith("solve_fwd") \
                else stage_ms(request["slot"], request["knobs"])
            return {"ok": True, "median_ms": ms, "error": 0.0}
        config = request["config"]
        total = forward_ms(config["solve"]) + stage_ms("solve_bwd", config["solve_bwd"]) + \
            stage_ms("attn_bwd", config["attn_bwd"])
        return {"ok": True, "median_ms": total, "error": 0.0, "seconds": 0.01}

    monkeypatch.setattr(worker, "evaluate", fake)
    return requests


def test_each_stage_is_timed_alone_and_the_bests_are_combined(tmp_path, monkeypatch):
    """A forward+backward bucket: solve_bwd and attn_bwd searched apart, on inputs from the
    forward the caller keeps (sent with every stage request), and the entry holds the
    given forward with each stage's fastest knobs when that combination is faster end to
    end."""
    def stage_ms(slot, knobs):
        if slot == "attn_bwd":  # fastest at BLOCK_M 64 and two stages
            return 1.0 + (knobs["BLOCK_M"] != 64) + 0.5 * (knobs["num_stages"] != 2)
        return 2.0 + (knobs["BLOCK_M"] != 16)  # solve_bwd: fastest at BLOCK_M 16

    requests = _timed_by_knobs(monkeypatch, stage_ms)
    bucket = Bucket("fwd+bwd", "bf16", 32, 24, 1)
    forward = {"strategy": "two_stage", "solve": dict(default_config(32).solve, CHUNK=32, BLOCK_N=32)}
    (tmp_path / "space.yaml").write_text(BACKWARD_SPACE)
    limits = tuner.load_space(tmp_path / "space.yaml")
    logs = []
    result = tuner.tune_bucket(bucket, trials=3, sampler="tpe", seed=0, timeout_s=10, limits=limits,
                               storage=tuner.open_storage(str(tmp_path / "s.journal")),
                               forward=forward, log=logs.append, sweep_max=16)
    config = result.entry["config"]
    assert config["strategy"] == "two_stage" and config["solve"]["CHUNK"] == 32
    assert config["attn"] == dict(default_config(32, strategy="two_stage").attn)
    assert config["attn_bwd"]["BLOCK_M"] == 64 and config["attn_bwd"]["num_stages"] == 2
    assert config["solve_bwd"]["BLOCK_M"] == 16
    assert result.entry["median_ms"] == 3.0 and result.entry["trials"] == 9  # 3 + 2 + 4
    stage_requests = [r for r in requests if r["op"] == "stage"]
    assert {r["slot"] for r in stage_requests} == {"solve_fwd(two_stage, training)", "solve_bwd",
                                                   "attn_bwd"}
    assert all(r["forward"]["strategy"] == "two_stage" and r["forward"]["solve"]["CHUNK"] == 32
               for r in stage_requests)
    assert any("attn_bwd: best 1.0000 ms" in line for line in logs)


def test_the_training_forward_is_searched_from_the_kept_one(tmp_path, monkeypatch):
    """The forward bucket's pick may be slower in a training pass (which also writes a)
    than the default's forward: the training forward is searched locally from the kept
    forward and the default, on its own kernel time, and the entry holds the faster one
    with the backward's bests. From a cold start the kept forward is still its start (this
    tune's own pick) and the default is not."""
    def stage_ms(slot, knobs):
        return 1.0 + (knobs["BLOCK_M"] != (64 if slot == "attn_bwd" else 16))

    def forward_ms(knobs):  # the kept forward (CHUNK 32) costs 5 ms more when it also writes a
        return 1.0 + 5.0 * (knobs["CHUNK"] == 32)

    requests = _timed_by_knobs(monkeypatch, stage_ms, forward_ms)
    kept = dict(default_config(32).solve, CHUNK=32)
    (tmp_path / "space.yaml").write_text(BACKWARD_SPACE)
    common = dict(trials=3, sampler="tpe", seed=0, timeout_s=10, forward={"strategy": "fused", "solve": kept},
                  limits=tuner.load_space(tmp_path / "space.yaml"), log=lambda *a: None, sweep_max=16,
                  storage=tuner.open_storage(str(tmp_path / "f.journal")))
    result = tuner.tune_bucket(Bucket("fwd+bwd", "bf16", 32, 24, 1), **common)
    config = result.entry["config"]
    assert config["solve"]["CHUNK"] != 32  # not the kept forward
    assert config["attn_bwd"]["BLOCK_M"] == 64 and config["solve_bwd"]["BLOCK_M"] == 16
    assert result.entry["median_ms"] == 3.0
    training = [r for r in requests if r["op"] == "stage" and r["slot"] == "solve_fwd(fused, training)"]
    assert [r["knobs"] for r in training[:2]] == [kept, dict(default_config(32).solve)]
    assert len(training) == 3

    requests.clear()
    tuner.tune_bucket(Bucket("fwd+bwd", "bf16", 32, 24, 1), cold_start=True, **common)
    training = [r for r in requests if r["op"] == "stage" and r["slot"] == "solve_fwd(fused, training)"]
    assert training[0]["knobs"] == kept and len(training) == 3


def test_a_disturbed_final_run_is_timed_again(tmp_path, monkeypatch):
    """The final timing's runs of one config far apart (one disturbed run): more rounds
    are timed, the noise is then the gap between each config's two fastest runs, and a
    combination that is really faster is kept; steady runs take two rounds only."""
    def stage_ms(slot, knobs):
        return 1.0 + (knobs["BLOCK_M"] != (64 if slot == "attn_bwd" else 16))

    _timed_by_knobs(monkeypatch, stage_ms)
    fake, passes = worker.evaluate, []

    def disturbed(request, timeout_s, deadline=None):
        result = fake(request, timeout_s, deadline)
        if request["op"] == "pass":
            passes.append(request)
            if len(passes) == 5:  # the combination's second final run (after the default's first time)
                result = dict(result, median_ms=result["median_ms"] * 1.5)
        return result

    monkeypatch.setattr(worker, "evaluate", disturbed)
    (tmp_path / "space.yaml").write_text(BACKWARD_SPACE)
    limits = tuner.load_space(tmp_path / "space.yaml")
    limits.update({f"solve.{k}": v for k, v in default_config(32).solve.items()})  # one forward
    logs = []
    result = tuner.tune_bucket(Bucket("fwd+bwd", "bf16", 32, 24, 1), trials=3, sampler="tpe", seed=0,
                               timeout_s=10, limits=limits, log=logs.append, sweep_max=16,
                               storage=tuner.open_storage(str(tmp_path / "d.journal")))
    # the first default, then three rounds of two (after the third, the combination's two
    # fastest runs agree)
    assert len(passes) == 1 + 2 * 3
    assert result.entry["median_ms"] == 2.0 and result.entry["config"]["attn_bwd"]["BLOCK_M"] == 64
    assert [line.split(": ", 1)[1] for line in logs if "end to end: " in line][-2:] == \
        ["the default end to end: 3.0000, 3.0000, 3.0000 ms", "combination 1 end to end: 2.0000, 3.0000, 2.0000 ms"]
    assert tuner.final_noise([[2.0, 3.0, 2.0], [4.0, 4.1]]) == pytest.approx(0.025)
    assert tuner.final_noise([[2.0, 3.0]]) == pytest.approx(0.5)


def test_a_local_search_stops_at_a_local_optimum(tmp_path, monkeypatch):
    """A local search tries the untried one-knob neighbours of the best point so far and
    ends, short of its trials, once the best has none left."""
    times = []

    def fake(request, timeout_s, deadline=None):
        knobs = request["knobs"]
        times.append(knobs)
        return {"ok": True, "median_ms": 1.0 + (knobs["num_warps"] != 4) + (knobs["num_stages"] != 2),
                "error": 0.0}

    monkeypatch.setattr(worker, "evaluate", fake)
    bucket = Bucket("fwd+bwd", "bf16", 32, 24, 1)
    default = default_config(32)
    limits = {f"solve.{k}": v for k, v in default.solve.items()}  # one point, but for two knobs
    limits.update({"solve.num_warps": [2, 4, 8], "solve.num_stages": [2, 3, 4]})
    search = stages.StageSearch(stages.slot("solve_fwd(fused, training)"), bucket,
                                storage=tuner.open_storage(str(tmp_path / "l.journal")),
                                sampler="tpe", seed=0, trials=30, sweep_max=0, limits=limits,
                                cold_start=True, firsts=[], request=dict(bucket.fields(), seed=0),
                                timeout_s=10, anchors=[KernelConfig(
                                    strategy="fused", solve=dict(default.solve, num_warps=8, num_stages=4))])
    assert search.local and search.remaining == 30
    converging = stages.StageSearch(stages.slot("solve_fwd(fused, training)"), bucket, storage=None,
                                    sampler="tpe", seed=0, trials=30, sweep_max=0, limits=None,
                                    cold_start=True, converge=True, firsts=[], timeout_s=10,
                                    request=dict(bucket.fields(), seed=0))
    assert converging.remaining == stages.LOCAL_MAX  # to a local optimum, within LOCAL_MAX
    search.run(None, None, _FakeAhead())
    best = search.best()
    assert best[1] == 1.0 and best[0]["num_warps"] == 4 and best[0]["num_stages"] == 2
    # from (8, 4): its 4 neighbours, then those of (4, 4) or (8, 2), then the optimum's:
    # never all 9 points, and every point once
    points = [json.dumps(k, sort_keys=True) for k in times]
    assert len(points) == len(set(points)) < 9
    assert search.remaining == len(times) and search.total == len(times)


def test_a_cut_sweep_point_is_run_again_and_no_other(tmp_path, monkeypatch):
    """A sweep whose bucket time ran out mid-way: the points it timed (or that failed on
    their own) are not run again when the study resumes; the one cut at the deadline and
    those never reached are."""
    calls, outcomes = [], {1: ("wrong", False), 2: ("cut", True)}  # by attn_bwd call, first run

    def fake(request, timeout_s, deadline=None):
        if request["op"] == "pass" or request["slot"].startswith("solve_fwd"):  # (the training forward)
            return {"ok": True, "median_ms": 5.0, "error": 0.0, "seconds": 0.01}
        calls.append(json.dumps(request["knobs"], sort_keys=True))
        reason, cut = outcomes.pop(len(calls) - 1, (None, False)) if request["slot"] == "attn_bwd" \
            else (None, False)
        if reason:
            return {"ok": False, "cut": cut, "reason": reason}
        return {"ok": True, "median_ms": float(len(calls)), "error": 0.0}

    monkeypatch.setattr(worker, "evaluate", fake)
    bucket = Bucket("fwd+bwd", "bf16", 32, 24, 1)
    (tmp_path / "space.yaml").write_text(BACKWARD_SPACE)
    limits = {k: v for k, v in tuner.load_space(tmp_path / "space.yaml").items()
              if k.startswith("attn_bwd.")}
    limits.update({"solve_bwd.BLOCK_M": 16, "solve_bwd.CHUNK": 32, "solve_bwd.SOLVE_PRECISION": "tf32",
                   "solve_bwd.INV_FP16": True, "solve_bwd.num_warps": 4, "solve_bwd.num_stages": 2})
    storage = tuner.open_storage(str(tmp_path / "s.journal"))
    common = dict(trials=2, sampler="tpe", seed=0, timeout_s=10, limits=limits, storage=storage,
                  log=lambda *a: None, sweep_max=16)
    tuner.tune_bucket(bucket, **common)  # solve_bwd: 1 point; attn_bwd: 4, its 2nd cut
    first = list(calls)
    assert len(first) == 3  # the solve point, then attn_bwd's: one that fails, one cut (the stage ends)
    calls.clear()
    tuner.tune_bucket(bucket, **common)
    assert first[2] in calls and first[0] not in calls and first[1] not in calls
    assert len(calls) == 3  # the cut point and the two never reached
    attn = next(s for s in optuna.get_all_study_summaries(storage) if ":attn_bwd:" in s.study_name)
    study = optuna.load_study(study_name=attn.study_name, storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 3  # 4 points, 1 failed


class _FakeAhead:
    """A CompileAhead that only records what it is sent."""
    jobs = 2

    def __init__(self):
        self.submitted, self.forgotten = [], 0

    def submit(self, request):
        self.submitted.append(request)

    def forget(self):
        self.forgotten += 1


def test_candidates_are_asked_for_ahead_and_compiled_while_one_is_timed(tmp_path, monkeypatch):
    """With compile-ahead (GPU: --jobs N), a stage asks for N more trials than the one being
    timed and hands each to the compile processes before its turn; when the stage's time
    runs out, those asked for but never timed are recorded as cut (a resume runs them)."""
    import time

    timed = []

    def fake(request, timeout_s, deadline=None):
        timed.append(request["knobs"])
        time.sleep(0.05)
        return {"ok": True, "median_ms": 1.0 + len(timed), "error": 0.0}

    monkeypatch.setattr(worker, "evaluate", fake)
    bucket = Bucket("fwd+bwd", "bf16", 32, 24, 1)
    search = stages.StageSearch(stages.slot("attn_bwd"), bucket,
                                storage=tuner.open_storage(str(tmp_path / "s.journal")),
                                sampler="random", seed=0, trials=20, sweep_max=0, limits=None,
                                cold_start=True, firsts=[], request=dict(bucket.fields(), seed=0),
                                timeout_s=10)
    ahead = _FakeAhead()
    search.run(time.monotonic() + 0.4, None, ahead)
    assert 2 <= len(timed) < 20
    # every candidate timed after the first was compiled ahead, before its turn
    assert [r["knobs"] for r in ahead.submitted[:len(timed) - 1]] == timed[1:]
    states = [t.state for t in search.study.trials]
    cut = [t for t in search.study.trials if t.user_attrs.get("cut")]
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(timed)
    assert len(cut) == 2 and all("asked for ahead" in t.user_attrs["failure"] for t in cut)
    assert ahead.forgotten == 1

    # TPE: every compile process gets a candidate during the random start, one after it
    tpe = stages.StageSearch(stages.slot("attn_bwd"), bucket,
                             storage=tuner.open_storage(str(tmp_path / "t.journal")),
                             sampler="tpe", seed=0, trials=30, sweep_max=0, limits=None,
                             cold_start=True, firsts=[], request=dict(bucket.fields(), seed=0),
                             timeout_s=10)
    start = stages.tpe_startup(tpe.refine_from)
    assert tpe.refine_from == 20 and start == 6
    assert [tpe._depth(8, asked) for asked in (0, start - 1, start, 25)] == [9, 9, 2, 2]
    assert search._depth(8, 15) == 9  # random sampling learns nothing: always all


def test_compile_ahead_feeds_idle_processes_and_drops_what_is_not_wanted(monkeypatch):
    """CompileAhead's bookkeeping with stand-in processes: a candidate goes to an idle one,
    the rest wait; finished compiles are counted; forget() drops the waiting ones."""
    class FakeWorker:
        def __init__(self):
            self.sent, self.replies = [], []

        def send(self, request):
            self.sent.append(request)
            return True

        def receive(self, timeout):
            return self.replies.pop(0) if self.replies else None

        def close(self):
            pass

    monkeypatch.setattr(compile_ahead, "Worker", FakeWorker)
    ahead = compile_ahead.CompileAhead(2)
    for i in range(5):
        ahead.submit({"op": "stage", "knobs": {"i": i}})
    assert [w.sent[0]["knobs"]["i"] for w in ahead.workers] == [0, 1]
    assert all(r["op"] == "compile" for w in ahead.workers for r in w.sent)
    assert len(ahead.queue) == 3
    ahead.workers[0].replies.append({"ok": True, "seconds": 1.5})
    ahead.pump()
    assert ahead.workers[0].sent[-1]["knobs"]["i"] == 2 and ahead.compiled == 1
    ahead.forget()
    assert not ahead.queue
    assert "1 candidates compiled ahead by 2 processes" in ahead.summary()
    assert compile_ahead.CompileAhead.for_device(4) is None  # the interpreter compiles nothing


def test_progress_reports_trials_per_minute():
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    progress = TuneProgress(2, 30, None, clock=clock)
    progress.start_bucket(BucketBudget(None, clock=clock))
    now[0] = 30.0
    line = progress.line("fwd/bf16/d32/t40/bh2", "attn_fwd trial 5 complete 1.0 ms", 6, 30, 0, 0,
                         1.0, 6, left=24)
    assert line.startswith("[bucket 1/2] fwd/bf16/d32/t40/bh2 attn_fwd trial 5")
    assert line.endswith("| 12.0 trials/min")
    assert "~2:00 left in bucket" in line  # 24 more at 5 s each
    assert progress.budget_text(120).startswith("2 buckets x at most 30 trials per sampled stage")
    converging = TuneProgress(2, 30, None, clock=clock, converge=True).budget_text(120)
    assert converging.startswith("2 buckets x 30 trials per sampled stage, then refinement until "
                                 "no neighbour of the best is untried (at most 60)")


def test_stage_spaces_and_slots():
    """A forward bucket searches each strategy's stages (fused: the solve writing o;
    two-stage: the solve writing u, then attention), within the strategy limit; a
    forward+backward bucket its forward's solve as training runs it, locally, then the
    backward's two; the q_solve variant the two-stage ones."""
    names = lambda bucket, limits=None: [s.name for s in stages.bucket_slots(bucket, limits)]  # noqa: E731
    fwd = Bucket("fwd", "bf16", 64, 1024, 8)
    assert names(fwd) == ["solve_fwd(fused)", "solve_fwd(two_stage)", "attn_fwd"]
    assert names(fwd, {"strategy": "fused"}) == ["solve_fwd(fused)"]
    assert names(fwd._replace(variant="qsolve")) == ["solve_fwd(two_stage)", "attn_fwd"]
    assert names(fwd._replace(pass_="fwd+bwd")) == ["solve_fwd(fused, training)", "solve_bwd", "attn_bwd"]
    assert [s.name for s in stages.bucket_slots(fwd._replace(pass_="fwd+bwd"), None, "two_stage")][0] \
        == "solve_fwd(two_stage, training)"
    assert stages.is_local(stages.slot("solve_fwd(fused, training)"))
    assert not stages.is_local(stages.slot("solve_fwd(fused)"))
    # the dq/dk pass searches one launch and two at every point (d128: sampled, not swept)
    two_launches = stage_choices("attn_bwd", 128, {**bucket_limits("bf16"), "attn_bwd.ONE_LAUNCH": [False]})
    assert len(stage_points(two_launches)) <= stages.SWEEP_MAX
    assert len(stage_points(stage_choices("attn_bwd", 128, bucket_limits("bf16")))) == 2 * len(stage_points(two_launches))
    name = stages.study_name("fwd/bf16/d64/t1024/bh8", stages.slot("attn_fwd"), "tpe",
                             {"solve.CHUNK": [32]}, False)
    assert name.startswith("dfgen:fwd/bf16/d64/t1024/bh8:attn_fwd:templates-")
    assert "space" not in name  # a limit of another stage's section leaves the study as it is
    assert stages.study_name("k", stages.slot("attn_fwd"), "grid", None, True).endswith(":cold-start")


def _by_strategy(monkeypatch, two_stage_ms):
    """worker.evaluate replaced: the fused default end to end 1.0 ms, the two-stage one
    `two_stage_ms`; stage candidates 1.0 ms."""
    requests = []

    def fake(request, timeout_s, deadline=None):
        requests.append(request)
        ms = 1.0
        if request["op"] == "pass" and request["config"]["strategy"] == "two_stage":
            ms = two_stage_ms
        return {"ok": True, "median_ms": ms, "error": 0.0, "seconds": 0.01}

    monkeypatch.setattr(worker, "evaluate", fake)
    return requests


@pytest.mark.parametrize("two_stage_ms, searched", [(2.0, False), (1.2, True)])
def test_a_strategy_whose_default_is_far_slower_is_not_searched(tmp_path, monkeypatch,
                                                                  two_stage_ms, searched):
    """The strategy is chosen above the stages: a forward bucket times each strategy's
    default end to end first and searches only those within STRATEGY_MARGIN of the fastest."""
    requests = _by_strategy(monkeypatch, two_stage_ms)
    logs = []
    tuner.tune_bucket(Bucket("fwd", "bf16", 32, 24, 1), trials=2, sampler="random", seed=0,
                      timeout_s=10, storage=tuner.open_storage(str(tmp_path / "s.journal")),
                      log=logs.append, sweep_max=0)
    slots = {r["slot"] for r in requests if r["op"] == "stage"}
    defaults = [r for r in requests if r["op"] == "pass"][:2]
    assert [r["config"]["strategy"] for r in defaults] == ["fused", "two_stage"]
    assert "solve_fwd(fused)" in slots
    assert ("attn_fwd" in slots and "solve_fwd(two_stage)" in slots) == searched
    assert any("not searching two_stage" in line for line in logs) != searched


def _stub_tune_bucket(monkeypatch, seconds_per_bucket, clock):
    """tuner.tune_bucket replaced: each bucket takes `seconds_per_bucket` of `clock` and
    finds a config of its own; the calls' keyword arguments are recorded."""
    calls = []

    def fake(bucket, **kw):
        calls.append((bucket, kw))
        clock[0] += seconds_per_bucket
        config = default_config(bucket.head_dim).to_dict()
        config["solve"]["num_warps"] = 8 if len(calls) % 2 else 4  # each bucket's own best
        entry = {**bucket.fields(), "config": config, "median_ms": 1.0, "default_ms": 1.0,
                 "trials": 1, "failures": 0}
        return tuner.BucketResult(bucket.key, entry, 0, bests=[KernelConfig.from_dict(config)])

    monkeypatch.setattr(tuner, "tune_bucket", fake)
    monkeypatch.setattr("dfgen.tools.cli.time.monotonic", lambda: clock[0])
    return calls


def test_total_minutes_is_shared_among_the_buckets_left_and_bests_seed_the_next(tmp_path, monkeypatch,
                                                                               capsys):
    """--total-minutes: each bucket gets an equal share of what is left (capped by
    --minutes), buckets past the budget are not started and are named; a bucket's stage
    bests are tried first in the next bucket of its pass, dtype and head dim."""
    from dfgen.tools import cli

    shapes = tmp_path / "b.yaml"
    shapes.write_text("".join(f"- {{pass: fwd, dtype: bf16, head_dim: 32, T: {t}, BH: 1}}\n"
                              for t in (16, 32, 64, 128)))
    clock = [0.0]
    calls = _stub_tune_bucket(monkeypatch, 10.0, clock)
    out = tmp_path / "t.yaml"
    code = cli.main(["tune", "--shapes", str(shapes), "--total-minutes", "2", "--out", str(out)])
    assert code == 0
    minutes = [kw["minutes"] for _, kw in calls]
    assert minutes[0] == pytest.approx(0.5)  # 120 s over 4 buckets
    assert minutes[1] == pytest.approx((120 - 10) / 3 / 60)  # the first left 20 s to the rest
    assert all(b >= a for a, b in zip(minutes, minutes[1:]))
    starts = [kw["starts"] for _, kw in calls]
    assert starts[0] == [] and starts[1][0]["solve"]["num_warps"] == 8
    assert starts[2][0]["solve"]["num_warps"] == 4 and starts[2][1]["solve"]["num_warps"] == 8
    assert "4 bucket(s) in" in capsys.readouterr().out

    clock[0], calls[:] = 0.0, []  # buckets that take their whole share and more
    calls_slow = _stub_tune_bucket(monkeypatch, 70.0, clock)
    code = cli.main(["tune", "--shapes", str(shapes), "--total-minutes", "2", "--minutes", "0.4",
                     "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and len(calls_slow) == 1  # after 70 s, 50 s for 3 buckets: under 20 s each
    assert calls_slow[0][1]["minutes"] == pytest.approx(0.4)  # --minutes caps the share
    assert "budget ran out before 3 bucket(s): fwd/bf16/d32/t32/bh1, fwd/bf16/d32/t64/bh1, " \
        "fwd/bf16/d32/t128/bh1" in text


def test_a_sampled_stage_spends_its_last_third_refining_the_best_point(tmp_path, monkeypatch):
    """TPE's trials, then (LOCAL_FRACTION of the stage's trials) points one knob away from
    the best so far, none timed twice; --trials may be a share of each stage's points."""
    def stage_ms(slot, knobs):  # a fixed landscape (str hashes change with PYTHONHASHSEED)
        return 1.0 + sum(zlib.crc32(f"{k}={v}".encode()) % 7 for k, v in knobs.items()) / 10

    _timed_by_knobs(monkeypatch, stage_ms)
    bucket = Bucket("fwd+bwd", "bf16", 32, 24, 1)
    size = len(stage_points(stage_choices("attn_bwd", 32, bucket_limits("bf16"))))
    trials = stages.stage_trials("9%", size)
    assert trials == int(0.09 * size) and stages.stage_trials("0.1%", 4) == 1 and stages.stage_trials(7, 99) == 7
    result = tuner.tune_bucket(bucket, trials="9%", sampler="tpe", seed=0, timeout_s=10,
                               storage=tuner.open_storage(str(tmp_path / "r.journal")),
                               log=lambda *a: None, sweep_max=0, cold_start=True)
    done = [t for t in result.studies["attn_bwd"].trials if t.state.name == "COMPLETE"]
    assert len(done) == trials  # a given number of trials is exact
    _assert_refines(done, trials - int(trials * stages.LOCAL_FRACTION))


def _assert_refines(done, refine_from):
    """Each trial from `refine_from` on is one knob away from the best before it, and new."""
    for i in range(refine_from, len(done)):
        best = min(done[:i], key=lambda t: t.value).params
        changed = [name for name in best if done[i].params[name] != best[name]]
        assert len(changed) == 1, (i, best, done[i].params)
        assert all(done[i].params != t.params for t in done[:i])  # a point not yet timed


def test_refinement_walks_past_the_stage_trials_to_a_local_optimum(tmp_path, monkeypatch):
    """Without --trials (converge): a stage whose time falls knob by knob towards one point
    that TPE's few trials did not reach goes on refining past its trials (at most as many
    again) while the best point has an untried one-knob neighbour."""
    space = stage_choices("attn_bwd", 32, None)
    target = stage_knobs("attn_bwd", {k: values[-1] for k, values in space.items()})

    def stage_ms(slot, knobs):
        return 1.0 + sum(knobs[k] != v for k, v in target.items()) if slot == "attn_bwd" else 1.0

    _timed_by_knobs(monkeypatch, stage_ms)
    result = tuner.tune_bucket(Bucket("fwd+bwd", "bf16", 32, 24, 1), trials=6, sampler="tpe", seed=1,
                               timeout_s=10, storage=tuner.open_storage(str(tmp_path / "w.journal")),
                               log=lambda *a: None, sweep_max=0, cold_start=True, converge=True)
    done = [t for t in result.studies["attn_bwd"].trials if t.state.name == "COMPLETE"]
    assert 6 < len(done) <= 12
    _assert_refines(done, 6 - int(6 * stages.LOCAL_FRACTION))
    best = min(done, key=lambda t: t.value)
    assert best.value < min(t.value for t in done[:6])  # the walk past the trials improved it
    space = stage_choices("attn_bwd", 32, None)
    neighbours = [dict(best.params, **{k: v}) for k, values in space.items() for v in values
                  if v != best.params[k]]
    timed = [t.params for t in done]
    assert len(done) == 12 or all(n in timed for n in neighbours)  # stopped at a local optimum


@pytest.mark.parametrize("value", ["0", "abc", "150%", "-5%", "nan%"])
def test_bad_trials_are_one_line_errors(value, capsys):
    from dfgen.tools import cli

    assert cli.main(["tune", f"--trials={value}"]) == 2
    err = capsys.readouterr().err
    assert "--trials must be a number of trials >= 1 or a share" in err and value in err
