"""Optuna search per shape bucket; every candidate checked against the reference in its own
process before its time counts; the best configs merged into tuned/<gpu>.yaml."""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import optuna

from ...version import __version__
from ...errors import ConfigError, DfgenError
from ...files import read_yaml
from ...kernels.config import KernelConfig, default_config
from ...kernels.spec import templates_hash
from ...select.bucket import Bucket
from ...select.gpu import gpu_key
from ...settings import torch_dtype
from .progress import BucketBudget, TuneProgress, clock_text
from .storage import open_storage  # noqa: F401 (dfgen.tools.tuning.tuner.open_storage)
from .space import bucket_limits, choices, config_of, grid, grid_size, params_of, suggest

GPU_BUCKETS = [Bucket(p, "bf16", d, t, bh)
               for p in ("fwd", "fwd+bwd") for d in (64, 128)
               for t, bh in ((1024, 32), (2048, 16), (4096, 16), (8192, 16), (16384, 8))] + [
    Bucket("fwd+bwd", "bf16", 128, 4096, 16, "qsolve")]
CPU_BUCKETS = [Bucket("fwd", "bf16", 32, 40, 2)]


optuna.logging.set_verbosity(optuna.logging.ERROR)  # progress (and each failure) is reported by _report


class CandidateFailed(DfgenError):
    """A candidate did not compile, crashed, timed out or gave a wrong answer."""


