"""dfgen tune without a GPU: the interpreter pipeline, resuming, shared studies, failures."""

import os
import subprocess

import optuna
import pytest
import torch

from dfgen.select import tuned_file
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.errors import DfgenError
from dfgen.tools.tuning import tuner
from dfgen.tools.tuning.space import params_of
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


def test_interpreter_tune_writes_and_resumes(tmp_path):
    out_file, db = tmp_path / "tuned.yaml", f"sqlite:///{tmp_path / 'study.db'}"
    out = run("tune", "--trials", "3", "--out", str(out_file), "--storage", db)
    assert "NOT GPU TIMINGS" in out
    entry = tuned_file.read(out_file)["entries"]["fwd/bf16/d32/t40/bh2"]
    assert entry["trials"] == 3 and entry["median_ms"] > 0 and entry["default_ms"] > 0
    # an interrupted or shorter tune resumes: asking for 5 runs only 2 more
    out = run("tune", "--trials", "5", "--out", str(out_file), "--storage", db,
              "--plot", str(tmp_path / "plots"))
    assert tuned_file.read(out_file)["entries"]["fwd/bf16/d32/t40/bh2"]["trials"] == 5
    png = tmp_path / "plots" / "fwd_bf16_d32_t40_bh2.png"
    assert f"search plotted in {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_share_one_study(tmp_path, kind):
    db = str(tmp_path / "shared.journal") if kind == "journal" else f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [dfgen("tune", "--trials", "4", "--seed", str(seed),
                   "--out", str(tmp_path / f"w{seed}.yaml"), "--storage", db) for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    storage = tuner.open_storage(db)
    studies = optuna.get_all_study_summaries(storage)
    assert len(studies) == 1
    study = optuna.load_study(study_name=studies[0].study_name, storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 4 <= len(finished) <= 8  # both workers added trials to the one study


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
    assert len(names) == 1
    study = optuna.load_study(study_name=names[0], storage=storage)
    assert 3 <= len([t for t in study.trials if t.state.is_finished()]) <= 6


def test_workers_flag_runs_processes_on_one_study(tmp_path):
    journal = tmp_path / "w.journal"
    out = run("tune", "--trials", "4", "--workers", "2", "--storage", str(journal),
              "--out", str(tmp_path / "w.yaml"))
    assert "2 workers finished with exit codes [0, 0]" in out
    storage = tuner.open_storage(str(journal))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert 4 <= len([t for t in study.trials if t.state.is_finished()]) <= 8
    assert "fwd/bf16/d32/t40/bh2" in tuned_file.read(tmp_path / "w.yaml")["entries"]


def test_failing_candidates_are_recorded_and_the_search_goes_on(tmp_path):
    """A timeout too short for any candidate: every trial fails with its reason, the
    search still runs all its trials, and no config is written."""
    db = f"sqlite:///{tmp_path / 'fail.db'}"
    with pytest.raises(DfgenError, match="no candidate"):
        tuner.tune_bucket(tuner.CPU_BUCKETS[0], trials=3, sampler="random", seed=0, storage=db,
                          timeout_s=0.05, log=lambda *a: None)
    study = optuna.load_study(study_name=optuna.get_all_study_summaries(db)[0].study_name,
                              storage=db)
    assert len(study.trials) == 3
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.FAIL
    assert any("timed out" in t.user_attrs.get("failure", "") for t in study.trials)


@pytest.mark.parametrize("cold_start", [False, True])
def test_default_and_earlier_entry_go_first_unless_cold_start(tmp_path, cold_start):
    """A new study tries the shipped default, then the start configs (the tuned file's
    entry for the bucket, --try configs) that fit: here an earlier winner, and a broken
    config that is skipped; a cold start lets the sampler pick every point (how a sweep
    comparison measures it), in a study of its own. Candidates fail fast here (tiny
    timeout): only the order matters."""
    db = f"sqlite:///{tmp_path / 'order.db'}"
    bucket = tuner.CPU_BUCKETS[0]
    default = default_config(bucket.head_dim, torch_dtype(bucket.dtype))
    earlier = dict(default.to_dict(), solve=dict(default.solve, CHUNK=16, BLOCK_N=16))
    logs = []
    with pytest.raises(DfgenError, match="no candidate"):
        tuner.tune_bucket(bucket, trials=3, sampler="tpe", seed=0, storage=db, timeout_s=0.05,
                          log=logs.append, starts=[earlier, {"solve": {"CHUNK": 7}}],
                          cold_start=cold_start)
    (summary,) = optuna.get_all_study_summaries(db)
    assert summary.study_name.endswith(":cold-start") == cold_start
    study = optuna.load_study(study_name=summary.study_name, storage=db)
    enqueued = [t.system_attrs.get("fixed_params") for t in study.trials]
    if cold_start:
        assert enqueued == [None] * 3
    else:
        assert enqueued == [params_of(default, bucket.pass_),
                            params_of(KernelConfig.from_dict(earlier), bucket.pass_), None]
        assert any("start config 2 does not fit" in line for line in logs)


def test_evaluate_reports_a_candidate_that_fails_to_compile():
    """Head dim 48 passes the knob constraints but Triton refuses the kernel (tl.arange
    needs a power of two): the evaluation process reports it instead of dying."""
    request = {"pass": "fwd", "dtype": "bf16", "head_dim": 48, "T": 8, "BH": 1, "seed": 0,
               "config": default_config(64).to_dict()}
    result = tuner.evaluate(request, timeout_s=300)
    assert result["ok"] is False and "power of 2" in result["reason"]


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
    from dfgen.tools.tuning.space import bucket_limits, choices, config_of

    assert bucket_limits("bf16") is None
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
    """What tune_bucket sends to be checked for a float32 bucket (evaluation stubbed: only
    the configs the search picks matter here)."""
    from dfgen.kernels.config import FLOAT32_ACCURATE

    seen = []

    def fake_evaluate(request, timeout_s, deadline=None):
        seen.append(request["config"])
        return {"ok": True, "median_ms": 1.0 + len(seen) % 5, "error": 0.0}

    monkeypatch.setattr(tuner, "evaluate", fake_evaluate)
    bucket = Bucket("fwd+bwd", "fp32", 32, 24, 1)
    tuner.tune_bucket(bucket, trials=12, sampler="random", seed=0,
                      storage=f"sqlite:///{tmp_path / 'f32.db'}", timeout_s=1, log=lambda *a: None)
    assert len(seen) >= 12
    for config in seen:
        for section in ("solve", "solve_bwd"):
            assert config[section]["SOLVE_PRECISION"] in FLOAT32_ACCURATE["SOLVE_PRECISION"]
            assert config[section]["INV_FP16"] is False


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
    from dfgen.tools.tuning.space import choices, grid

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
    with pytest.raises(DfgenError, match="one strategy"):
        grid("fwd", 32)
    # a backward limit is accepted (and unused) for a forward-only bucket
    assert not any(p.startswith("solve_bwd.") for p in choices("fwd", 32, limits={"solve_bwd.CHUNK": 32}))


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
    """Run `dfgen tune --sampler grid` over a solve space that fixes every knob but CHUNK
    and BLOCK_N; returns (its output, its one study)."""
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
    assert ":grid-space-" in summary.study_name
    return out, optuna.load_study(study_name=summary.study_name, storage=storage)


def test_grid_sweep_is_exhaustive_and_runs_jobs_in_parallel(tmp_path):
    """An exhaustive sweep of a 2-point space, two candidates at a time: exactly the grid's
    points are evaluated, once each, even when more trials are asked for."""
    out, study = _grid_sweep(tmp_path, [16, 32], 16, 10, "--jobs", "2")
    assert "2 trials (0 already in the study), 2 at a time" in out
    chunks = sorted(int(t.params["solve.CHUNK/BLOCK_N/LOOKAHEAD"].split("/")[0]) for t in study.trials)
    assert chunks == [16, 32] and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    entry = tuned_file.read(tmp_path / "s.yaml")["entries"]["fwd/bf16/d32/t40/bh2"]
    assert entry["trials"] == 2 and entry["median_ms"] > 0


def test_a_sweep_times_only_feasible_points(tmp_path):
    """A space of CHUNK 16 with BLOCK_N 16 or 64 holds one feasible point (a key block
    divides the chunk or is two chunks): the sweep times that one and nothing is spent on
    the other."""
    out, study = _grid_sweep(tmp_path, 16, [16, 64], 5)
    assert "1 trials (0 already in the study)" in out
    (trial,) = study.trials
    assert trial.params["solve.CHUNK/BLOCK_N/LOOKAHEAD"] == "16/16/1"
    assert trial.state == optuna.trial.TrialState.COMPLETE


def _stub_evaluate(monkeypatch):
    """Evaluation stubbed out (a fixed fast time): only what the tuner records matters."""
    monkeypatch.setattr(tuner, "evaluate", lambda request, timeout_s, deadline=None:
                        {"ok": True, "median_ms": 1.0, "error": 0.0})


def test_a_torn_journal_tail_is_moved_aside_and_the_study_resumes(tmp_path, monkeypatch):
    """A crash mid-write leaves half a record at the journal's end; optuna 5.0 then fails
    with a raw JSONDecodeError on the resume. The tail goes to a file beside it."""
    _stub_evaluate(monkeypatch)
    journal = tmp_path / "s.journal"
    bucket, logs = tuner.CPU_BUCKETS[0], []
    tuner.tune_bucket(bucket, trials=2, sampler="random", seed=0, log=logs.append,
                      storage=tuner.open_storage(str(journal)), timeout_s=10)
    torn = b'{"op_code": 4, "worker_id": "ab'
    with open(journal, "ab") as handle:
        handle.write(torn)
    tuner.tune_bucket(bucket, trials=4, sampler="random", seed=0, log=logs.append,
                      storage=tuner.open_storage(str(journal), log=logs.append), timeout_s=10)
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
    key = bucket.key
    name = tuner.study_name(key, "random", None)
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
                      storage=tuner.open_storage(db, heartbeat_s=1, grace_s=2), timeout_s=10)
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
    (["--passes", "fwd,bwd"], None, "--passes 'fwd,bwd': expected a comma list of fwd and fwd+bwd"),
    (["--passes", "fwd+bwd"], None, "keeps none of the 1 bucket"),
    ([], "- {pass: fwd, dtype: bf16, head_dim: 48, T: 40, BH: 2}\n", "head_dim must be one of 16, 32, 64, 128"),
    ([], "- {pass: fwd, dtype: int8, head_dim: 32, T: 40, BH: 2}\n", "dtype must be one of bf16, fp16, fp32"),
    ([], "- {pass: fwd, dtype: bf16, head_dim: 32, T: 0, BH: 2}\n", "T must be an integer >= 1"),
    ([], "- {pass: fwd, dtype: bf16, head_dim: 32, T: 8, BH: 1, variant: x}\n", "variant must be qsolve"),
    ([], "- {pass: fwd, dtype: bf16\n", "not valid YAML"),
    ([], "pass: fwd\n", "expected a YAML list of buckets"),
    (["--passes", "fwd+bwd"], "- {pass: fwd, dtype: bf16, head_dim: 32, T: 8, BH: 1}\n",
     "keeps none of the 1 bucket(s) of --shapes"),
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
    out = run("tune", "--trials", "2", "--storage", str(tmp_path / "s.journal"), env=env)
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
    assert "1 bucket x at most 30 trials, at most 0.3 min each: at most 0.3 min" in out
    lines = [line for line in out.splitlines() if line.startswith("[bucket 1/1] fwd/bf16/d32/t40/bh2 trial")]
    assert lines and all(re.search(r"\| \d+/30 trials \(\d+ failed, \d+ cut\) \| best .* elapsed", line)
                         for line in lines), out
    storage = tuner.open_storage(str(journal))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert len(study.trials) < 30  # the budget, not the trial count, ended the search
    cut = [t for t in study.trials if t.user_attrs.get("cut")]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in cut)
    row = next(line for line in out.splitlines() if line.startswith("| fwd/"))
    assert row.endswith(f"| {len(cut)} |"), out  # the summary's cut column


