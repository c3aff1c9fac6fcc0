"""dfgen tune without a GPU: the interpreter pipeline, resuming, shared studies, failures.
(The per-stage search itself: test_tune_stages.py; the worker process: test_tune_worker.py.)"""

import itertools
import os
import subprocess

import optuna
import pytest
import torch

from dfgen.select import tuned_file
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.errors import DfgenError
from dfgen.tools.tuning import stages, tuner, worker
from dfgen.tools.tuning.space import stage_params
from dfgen.select.bucket import Bucket
from dfgen.settings import torch_dtype
from conftest import dfgen_command

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter tune")


def dfgen(*args, cwd=None, env=None):
    """The installed command, run from a scratch folder (never the checkout)."""
    import tempfile

    return subprocess.Popen(dfgen_command() + list(args), cwd=cwd or tempfile.mkdtemp(prefix="dfgen-tune-"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else dict(os.environ, **env))


def run(*args, env=None):
    proc = dfgen(*args, env=env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def stage_studies(storage) -> dict:
    """{slot name: study} of a storage holding one bucket's stage studies."""
    storage = tuner.open_storage(storage) if isinstance(storage, str) and "://" not in storage \
        else storage
    return {s.study_name.split(":")[2]: optuna.load_study(study_name=s.study_name, storage=storage)
            for s in optuna.get_all_study_summaries(storage)}


def finished(study) -> list:
    return [t for t in study.trials if t.state.is_finished()]


def fused_only(tmp_path) -> str:
    """A --space file that keeps the fused strategy: the CPU bucket then has one stage
    study (its solve_fwd's), for tests about studies rather than stages."""
    path = tmp_path / "fused.yaml"
    path.write_text("strategy: fused\n")
    return str(path)


def test_interpreter_tune_writes_and_resumes(tmp_path):
    """The CPU bucket's three stages (fused solve; two-stage solve and attention), 2 trials
    each; the entry counts them all. A resumed tune asking for 3 runs 1 more per stage."""
    out_file, db = tmp_path / "tuned.yaml", str(tmp_path / "study.journal")
    out = run("tune", "--trials", "2", "--out", str(out_file), "--storage", db)
    assert "NOT GPU TIMINGS" in out
    entry = tuned_file.read(out_file)["entries"]["fwd/bf16/d32/t40/bh2"]
    assert entry["trials"] == 6 and entry["median_ms"] > 0 and entry["default_ms"] > 0
    studies = stage_studies(db)
    assert sorted(studies) == ["attn_fwd", "solve_fwd(fused)", "solve_fwd(two_stage)"]
    assert all(len(finished(study)) == 2 for study in studies.values())
    out = run("tune", "--trials", "3", "--out", str(out_file), "--storage", db,
              "--plot", str(tmp_path / "plots"))
    assert out.count("1 trials of ") == 3 and out.count("(2 already in the study)") == 3, out
    assert tuned_file.read(out_file)["entries"]["fwd/bf16/d32/t40/bh2"]["trials"] == 9
    png = tmp_path / "plots" / "fwd_bf16_d32_t40_bh2.png"
    assert f"search plotted in {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_workers_share_one_study(tmp_path):
    """Two tune processes on one SQLite study (a journal shared by two: the --workers test)."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [dfgen("tune", "--trials", "3", "--seed", str(seed), "--space", fused_only(tmp_path),
                   "--out", str(tmp_path / f"w{seed}.yaml"), "--storage", db) for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    (study,) = stage_studies(tuner.open_storage(db)).values()
    assert 3 <= len(finished(study)) <= 6  # both workers added trials to the one study


POSTGRES_URL = os.environ.get("DFGEN_TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES_URL, reason="set DFGEN_TEST_POSTGRES_URL (.ci/start-postgres.sh "
                    "starts a server on loopback; .ci/run does)")
def test_two_workers_share_a_postgres_study(tmp_path):
    """A real PostgreSQL server: two tune processes on one study, as on two hosts."""
    import uuid

    bucket = tmp_path / "bucket.yaml"  # a bucket of its own, so reruns start a new study
    bucket.write_text(f"- {{pass: fwd, dtype: bf16, head_dim: 32, T: {33 + uuid.uuid4().int % 30}, BH: 1}}\n")
    procs = [dfgen("tune", "--trials", "3", "--seed", str(seed), "--shapes", str(bucket),
                   "--out", str(tmp_path / f"w{seed}.yaml"), "--storage", POSTGRES_URL)
             for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    entry = next(iter(tuned_file.read(tmp_path / "w1.yaml")["entries"].values()))
    key = f"dfgen:fwd/bf16/d32/t{entry['T']}/bh1"
    storage = tuner.open_storage(POSTGRES_URL)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith(key + ":")]
    assert len(names) == 3  # one per stage
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        assert 3 <= len(finished(study)) <= 6


def test_workers_flag_runs_processes_on_one_study(tmp_path):
    journal = tmp_path / "w.journal"
    out = run("tune", "--trials", "3", "--workers", "2", "--storage", str(journal),
              "--space", fused_only(tmp_path), "--out", str(tmp_path / "w.yaml"))
    assert "2 workers finished with exit codes [0, 0]" in out
    (study,) = stage_studies(str(journal)).values()
    assert 3 <= len(finished(study)) <= 6
    assert "fwd/bf16/d32/t40/bh2" in tuned_file.read(tmp_path / "w.yaml")["entries"]


def test_failing_candidates_are_recorded_and_the_search_goes_on(tmp_path):
    """A timeout too short for any candidate (the worker's start-up is not counted): every
    trial fails with its reason, the search still runs all its trials, and no config is
    written."""
    db = tuner.open_storage(str(tmp_path / "fail.journal"))
    with pytest.raises(DfgenError, match="no candidate"):
        tuner.tune_bucket(tuner.CPU_BUCKETS[0], trials=3, sampler="random", seed=0, storage=db,
                          timeout_s=0.05, log=lambda *a: None, limits={"strategy": "fused"})
    (study,) = stage_studies(db).values()
    assert len(study.trials) == 3
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.FAIL
        assert "timed out after 0.05 s" in trial.user_attrs["failure"]


def _failing_evaluations(monkeypatch):
    """The worker replaced by one whose every candidate fails at once (only the order of
    the trials matters); the requests are returned as they come."""
    requests = []

    def fake(request, timeout_s, deadline=None):
        requests.append(request)
        return {"ok": False, "reason": "stub"}

    monkeypatch.setattr(worker, "evaluate", fake)
    return requests


@pytest.mark.parametrize("cold_start", [False, True])
def test_default_and_earlier_entry_go_first_unless_cold_start(tmp_path, monkeypatch, cold_start):
    """A new stage study tries the shipped default's knobs, then those of the start configs
    (the tuned file's entry for the bucket, --try configs) that fit: here an earlier
    two-stage winner (its solve knobs go to the two-stage solve's study, its attention
    knobs to attn_fwd's, not to the fused solve's), and a broken config that is skipped; a
    cold start lets the sampler pick every point (how a sweep comparison measures it), in
    studies of their own. The default is timed end to end first either way."""
    requests = _failing_evaluations(monkeypatch)
    db = tuner.open_storage(str(tmp_path / "order.journal"))
    bucket = tuner.CPU_BUCKETS[0]
    default = default_config(bucket.head_dim, torch_dtype(bucket.dtype))
    earlier = dict(default.to_dict(), strategy="two_stage",
                   solve=dict(default.solve, CHUNK=16, BLOCK_N=16), attn=dict(default.attn, BLOCK_M=128))
    logs = []
    with pytest.raises(DfgenError, match="no candidate"):
        tuner.tune_bucket(bucket, trials=3, sampler="tpe", seed=0, storage=db, timeout_s=1,
                          log=logs.append, starts=[earlier, {"solve": {"CHUNK": 7}}],
                          cold_start=cold_start, sweep_max=0)
    assert requests[0]["op"] == "pass" and requests[0]["config"]["solve"] == dict(default.solve)
    names = [s.study_name for s in optuna.get_all_study_summaries(db)]
    assert len(names) == 3 and all(n.endswith(":cold-start") == cold_start for n in names)
    studies = stage_studies(db)
    enqueued = {slot: [t.system_attrs.get("fixed_params") for t in study.trials]
                for slot, study in studies.items()}
    if cold_start:
        assert all(e == [None] * 3 for e in enqueued.values())
        return
    two = KernelConfig.from_dict(earlier)
    assert enqueued["solve_fwd(fused)"] == [stage_params("solve_fwd", default.solve), None, None]
    assert enqueued["solve_fwd(two_stage)"] == [stage_params("solve_fwd", default.solve),
                                                stage_params("solve_fwd", two.solve), None]
    assert enqueued["attn_fwd"] == [stage_params("attn_fwd", default.attn),
                                    stage_params("attn_fwd", two.attn), None]
    assert any("start config 2 does not fit" in line for line in logs)


def test_evaluate_reports_a_candidate_that_fails_to_compile():
    """Head dim 48 passes the knob constraints but Triton refuses the kernel (tl.arange
    needs a power of two): the worker reports it instead of dying, and serves on."""
    request = {"op": "pass", "pass": "fwd", "dtype": "bf16", "head_dim": 48, "T": 8, "BH": 1,
               "seed": 0, "config": default_config(64).to_dict()}
    process = worker.Worker()
    try:
        result = process.call(request, timeout_s=300)
        assert result["ok"] is False and "power of 2" in result["reason"]
        again = process.call(dict(request, head_dim=32, config=default_config(32).to_dict()), 300)
        assert again["ok"] and again["pid"] == result["pid"]
    finally:
        process.close()


def test_tune_a_q_solve_bucket(tmp_path):
    """A bucket of the q_solve case: two-stage configs only, checked with q_solve inputs."""
    shapes = tmp_path / "shapes.yaml"
    shapes.write_text("- {pass: fwd+bwd, dtype: fp32, head_dim: 32, T: 24, BH: 1, variant: qsolve}\n")
    out_file = tmp_path / "q.yaml"
    out = run("tune", "--trials", "2", "--shapes", str(shapes), "--out", str(out_file),
              "--storage", str(tmp_path / "q.journal"))
    entry = tuned_file.read(out_file)["entries"]["fwd+bwd/fp32/d32/t24/bh1/qsolve"]
    assert entry["variant"] == "qsolve" and entry["config"]["strategy"] == "two_stage"
    assert entry["failures"] == 0, out  # the log names each failed trial's reason


def test_a_float32_bucket_searches_float32_accurate_precisions_only():
    """16-bit inverses and products cannot keep float32 accuracy; a float32 bucket does
    not spend trials on them (a user's limits may still ask for them)."""
    from dfgen.kernels.config import FLOAT32_ACCURATE
    from dfgen.tools.tuning.space import bucket_limits, choices, config_of, params_of

    assert bucket_limits("bf16")["solve_bwd.SOLVE_PRECISION"] == ["tf32"]  # 16-bit: the fast ones only
    space = choices("fwd+bwd", 32, "qsolve", bucket_limits("fp32"))
    params = {p: values[-1] for p, values in space.items()}
    for precision in space["solve.INV_FP16/SOLVE_PRECISION"]:
        config = config_of(dict(params, **{"solve.INV_FP16/SOLVE_PRECISION": precision}))
        assert config.solve["SOLVE_PRECISION"] in FLOAT32_ACCURATE["SOLVE_PRECISION"]
        assert config.solve["INV_FP16"] is False
    assert set(space["solve_bwd.SOLVE_PRECISION"]) == set(FLOAT32_ACCURATE["SOLVE_PRECISION"])
    assert space["solve_bwd.INV_FP16"] == [False]
    default = default_config(32, torch.float32)
    assert params_of(default, "fwd+bwd")["solve.INV_FP16/SOLVE_PRECISION"] in \
        space["solve.INV_FP16/SOLVE_PRECISION"]
    wider = choices("fwd", 32, "", bucket_limits("fp32", {"solve.INV_FP16": [False, True]}))
    assert any(p.startswith("True/") for p in wider["solve.INV_FP16/SOLVE_PRECISION"])


def test_a_float32_tune_evaluates_float32_accurate_candidates_only(tmp_path, monkeypatch):
    """What tune_bucket sends to be checked for float32 buckets (evaluation stubbed: only
    the knobs the search picks matter here): the forward's and the backward's solves."""
    from dfgen.kernels.config import FLOAT32_ACCURATE

    seen = []

    def fake_evaluate(request, timeout_s, deadline=None):
        seen.append(request)  # every strategy's default equally fast end to end: both searched
        return {"ok": True, "median_ms": 1.0 if request["op"] == "pass" else 1.0 + len(seen) % 5,
                "error": 0.0}

    monkeypatch.setattr(worker, "evaluate", fake_evaluate)
    for pass_ in ("fwd", "fwd+bwd"):
        tuner.tune_bucket(Bucket(pass_, "fp32", 32, 24, 1), trials=12, sampler="random", seed=0,
                          storage=tuner.open_storage(str(tmp_path / "f32.journal")), timeout_s=1,
                          log=lambda *a: None, sweep_max=0)
    solves = [r["knobs"] for r in seen if r["op"] == "stage" and r["slot"].startswith("solve")]
    assert len(solves) >= 30  # two forward solve stages and the backward's, 12 trials each (less repeats)
    for knobs in solves + [r["config"][s] for r in seen if r["op"] == "pass"
                           for s in ("solve", "solve_bwd") if s in r["config"]]:
        assert knobs["SOLVE_PRECISION"] in FLOAT32_ACCURATE["SOLVE_PRECISION"]
        assert knobs["INV_FP16"] is False


def test_a_seed_fixes_every_input_of_a_checked_pass():
    """The tuner's check reruns as it ran: q, k, v, beta, do and q_solve all follow the seed."""
    from dfgen.tools.check import random_pass_inputs

    first, again = (random_pass_inputs((1, 5, 2, 8), torch.float32, torch.device("cpu"), seed=3,
                                       with_q_solve=True) for _ in range(2))
    other = random_pass_inputs((1, 5, 2, 8), torch.float32, torch.device("cpu"), seed=4,
                               with_q_solve=True)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_gpu_keys():
    assert tuner.gpu_key("NVIDIA H200") == "h200"
    assert tuner.gpu_key("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert tuner.gpu_key("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"


def test_space_limits_are_checked():
    from dfgen.tools.tuning.space import choices, stage_choices

    space = choices("fwd", 32, limits={"strategy": "fused", "solve.CHUNK": [32, 16]})
    assert space["strategy"] == ["fused"]
    assert {v.split("/")[0] for v in space["solve.CHUNK/BLOCK_N/LOOKAHEAD"]} == {"16", "32"}
    assert "attn.BLOCK_M/BLOCK_N" not in space  # the two-stage section is not searched for fused only
    with pytest.raises(DfgenError, match="unknown parameters.*solve.CHUNKS"):
        choices("fwd", 32, limits={"solve.CHUNKS": [32]})
    with pytest.raises(DfgenError, match=r"solve.CHUNK: \[48\] not among"):
        choices("fwd", 32, limits={"solve.CHUNK": [48]})
    with pytest.raises(DfgenError, match="no combination of solve"):  # BLOCK_N = 4 * CHUNK only
        choices("fwd", 32, limits={"solve.CHUNK": 16, "solve.BLOCK_N": 64})
    # a backward limit is accepted (and unused) for a forward-only bucket
    assert not any(p.startswith("solve_bwd.") for p in choices("fwd", 32, limits={"solve_bwd.CHUNK": 32}))
    # one stage's space: its own section's parameters, within the limits that name it
    attn = stage_choices("attn_bwd", 128, {"attn_bwd.BLOCK_M": [32, 64], "solve.CHUNK": [32]})
    assert list(attn) == ["attn_bwd.BLOCK_M", "attn_bwd.BLOCK_N", "attn_bwd.num_warps",
                          "attn_bwd.num_stages", "attn_bwd.ONE_LAUNCH"] and attn["attn_bwd.BLOCK_M"] == [32, 64]
    with pytest.raises(DfgenError, match="unknown parameters"):
        stage_choices("attn_bwd", 128, {"attn_bwd.BLOCK_K": [32]})


def test_space_holds_only_feasible_points_and_round_trips():
    """Knobs tied by constraints are one parameter of feasible combinations at the head
    dim; every point of the space is a valid config, and params_of inverts suggest."""
    import random

    from dfgen.tools.tuning.space import choices, config_of, params_of

    for pass_, head_dim in (("fwd+bwd", 128), ("fwd", 64)):
        space = choices(pass_, head_dim, limits={"strategy": "two_stage"})
        assert "solve.CHUNK/BLOCK_N/LOOKAHEAD" in space and "solve.CHUNK" not in space
        assert "128/16/1" in space["solve.CHUNK/BLOCK_N/LOOKAHEAD"]  # 128 * 128 <= 16384
        assert "16/64/1" not in space["solve.CHUNK/BLOCK_N/LOOKAHEAD"]  # BLOCK_N = 4 * CHUNK
        assert ("64/128/1" in space["solve.CHUNK/BLOCK_N/LOOKAHEAD"]) == (head_dim == 64)  # two chunks
        assert "128/64/3" not in space["solve.CHUNK/BLOCK_N/LOOKAHEAD"]  # LOOKAHEAD * CHUNK > 256
        if pass_ == "fwd+bwd":
            assert 128 not in space["attn_bwd.BLOCK_M"]  # 128 * 128 > 8192
        rng = random.Random(0)
        for _ in range(300):
            params = {name: rng.choice(values) for name, values in space.items()}
            config = config_of(params)
            config.check(head_dim, backward=pass_ == "fwd+bwd")
            assert params_of(config, pass_) == params
    default = default_config(128)
    assert config_of(params_of(default, "fwd+bwd")).to_dict() == default.to_dict()


def _grid_sweep(tmp_path, chunk, block_n, trials, *flags):
    """Run `dfgen tune --sampler grid` over a fused solve space that fixes every knob but
    CHUNK and BLOCK_N; returns (its output, its one stage study)."""
    space = tmp_path / "space.yaml"
    space.write_text(f"strategy: fused\nsolve.CHUNK: {chunk}\nsolve.BLOCK_N: {block_n}\n"
                     "solve.LOOKAHEAD: 1\nsolve.SOLVE_PRECISION: tf32\n"
                     "solve.INV_FP16: false\nsolve.num_warps: 4\nsolve.num_stages: 2\nsolve.maxnreg: 0\n"
                     "solve.SPLIT_PREFIX: false\nsolve.POLL: acquire\n")
    journal = tmp_path / "sweep.journal"
    out = run("tune", "--sampler", "grid", "--space", str(space), "--trials",
              str(trials), *flags, "--storage", str(journal), "--out", str(tmp_path / "s.yaml"))
    storage = tuner.open_storage(str(journal))
    (summary,) = optuna.get_all_study_summaries(storage)
    assert ":solve_fwd(fused):" in summary.study_name and ":grid-space-" in summary.study_name
    return out, optuna.load_study(study_name=summary.study_name, storage=storage)


def test_grid_sweep_is_exhaustive(tmp_path):
    """An exhaustive sweep of a 2-point space: exactly the grid's points are evaluated,
    once each, whatever --trials asks for (--jobs is accepted; the interpreter compiles
    nothing ahead)."""
    out, study = _grid_sweep(tmp_path, [16, 32], 16, 1, "--jobs", "2")
    assert "solve_fwd(fused): every point of 2 (0 already in the study)" in out
    chunks = sorted(int(t.params["solve.CHUNK/BLOCK_N/LOOKAHEAD"].split("/")[0]) for t in study.trials)
    assert chunks == [16, 32] and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    entry = tuned_file.read(tmp_path / "s.yaml")["entries"]["fwd/bf16/d32/t40/bh2"]
    assert entry["trials"] == 2 and entry["median_ms"] > 0


def test_a_sweep_times_only_feasible_points(tmp_path):
    """A space of CHUNK 16 with BLOCK_N 16 or 64 holds one feasible point (a key block
    divides the chunk or is two chunks): the sweep times that one and nothing is spent on
    the other."""
    out, study = _grid_sweep(tmp_path, 16, [16, 64], 5)
    assert "every point of 1 (0 already in the study)" in out
    (trial,) = study.trials
    assert trial.params["solve.CHUNK/BLOCK_N/LOOKAHEAD"] == "16/16/1"
    assert trial.state == optuna.trial.TrialState.COMPLETE


def _stub_evaluate(monkeypatch):
    """Evaluation stubbed out (a fixed fast time): only what the tuner records matters."""
    monkeypatch.setattr(worker, "evaluate", lambda request, timeout_s, deadline=None:
                        {"ok": True, "median_ms": 1.0, "error": 0.0})


FUSED = {"strategy": "fused"}  # one stage study (the fused solve's) for a forward bucket


def test_a_torn_journal_tail_is_moved_aside_and_the_study_resumes(tmp_path, monkeypatch):
    """A crash mid-write leaves half a record at the journal's end; optuna 5.0 then fails
    with a raw JSONDecodeError on the resume. The tail goes to a file beside it."""
    _stub_evaluate(monkeypatch)
    journal = tmp_path / "s.journal"
    bucket, logs = tuner.CPU_BUCKETS[0], []
    tuner.tune_bucket(bucket, trials=2, sampler="random", seed=0, log=logs.append,
                      storage=tuner.open_storage(str(journal)), timeout_s=10, limits=FUSED)
    torn = b'{"op_code": 4, "worker_id": "ab'
    with open(journal, "ab") as handle:
        handle.write(torn)
    tuner.tune_bucket(bucket, trials=4, sampler="random", seed=0, log=logs.append,
                      storage=tuner.open_storage(str(journal), log=logs.append), timeout_s=10,
                      limits=FUSED)
    (aside,) = tmp_path.glob("s.journal.torn-*")
    assert aside.read_bytes() == torn
    assert any("torn record" in line and str(aside) in line for line in logs)
    storage = tuner.open_storage(str(journal))
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 4


def test_a_journal_bad_in_the_middle_is_a_clear_error(tmp_path):
    journal = tmp_path / "s.journal"
    journal.write_text('{"op_code": 0}\nnot json\n{"op_code": 0}\n')
    with pytest.raises(DfgenError, match="line 2 is not a journal record"):
        tuner.open_storage(str(journal))


def test_a_trial_left_running_by_a_killed_worker_is_failed_and_retried(tmp_path, monkeypatch):
    """A worker killed mid-trial (SIGKILL: no clean-up) leaves its trial RUNNING in the
    database; its heartbeat stops, and the next tune on the study fails it and retries it."""
    import signal
    import sys
    import time

    _stub_evaluate(monkeypatch)
    db = f"sqlite:///{tmp_path / 'hb.db'}"
    bucket = tuner.CPU_BUCKETS[0]
    name = stages.study_name(bucket.key, stages.slot("solve_fwd(fused)"), "random", FUSED, False)
    # The schema first, here: two processes creating it at once both insert alembic's
    # version row, and one fails (UNIQUE constraint; seen once in a CPU run)
    optuna.storages.RDBStorage(db)
    worker = subprocess.Popen([sys.executable, "-c", f"""
import time, optuna
storage = optuna.storages.RDBStorage({db!r}, heartbeat_interval=1, grace_period=2)
study = optuna.create_study(study_name={name!r}, storage=storage, load_if_exists=True)
study.optimize(lambda trial: time.sleep(600), n_trials=1)
"""])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                study = optuna.load_study(study_name=name, storage=db)
                if study.trials and study.trials[0].state == optuna.trial.TrialState.RUNNING:
                    break
            except KeyError:  # not created yet
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the worker did not start its trial")
        time.sleep(1.5)  # a heartbeat or two
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    time.sleep(2.5)  # past the grace period
    tuner.tune_bucket(bucket, trials=3, sampler="random", seed=0, log=lambda *a: None,
                      storage=tuner.open_storage(db, heartbeat_s=1, grace_s=2), timeout_s=10,
                      limits=FUSED)
    trials = optuna.load_study(study_name=name, storage=db).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE


def test_a_gpu_that_is_not_present_is_refused_naming_what_is():
    proc = dfgen("tune", "--gpu", "a100")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "--gpu a100" in err and "no CUDA GPU" in err and "cpu-interpreter" in err
    assert "wrote" not in out


@pytest.mark.parametrize("args, shapes, message", [
    (["--passes", "fwd,bwd"], None, "--passes 'fwd,bwd': expected a comma list of fwd, fwd+bwd and decode"),
    (["--passes", "fwd+bwd"], None, "keeps none of the 2 bucket(s) the interpreter tunes"),
    ([], "- {pass: fwd, dtype: bf16, head_dim: 48, T: 40, BH: 2}\n", "head_dim must be one of 16, 32, 64, 128"),
    ([], "- {pass: fwd, dtype: int8, head_dim: 32, T: 40, BH: 2}\n", "dtype must be one of bf16, fp16, fp32"),
    ([], "- {pass: fwd, dtype: bf16, head_dim: 32, T: 0, BH: 2}\n", "T must be an integer >= 1"),
    ([], "- {pass: fwd, dtype: bf16, head_dim: 32, T: 8, BH: 1, variant: x}\n", "variant must be qsolve"),
    ([], "- {pass: fwd, dtype: bf16\n", "not valid YAML"),
    ([], "pass: fwd\n", "expected a YAML list of buckets"),
    (["--passes", "fwd+bwd"], "- {pass: fwd, dtype: bf16, head_dim: 32, T: 8, BH: 1}\n",
     "keeps none of the 1 bucket(s) of --shapes"),
    (["--head-dims", "128"], None, "--head-dims 128 keeps none of the 1 bucket(s) (their head dims: 32)"),
    (["--head-dims", "d64"], None, "--head-dims 'd64': expected a comma list of head dims"),
    (["--total-minutes", "-1"], None, "--total-minutes must be >= 0, got -1"),
])
def test_bad_passes_and_shapes_are_one_line_errors(tmp_path, args, shapes, message):
    """Each bad --passes or --shapes: exit 2, one line naming the argument, nothing written."""
    if shapes is not None:
        (tmp_path / "shapes.yaml").write_text(shapes)
        args = args + ["--shapes", str(tmp_path / "shapes.yaml")]
    proc = dfgen("tune", *args, "--storage", str(tmp_path / "s.journal"),
                 env={"XDG_CONFIG_HOME": str(tmp_path / "config")})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert message in err and "wrote" not in out
    assert not (tmp_path / "config").exists()


def test_default_output_is_the_folder_the_runtime_searches(tmp_path):
    """Without --out the interpreter tune writes <user tuned folder>/cpu-interpreter.yaml,
    says the runtime reads it from there, and `dfgen show` then names that file."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    expected = tmp_path / "config" / "dfgen" / "tuned" / "cpu-interpreter.yaml"
    out = run("tune", "--trials", "2", "--storage", str(tmp_path / "s.journal"),
              "--space", fused_only(tmp_path), env=env)
    assert f"wrote {expected}" in out
    assert f"the runtime reads it from {expected.parent}" in out
    assert "fwd/bf16/d32/t40/bh2" in tuned_file.read(expected)["entries"]
    shown = run("show", env=env)
    assert f"tuned file: {expected} (exact GPU)" in shown


def test_minutes_is_a_hard_budget_and_cut_trials_are_counted(tmp_path):
    """--minutes 0.3 (18 s) with candidates of several seconds each: the bucket ends within
    its budget (its own clock, printed at its end) plus a kill's latency, any candidate
    running at the search's end is recorded as cut, and every trial line shows progress."""
    import re
    import time

    journal = tmp_path / "s.journal"
    started = time.monotonic()
    out = run("tune", "--trials", "30", "--minutes", "0.3", "--storage", str(journal),
              "--out", str(tmp_path / "t.yaml"))
    wall = time.monotonic() - started
    bucket_s = re.search(r"\[(\d+):(\d\d) in the bucket\]", out)
    assert bucket_s, out
    assert int(bucket_s[1]) * 60 + int(bucket_s[2]) <= 18 + 3, out
    assert wall < 18 + 30, out  # start-up (importing torch) aside
    assert "1 bucket x at most 30 trials per sampled stage" in out
    assert "at most 0.3 min each: at most 0.3 min" in out
    lines = [line for line in out.splitlines() if line.startswith("[bucket 1/1] fwd/bf16/d32/t40/bh2 ")]
    assert lines and all(re.search(r" trial \d+ .*\| \d+/30 trials \(\d+ failed, \d+ cut\) \| "
                                   r"best .* elapsed.* \| \d+\.\d trials/min$", line)
                         for line in lines), out
    trials = [t for study in stage_studies(str(journal)).values() for t in study.trials]
    assert len(trials) < 3 * 30  # the budget, not the trial count, ended the search
    cut = [t for t in trials if t.user_attrs.get("cut")]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in cut)
    row = next(line for line in out.splitlines() if line.startswith("| fwd/"))
    assert re.search(rf"\| {len(cut)} \| \d+\.\d \|$", row), out  # the cut and trials/min columns


def _fake_evaluations(monkeypatch, default, default_ok=True, entry_solve=None, entry_ms=None):
    """worker.evaluate replaced by a quick stand-in that records the requests: the default's
    knobs (and the default end to end) time 2 ms, every other candidate 1 ms (every
    challenger looks faster); with default_ok False the default is cut end to end. A tuned
    file's entry, known by its solve knobs `entry_solve`, takes `entry_ms` end to end
    (None: cut at the budget; "fail": fails the check)."""
    requests = []

    def fake(request, timeout_s, deadline=None):
        requests.append(request)
        if request["op"] == "pass":
            if entry_solve is not None and request["config"]["solve"] == entry_solve:
                if entry_ms is None:
                    return {"ok": False, "cut": True, "reason": "cut"}
                if entry_ms == "fail":
                    return {"ok": False, "reason": "wrong: relative error 1"}
                return {"ok": True, "median_ms": entry_ms, "error": 0.0, "seconds": 0.01}
            is_default = request["config"]["solve"] == dict(default.solve) and \
                request["config"]["strategy"] == default.strategy
            if is_default and not default_ok:
                return {"ok": False, "cut": True, "reason": "cut"}
        else:
            section = {"solve_fwd": "solve", "attn_fwd": "attn"}.get(request["slot"].split("(")[0],
                                                                    request["slot"])
            is_default = request["knobs"] == dict(getattr(default, section))
        return {"ok": True, "median_ms": 2.0 if is_default else 1.0, "error": 0.0, "seconds": 0.01}

    monkeypatch.setattr(worker, "evaluate", fake)
    return requests


def test_the_default_is_timed_first_then_each_stage_then_the_combinations(tmp_path, monkeypatch):
    """The default goes first, end to end (so that no budget leaves a challenger without it
    to beat); then each stage's trials, starting with the default's knobs; then the default
    and the stages' bests put together, one combination per strategy, twice each."""
    bucket = tuner.CPU_BUCKETS[0]
    default = default_config(bucket.head_dim, torch_dtype(bucket.dtype))
    requests = _fake_evaluations(monkeypatch, default)
    result = tuner.tune_bucket(bucket, trials=4, sampler="tpe", seed=0, timeout_s=60, sweep_max=0,
                               storage=tuner.open_storage(str(tmp_path / "order.journal")),
                               log=lambda *a: None, strategy_margin=None)  # both strategies
    assert requests[0]["op"] == "pass" and requests[0]["config"]["strategy"] == "fused"
    searched = [r for r in requests if r["op"] == "stage"]  # a point sampled twice is timed once
    assert [slot for slot, _ in itertools.groupby(r["slot"] for r in searched)] == \
        ["solve_fwd(fused)", "solve_fwd(two_stage)", "attn_fwd"]
    assert searched[0]["knobs"] == dict(default.solve)
    final = requests[1 + len(searched):]
    assert all(r["op"] == "pass" for r in final)
    assert [(r["config"]["strategy"], r["config"]["solve"] == dict(default.solve)) for r in final] \
        == [("fused", True), ("fused", False), ("two_stage", False)] * 2
    assert result.entry["default_ms"] == 2.0 and result.entry["median_ms"] == 1.0
    assert result.entry["trials"] == 12 and result.entry["config"]["strategy"] == "fused"
    assert set(result.studies) == {"solve_fwd(fused)", "solve_fwd(two_stage)", "attn_fwd"}


def test_no_challenger_wins_without_the_defaults_time(tmp_path, monkeypatch):
    """A default cut at the budget (not timed): a combination, however fast it looked, is
    not written, since nothing shows it beats the default."""
    bucket = tuner.CPU_BUCKETS[0]
    default = default_config(bucket.head_dim, torch_dtype(bucket.dtype))
    _fake_evaluations(monkeypatch, default, default_ok=False)
    with pytest.raises(DfgenError, match="default was not timed"):
        tuner.tune_bucket(bucket, trials=4, sampler="tpe", seed=0, timeout_s=60, sweep_max=0,
                          storage=tuner.open_storage(str(tmp_path / "nodefault.journal")),
                          log=lambda *a: None)


def _entry(default):
    """A tuned file's entry for the CPU bucket that is not the default (num_stages moved)."""
    solve = dict(default.solve, num_stages=2 if default.solve["num_stages"] != 2 else 3)
    return {"strategy": default.strategy, "solve": solve}, solve


@pytest.mark.parametrize("entry_ms, kept", [(0.5, True), (1.5, False), ("fail", False)])
def test_the_tuned_file_s_entry_is_the_one_to_beat(tmp_path, monkeypatch, entry_ms, kept):
    """The entry already in the tuned file is timed end to end beside the default and the
    combinations, and only a config measured faster replaces it (run 33: a six-minute
    re-tune of 15 buckets wrote the built-in default over tuned entries whose stage trials
    had not run); an entry that fails the check is replaced."""
    bucket = tuner.CPU_BUCKETS[0]
    default = default_config(bucket.head_dim, torch_dtype(bucket.dtype))
    entry, solve = _entry(default)
    _fake_evaluations(monkeypatch, default, entry_solve=solve, entry_ms=entry_ms)
    result = tuner.tune_bucket(bucket, trials=4, sampler="tpe", seed=0, timeout_s=60, sweep_max=0,
                               storage=tuner.open_storage(str(tmp_path / "kept.journal")),
                               log=lambda *a: None, strategy_margin=None, incumbent=entry)
    assert (result.entry["config"]["solve"] == solve) is kept
    assert result.entry["median_ms"] == (entry_ms if kept else 1.0)


def test_an_entry_not_timed_within_the_budget_stays(tmp_path, monkeypatch):
    bucket = tuner.CPU_BUCKETS[0]
    default = default_config(bucket.head_dim, torch_dtype(bucket.dtype))
    entry, solve = _entry(default)
    _fake_evaluations(monkeypatch, default, entry_solve=solve, entry_ms=None)
    with pytest.raises(DfgenError, match="entry was not timed"):
        tuner.tune_bucket(bucket, trials=4, sampler="tpe", seed=0, timeout_s=60, sweep_max=0,
                          storage=tuner.open_storage(str(tmp_path / "cut.journal")),
                          log=lambda *a: None, strategy_margin=None, incumbent=entry)