def device_provenance() -> dict:
    import torch
    import triton

    info = {"torch": str(torch.__version__), "triton": str(triton.__version__), "dfgen": __version__,
            "templates": templates_hash(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=gpu_key(props.name), device=str(props.name),
                    compute_capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count)
    else:
        info.update(gpu="cpu-interpreter", device="CPU (Triton interpreter; not GPU timings)",
                    compute_capability="none", sm_count=0)
    return info


@dataclass
class BucketResult:
    key: str
    entry: dict
    failures: int  # failed trials, cut ones not counted
    study: "optuna.Study | None" = None  # for plots and reports
    cut: int = 0  # trials stopped at the bucket's time limit


SAMPLERS = ("tpe", "random", "grid")


def make_sampler(name: str, seed: int, grid_space: dict | None = None, trials: int = 30):
    """tpe (default; with parallel jobs it counts running trials as bad, constant liar;
    its random start shrinks with small budgets so that some trials are guided), random,
    or grid: an exhaustive sweep of a (limited) space in random order."""
    if name == "tpe":
        with warnings.catch_warnings():  # multivariate/group/constant_liar are experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              constant_liar=True,
                                              n_startup_trials=max(3, min(10, trials // 3)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space, seed=seed)
    raise DfgenError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")


def study_name(key: str, sampler: str, limits: dict | None) -> str:
    """One study per bucket and template version; a limited space or a sweep is its own study."""
    name = f"dfgen:{key}:templates-{templates_hash()}"
    if limits or sampler == "grid":
        blob = json.dumps(limits or {}, sort_keys=True)
        name += f":{sampler}-space-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
    return name


def evaluate(request: dict, timeout_s: float, deadline: float | None = None) -> dict:
    """Run one candidate in a fresh process, for at most `timeout_s` seconds and not past
    `deadline` (time.monotonic()): a timeout or a crash is a failed result; a candidate
    stopped at the deadline is a cut one ({"ok": False, "cut": True})."""
    limit = timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())
    if limit <= 0:
        return {"ok": False, "cut": True, "reason": "cut: no time left in the bucket"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dfgen.tools.tuning.evaluate"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy(), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(json.dumps(request), timeout=limit)
    except subprocess.TimeoutExpired:
        try:  # the candidate and whatever it started (compilers)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        ran = time.monotonic() - started
        if limit < timeout_s:
            return {"ok": False, "cut": True, "reason": f"cut at the bucket's time limit after {ran:.0f} s"}
        return {"ok": False, "reason": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
        return {"ok": False, "reason": f"crashed (exit {proc.returncode}): {tail[0][:300]}"}
    return dict(json.loads(lines[-1]), seconds=time.monotonic() - started)


def tune_bucket(bucket: Bucket, *, trials: int, sampler: str, seed: int, storage,
                timeout_s: float, retime: int = 2, log=print, jobs: int = 1,
                minutes: float | None = None, limits: dict | None = None,
                starts: Sequence[Mapping] = (), cold_start: bool = False,
                progress: TuneProgress | None = None) -> BucketResult:
    """Search one bucket: `trials` in all (a resumed study counts what it has), at most
    `minutes` of search, `jobs` candidates evaluated at once (they compile in parallel and
    take turns on the GPU), over the templates' space or the part `limits` keeps. A new
    study's first trials are the shipped default, then `starts` (configs such as the one
    the tuned file holds for this bucket, so that a re-tune after a template change
    re-tries the earlier winner; sections they lack come from the default); cold_start
    skips them all (to measure what the sampler finds on its own; the default is still
    timed for the entry). `minutes` is a hard wall-clock budget: candidates still running
    at the search's end are killed and recorded as cut (user attr "cut"), and the re-timing
    of the best ones gets what the search left (BucketBudget). `progress` (a TuneProgress)
    numbers the bucket and estimates the tune's time left in the line after every trial. A float32 bucket searches only the solve precisions that keep
    float32 accuracy (config.FLOAT32_ACCURATE) unless `limits` names the knobs."""
    pass_, dtype, head_dim, variant = bucket.pass_, bucket.dtype, bucket.head_dim, bucket.variant
    key, backward = bucket.key, bucket.backward
    default = default_config(head_dim, torch_dtype(dtype),
                             strategy="two_stage" if variant == "qsolve" else "fused")
    limits = bucket_limits(dtype, limits)  # float32: float32-accurate precisions only
    space = choices(pass_, head_dim, variant, limits)
    grid_space = grid(pass_, head_dim, variant, limits) if sampler == "grid" else None
    name = study_name(key, sampler, limits) + (":cold-start" if cold_start else "")
    study = optuna.create_study(study_name=name,
                                storage=storage, load_if_exists=True, direction="minimize",
                                sampler=make_sampler(sampler, seed, grid_space, trials))
    if not study.trials and sampler != "grid" and not cold_start:
        for i, params in enumerate(_start_points(default, starts, pass_, head_dim, backward, key, log)):
            if all(value in space.get(param, [value]) for param, value in params.items()):
                study.enqueue_trial(params, skip_if_exists=True)
            else:
                log(f"{key}: {'the default' if i == 0 else 'a start config'} lies outside "
                    "the searched space; not tried first")
    request = dict(bucket.fields(), variant=variant)  # what a candidate's process is told
    budget = BucketBudget(minutes, jobs, retime_runs=2 * (1 + retime))
    if progress is None:
        progress = TuneProgress(1, trials, minutes)
    progress.start_bucket(budget)

    def objective(trial):
        config = suggest(trial, pass_, space)  # feasible by construction
        config.check(head_dim, backward=backward)
        for old in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if old.params == trial.params:  # a duplicate point is not timed twice
                trial.set_user_attr("duplicate_of", old.number)
                return old.value
        result = evaluate(dict(request, config=config.to_dict(), seed=seed + trial.number),
                          timeout_s, budget.search_deadline())
        if result.get("seconds") is not None:
            budget.durations.append(result["seconds"])
        if result.get("cut"):
            trial.set_user_attr("cut", True)
        if not result["ok"]:
            trial.set_user_attr("failure", result["reason"])
            raise CandidateFailed(result["reason"])
        trial.set_user_attr("error", result["error"])
        return result["median_ms"]

    done = len([t for t in study.trials if t.state.is_finished()])
    remaining = max(0, trials - done)
    if sampler == "grid":  # a sweep ends when its grid is exhausted
        remaining = max(0, min(remaining, grid_size(grid_space) - done))
    if remaining:
        log(f"{key}: {remaining} trials ({done} already in the study), {jobs} at a time"
            + (f", at most {minutes:g} min" if minutes else ""))
        report = _report(log, key, progress, done + remaining, budget)
        # the shipped default (the first enqueued trial) is timed alone, before candidates
        # compete for the CPU and the GPU lock: under a short --minutes it would otherwise
        # be cut, and no challenger may win without it (see _finish)
        default_params = params_of(default, pass_)
        alone = 1 if sampler != "grid" and not cold_start and not any(
            t.params == default_params and t.state.is_finished() for t in study.trials) else 0
        for n_trials, n_jobs in ((alone, 1), (remaining - alone, jobs)):
            search_left = budget.left(budget.search_deadline())
            if n_trials <= 0 or (search_left is not None and search_left <= 0):
                continue
            study.optimize(objective, n_trials=n_trials, catch=(CandidateFailed,),
                           n_jobs=n_jobs, timeout=None if search_left is None else search_left,
                           show_progress_bar=sys.stderr.isatty(), callbacks=[report])
    try:
        return _finish(study, key, request, default, pass_, seed, timeout_s, retime, log, jobs, budget)
    finally:
        progress.finish_bucket()


def _start_points(default, starts, pass_, head_dim, backward, key, log) -> list:
    """Trial parameters to try first: the shipped default, then each of `starts` that
    fits this bucket (sections it lacks taken from the default)."""
    points = [params_of(default, pass_)]
    for i, start in enumerate(starts):
        try:
            config = KernelConfig.from_dict(start, defaults=default).check(head_dim, backward)
            points.append(params_of(config, pass_))
        except (ConfigError, KeyError) as err:
            log(f"{key}: start config {i + 1} does not fit this bucket or the templates "
                f"({err}); not tried")
    return points


def _report(log, key, progress, total, budget):
    ran_here = []  # one item per trial this process finished in this bucket

    def callback(study, trial):
        ran_here.append(trial.number)
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished()]
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        cut = len([t for t in failed if t.user_attrs.get("cut")])
        timed = [t.value for t in _timed(study)]
        state = "cut" if trial.user_attrs.get("cut") else trial.state.name.lower()
        note = f"trial {trial.number} {state}" + (
            "" if trial.value is None else f" {trial.value:.4f} ms") + (
            f" ({trial.user_attrs['failure'][:100]})" if "failure" in trial.user_attrs and
            not trial.user_attrs.get("cut") else "")
        log(progress.line(key, note, len(finished), total, len(failed) - cut, cut,
                          min(timed) if timed else None, len(ran_here)))
        search_deadline = budget.search_deadline()
        if search_deadline is not None and time.monotonic() >= search_deadline:
            study.stop()  # in-flight candidates are cut at the same deadline
    return callback


def _timed(study) -> list:
    """Completed (hence timed and checked) trials."""
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _cut(study) -> int:
    return len([t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
                if t.user_attrs.get("cut")])


def _finish(study, key, request, default, pass_, seed, timeout_s, retime, log, jobs=1,
            budget: BucketBudget | None = None) -> BucketResult:
    """Re-time the top few and the default on fresh inputs (twice each, as long as the
    bucket's budget allows: what no longer fits is skipped, what runs past it is cut); the
    default stays unless a challenger beats it by more than the measured spread. If no
    re-timing fitted, the search's own times decide."""
    budget = budget or BucketBudget(None)
    complete = sorted((t for t in _timed(study) if "duplicate_of" not in t.user_attrs),
                      key=lambda t: t.value)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    cut = len([t for t in failed if t.user_attrs.get("cut")])
    failures = len(failed) - cut
    if not complete and budget.deadline is not None and cut:
        raise DfgenError(f"{key}: no candidate finished within the bucket's "
                         f"{budget.seconds / 60:g} min ({cut} cut); give it more --minutes")
    default_params = params_of(default, pass_)
    candidates = [default_params] + [t.params for t in complete[:retime] if t.params != default_params]
    configs = [config_of(params) for params in candidates]
    runs = [(i, rep) for i in range(len(configs)) for rep in range(2)]

    def retime_run(run):
        if not budget.fits(budget.deadline):
            return {"ok": False, "skipped": True, "reason": "no time left to re-time"}
        return evaluate(dict(request, config=configs[run[0]].to_dict(),
                             seed=seed + 10_000 + 2 * run[0] + run[1]),
                        timeout_s, budget.deadline)

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:  # the GPU lock serializes timing
        results = list(pool.map(retime_run, runs))
    not_run = len([r for r in results if r.get("skipped") or r.get("cut")])
    if not_run:
        log(f"{key}: {not_run} of {len(runs)} re-timing runs skipped or cut at the bucket's time limit")
    timings = []  # (config, best of its re-timed medians, their spread, is the default)
    for i, config in enumerate(configs):
        times = [r["median_ms"] for (j, _), r in zip(runs, results) if j == i and r["ok"]]
        if times:
            spread = abs(times[0] - times[1]) / min(times) if len(times) == 2 else 0.0
            timings.append((config, min(times), spread, i == 0))
    if not timings and complete and not_run:  # nothing re-timed in time: the search decides
        searched = {json.dumps(t.params, sort_keys=True): t.value for t in complete}
        timings = [(config_of(p), searched[json.dumps(p, sort_keys=True)], 0.0, i == 0)
                   for i, p in enumerate(candidates) if json.dumps(p, sort_keys=True) in searched]
        log(f"{key}: not re-timed (no time left); the search's times decide")
    if not timings:
        raise DfgenError(f"{key}: no candidate, not even the default, passed the re-check")
    if not timings[0][3]:  # a challenger is kept only when measured faster than the default
        raise DfgenError(f"{key}: the built-in default was not timed within the bucket's budget, "
                         "so no candidate can be shown to beat it; nothing written for this "
                         "bucket (give it more --minutes)")
    default_ms = timings[0][1]
    noise = max(spread for _, _, spread, _ in timings)
    best = timings[0]
    for challenger in timings[1:]:
        if challenger[1] < best[1] * (1.0 - noise):
            best = challenger
    entry = {**Bucket.from_fields(request, key).fields(), "config": best[0].to_dict(),
             "median_ms": round(best[1], 5),
             "default_ms": round(default_ms, 5),
             "trials": len(study.trials), "failures": failures}
    log(f"{key}: best {best[1]:.4f} ms (default {default_ms:.4f} ms, "
        f"noise {noise:.1%}) {best[0]} [{clock_text(budget.elapsed())} in the bucket]")
    return BucketResult(key, entry, failures, study, cut)


def _read_yaml(path, flag: str, what: str):
    try:
        return read_yaml(path)
    except ConfigError as err:
        raise DfgenError(f"{flag} {err}; expected {what}") from None


def load_space(path) -> dict:
    """A YAML mapping {parameter: value or list of values} that limits the search space."""
    data = _read_yaml(path, "--space", "a mapping {section.KNOB: [values]}")
    if not isinstance(data, dict):
        raise DfgenError(f"--space {path}: a space file is a YAML mapping {{section.KNOB: [values]}}")
    return data


BUCKETS_EXPECTED = ("a YAML list of buckets {pass: fwd|fwd+bwd, dtype: bf16|fp16|fp32, "
                    "head_dim: 16|32|64|128, T: >= 1, BH: >= 1, variant: qsolve (optional)}")


def load_buckets(path) -> list[Bucket]:
    """A YAML list of buckets in their YAML form {pass, dtype, head_dim, T, BH[, variant]}."""
    data = _read_yaml(path, "--shapes", BUCKETS_EXPECTED)
    if not isinstance(data, list) or not data:
        raise DfgenError(f"--shapes {path}: expected {BUCKETS_EXPECTED}")
    out = []
    for number, item in enumerate(data, start=1):
        where = f"--shapes {path}: bucket {number}"
        unknown = sorted(map(str, set(item) - {"pass", "dtype", "head_dim", "T", "BH", "variant"})) \
            if isinstance(item, dict) else []
        if unknown:
            raise DfgenError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            out.append(Bucket.from_fields(item, where))
        except ConfigError as err:
            raise DfgenError(str(err)) from None
    return out


def summary_table(results: list[BucketResult]) -> str:
    lines = ["| bucket | tuned ms | default ms | speedup | trials | failures | cut |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        e = r.entry
        default_ms = e.get("default_ms")
        speed = f"{default_ms / e['median_ms']:.2f}x" if default_ms else "n/a"
        lines.append(f"| {r.key} | {e['median_ms']:.4f} | "
                     f"{default_ms if default_ms is not None else 'n/a'} | {speed} | "
                     f"{e['trials']} | {r.failures} | {r.cut} |")
    return "\n".join(lines)