def _fake_evaluations(monkeypatch, default, pass_, slow_default=0.0, default_ok=True):
    """tuner.evaluate replaced by a quick stand-in that records how many run at once; the
    default is `slow_default` s long, the others 0.05 s, the default timed at 2 ms, the
    others at 1 ms (every challenger looks faster)."""
    import threading
    import time


    state = {"running": 0, "log": []}
    lock = threading.Lock()

    def fake(request, timeout_s, deadline=None):
        is_default = request["config"].get("solve") == default.to_dict()["solve"]
        with lock:
            state["running"] += 1
            state["log"].append(("start", is_default, state["running"]))
        time.sleep(slow_default if is_default else 0.05)
        with lock:
            state["running"] -= 1
            state["log"].append(("end", is_default, state["running"]))
        if is_default and not default_ok:
            return {"ok": False, "cut": True, "reason": "cut"}
        return {"ok": True, "median_ms": 2.0 if is_default else 1.0, "error": 0.0, "seconds": 0.05}

    monkeypatch.setattr(tuner, "evaluate", fake)
    return state


def test_the_default_is_timed_first_and_alone(tmp_path, monkeypatch):
    """Under a short budget the default would be cut while candidates compete: it runs
    first, by itself, then the search runs its jobs in parallel."""
    bucket = tuner.CPU_BUCKETS[0]
    default = default_config(bucket.head_dim, torch_dtype(bucket.dtype))
    state = _fake_evaluations(monkeypatch, default, bucket.pass_, slow_default=0.3)
    result = tuner.tune_bucket(bucket, trials=6, sampler="tpe", seed=0, timeout_s=60, jobs=3,
                               storage=f"sqlite:///{tmp_path / 'alone.db'}", log=lambda *a: None)
    assert state["log"][:2] == [("start", True, 1), ("end", True, 0)], state["log"][:4]  # alone
    assert max(running for _, _, running in state["log"]) > 1  # then in parallel
    assert result.entry["default_ms"] == 2.0 and result.entry["median_ms"] == 1.0


def test_no_challenger_wins_without_the_defaults_time(tmp_path, monkeypatch):
    """A default cut at the budget (not timed): a challenger, however fast it looked, is
    not written, since nothing shows it beats the default."""
    bucket = tuner.CPU_BUCKETS[0]
    default = default_config(bucket.head_dim, torch_dtype(bucket.dtype))
    _fake_evaluations(monkeypatch, default, bucket.pass_, default_ok=False)
    with pytest.raises(DfgenError, match="default was not timed"):
        tuner.tune_bucket(bucket, trials=4, sampler="tpe", seed=0, timeout_s=60, jobs=2,
                          storage=f"sqlite:///{tmp_path / 'nodefault.db'}", log=lambda *a: None)
