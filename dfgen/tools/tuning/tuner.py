"""A bucket's tune: the default timed end to end first; each stage searched on its own
kernel time (stages.py), in the long-lived worker (worker.py); the stages' bests combined,
checked against the reference and timed end to end against the default; the winner
merged into tuned/<gpu>.yaml by the CLI."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
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
from . import worker
from .progress import BucketBudget, TuneProgress, clock_text, rate_text
from .storage import open_storage  # noqa: F401 (dfgen.tools.tuning.tuner.open_storage)
from .space import bucket_limits, check_limits
from .stages import SAMPLERS, SWEEP_MAX, StageSearch, bucket_slots, is_local

# The shipped bucket set (what `dfgen tune` tunes on a GPU without --shapes, and what
# tuned/<gpu>.yaml holds): forward and forward+backward, head dims 64 and 128, T 512 to
# 16384 at the benchmark shapes' B*H, and the short-T many-heads shapes (32, 512, 8, d)
# and (64, 256, 8, d). Forward buckets come first: a forward+backward bucket keeps the
# forward bucket's choice for its shape.
SHIPPED_SHAPES = {  # head dim: [(T, BH)]
    64: [(256, 512), (512, 256), (1024, 256), (2048, 64), (4096, 16), (8192, 32), (16384, 8)],
    128: [(256, 512), (512, 256), (1024, 256), (2048, 64), (4096, 16), (8192, 16), (16384, 8)],
}
# Decode buckets (last: they depend on no other): the two shapes the decode defaults were
# measured at (run 37: batch 8 x 16 heads over 8192 cached tokens, 1 x 16 over 32768). Two
# buckets of 31 leave each bucket of a plain tune 20 min / 31 = 39 s (29 buckets: 41 s).
DECODE_SHAPES = [(8192, 128), (32768, 16)]  # head dim 128: [(T, BH)]
GPU_BUCKETS = [Bucket(p, "bf16", d, t, bh)
               for p in ("fwd", "fwd+bwd") for d in (64, 128) for t, bh in SHIPPED_SHAPES[d]] + [
    Bucket("fwd+bwd", "bf16", 128, 4096, 16, "qsolve")] + [
    Bucket("decode", "bf16", 128, t, bh) for t, bh in DECODE_SHAPES]
CPU_BUCKETS = [Bucket("fwd", "bf16", 32, 40, 2)]
# The interpreter's decode bucket: tuned with --passes decode, not by a plain `dfgen tune`
# there (whose one bucket takes about 15 s; this one about 10 s more, and CI runs it).
CPU_DECODE_BUCKETS = [Bucket("decode", "bf16", 32, 64, 2)]
STRATEGY_MARGIN = 1.25  # a strategy whose default is slower than the fastest's by more is not searched


optuna.logging.set_verbosity(optuna.logging.ERROR)  # progress (and each failure) is reported per trial


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
    failures: int  # failed trials of the stage studies, cut ones not counted
    studies: dict = field(default_factory=dict)  # slot name -> its Optuna study (plots, reports)
    bests: list = field(default_factory=list)  # the stages' bests combined (KernelConfigs)
    cut: int = 0  # trials stopped at the bucket's time limit
    ran: int = 0  # stage trials this process evaluated (trials per minute)
    seconds: float = 0.0  # the bucket's wall time

    def rate(self) -> str:
        return rate_text(self.ran, self.seconds)


def tune_bucket(bucket: Bucket, *, trials: int, sampler: str, seed: int, storage,
                timeout_s: float, log=print, minutes: float | None = None,
                limits: dict | None = None, starts: Sequence[Mapping] = (),
                cold_start: bool = False, progress: TuneProgress | None = None,
                forward: Mapping | None = None, sweep_max: int = SWEEP_MAX,
                ahead=None, strategy_margin: float | None = STRATEGY_MARGIN,
                converge: bool = False, incumbent: Mapping | None = None) -> BucketResult:
    """Tune one bucket. The built-in default is timed end to end first (checked against
    the reference), so that no budget leaves a challenger without it to beat. Then each
    stage is searched on its own kernel time in a study of its own (stages.py): a forward
    bucket the stages of each strategy it may use; a forward+backward bucket its forward's
    solve as training runs it (also writing a), searched locally from `forward` (the
    forward bucket's choice for this shape; default: the built-in default) and the
    default, then solve_bwd and attn_bwd on inputs from a real forward under `forward`.
    A stage of at most `sweep_max` points
    (every stage with sampler "grid") is swept whole, a larger one sampled for `trials`
    trials (a resumed study counts what it has); a new study's first trials are the
    default's knobs, then the tuned file's entry for the bucket (`incumbent`), then
    `starts`' (such as --try configs; sections any of them lacks come from the default),
    unless `cold_start`; `converge`:
    a sampled stage refines past `trials` until its best is a local optimum (at most
    `trials` more). Then the
    stages' bests are combined (one combination per strategy), and the default and each
    combination timed end to end twice more, interleaved, and up to twice more again where
    those runs spread by more than 2 %: the default stays unless a combination beats it by
    more than the noise of these runs (final_noise; the default's first time stands in
    only where none of its final runs fitted the budget). `incumbent`, the entry the tuned
    file already holds for the bucket, joins that final timing and is the one to beat
    (then the default, then the combinations): a short or cut tune never replaces a tuned
    entry with a config not measured faster than it, and where the entry was not timed
    within the budget (cut; not where it fails), nothing is written for the bucket.

    `minutes` is a hard wall-clock budget: the search, shared among the stages by their
    trials left, ends early enough to leave the final timing its reserve (BucketBudget),
    and a candidate still running at its end is killed and recorded as cut. `ahead` (a
    CompileAhead, GPU only) compiles the next candidates while one is timed. `progress`
    numbers the bucket and prints a line after every trial. A float32 bucket searches
    only the solve precisions that keep float32 accuracy unless `limits` names the knobs.
    A forward bucket searches the stages of the strategies whose default, timed end to
    end, is within `strategy_margin` of the fastest strategy's default (None: every
    strategy, as in the interpreter, whose timings rank nothing)."""
    if sampler not in SAMPLERS:
        raise DfgenError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if bucket.decode:
        raise DfgenError(f"{bucket.key}: a decode bucket is tuned by "
                         "decode_tune.tune_decode_bucket (its one stage, its own config)")
    default = bucket_default(bucket)
    limits = bucket_limits(bucket.dtype, limits)  # float32: float32-accurate precisions only
    check_limits(limits)
    fixed = _forward_of(bucket, forward, default, log) if bucket.backward else None
    slots = bucket_slots(bucket, limits, fixed.strategy if fixed is not None else "fused")
    # the tuned file's entry: the first start point, and the one to beat end to end
    kept = _start_configs(default, [incumbent] if incumbent is not None else [], bucket, log)
    starts = kept + _start_configs(default, starts, bucket, log)
    kept = _pass_sections(kept[0], bucket.backward) if kept else None
    if kept is not None and kept.json == _pass_sections(default, bucket.backward).json:
        kept = None  # the default itself: timed as the default
    combos = len({s.strategy for s in slots}) if not bucket.backward else \
        1 + (fixed.json != _pass_sections(default, backward=False).json)  # the two forwards
    combos += kept is not None  # timed beside them
    budget = BucketBudget(minutes, retime_runs=_final_runs(combos))
    progress = progress or TuneProgress(1, trials, minutes)
    progress.start_bucket(budget)
    tune = _BucketTune(bucket, _pass_sections(default, bucket.backward), fixed, seed, timeout_s,
                       budget, progress, log, kept)
    try:
        tune.time_default()
        if not bucket.backward and combos > 1 and strategy_margin is not None:
            slots = tune.promising_strategies(slots, strategy_margin)
            budget.rounds = _final_runs(len({s.strategy for s in slots}))
        searches = [StageSearch(slot, bucket, storage=storage, sampler=sampler, seed=seed,
                                trials=trials, sweep_max=sweep_max, limits=limits,
                                cold_start=cold_start, converge=converge,
                                request=tune.stage_request,
                                firsts=_firsts(slot, bucket, starts),
                                anchors=[fixed] if is_local(slot) else [],
                                timeout_s=timeout_s, log=log)
                    for slot in slots]
        tune.search(searches, ahead)
        return tune.finish(searches)
    finally:
        progress.finish_bucket()


def _final_runs(combos: int) -> int:
    """End-to-end runs of the final timing: the default and each combination, twice (the
    rounds past two, where they disagree, take what time is left)."""
    return 2 * (1 + combos)


# The final timing: two interleaved rounds, and up to EXTRA_ROUNDS more where their runs
# spread by more than QUIET. One disturbed run can hide a real gain (H200, d64 T 1024,
# forward+backward, run 20: a config's two runs 43.7 % apart, and the default's first and
# final times 1.23 and 1.10 ms, so the combination, 14 % faster elsewhere, was not kept);
# disturbance only slows, so with three runs or more a config's noise is the gap between
# its two fastest.
EXTRA_ROUNDS = 2
QUIET = 0.02


def final_noise(runs: Sequence[Sequence[float]]) -> float:
    """The relative noise of the final timing: over the configs, the largest gap between
    a config's fastest run and its next (with two runs: its slowest)."""
    gaps = [sorted(t)[1] / min(t) - 1.0 for t in runs if len(t) >= 2]
    return max(gaps, default=0.0)


def bucket_default(bucket: Bucket) -> KernelConfig:
    """The built-in default of a bucket (the q_solve variant runs only the two-stage strategy)."""
    return default_config(bucket.head_dim, torch_dtype(bucket.dtype),
                          strategy="two_stage" if bucket.variant == "qsolve" else "fused")


def _forward_of(bucket: Bucket, forward: Mapping | None, default: KernelConfig, log) -> KernelConfig:
    """The forward a forward+backward bucket keeps: `forward` (the forward bucket's config
    for this shape) where it fits, else the default's."""
    if forward is not None:
        try:
            config = KernelConfig.from_dict(forward, defaults=default).check(bucket.head_dim)
            if bucket.variant != "qsolve" or config.strategy == "two_stage":
                return _pass_sections(config, backward=False)
            log(f"{bucket.key}: the forward's config is not two-stage; the q_solve pass "
                "keeps the default forward")
        except (ConfigError, KeyError) as err:
            log(f"{bucket.key}: the forward's config does not fit ({err}); keeping the default forward")
    return _pass_sections(default, backward=False)


def _start_configs(default: KernelConfig, starts, bucket: Bucket, log) -> list[KernelConfig]:
    """Each of `starts` that fits this bucket (sections it lacks taken from the default)."""
    out = []
    for i, start in enumerate(starts):
        try:
            out.append(KernelConfig.from_dict(start, defaults=default)
                       .check(bucket.head_dim, bucket.backward))
        except (ConfigError, KeyError) as err:
            log(f"{bucket.key}: start config {i + 1} does not fit this bucket or the templates "
                f"({err}); not tried")
    return out


def _firsts(slot, bucket: Bucket, starts: list[KernelConfig]) -> list[KernelConfig]:
    """The configs whose knobs a stage tries first: the default of its strategy, then the
    start configs of that strategy (a backward stage: all of them)."""
    default = default_config(bucket.head_dim, torch_dtype(bucket.dtype), slot.strategy or "fused")
    return [default] + [c for c in starts if slot.strategy in (None, c.strategy)]


def _pass_sections(config: KernelConfig, backward: bool) -> KernelConfig:
    """`config` with only the sections its pass runs (a forward entry holds no backward)."""
    return KernelConfig(strategy=config.strategy, solve=config.solve,
                        attn=config.attn if config.strategy == "two_stage" else {},
                        solve_bwd=config.solve_bwd if backward else {},
                        attn_bwd=config.attn_bwd if backward else {})


def describe(config: KernelConfig) -> str:
    """The config in one line, backward sections included."""
    text = str(config)
    for section in ("solve_bwd", "attn_bwd"):
        knobs = getattr(config, section, None)  # (a decode config has none)
        if knobs:
            text += f" {section}(" + " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) + ")"
    return text


class _BucketTune:
    """One bucket's end-to-end timings and stage searches (tune_bucket's steps)."""

    def __init__(self, bucket, default, fixed, seed, timeout_s, budget, progress, log, kept=None):
        self.bucket, self.key, self.seed, self.timeout_s = bucket, bucket.key, seed, timeout_s
        self.kept = kept  # the tuned file's entry (None: none, or the default's knobs)
        self.budget, self.progress, self.log = budget, progress, log
        self.default = default  # the sections its pass runs
        self.fixed = fixed  # a forward+backward bucket's forward
        self.base = dict(bucket.fields(), variant=bucket.variant)
        self.stage_request = dict(self.base, seed=seed,
                                  forward=fixed.to_dict() if fixed is not None else None)
        self.times: dict[str, list] = {}  # config (JSON) -> its final end-to-end medians
        self.first_default: float | None = None  # the default's time before the search
        self.failed: set[str] = set()  # configs (JSON) that failed end to end (not cut)
        self.cut_runs = 0  # end-to-end runs cut at the budget or left out for lack of time

    def time_pass(self, config: KernelConfig, seed: int, deadline) -> dict:
        """Check `config` against the reference and time it end to end (fresh inputs)."""
        result = worker.evaluate(dict(self.base, op="pass", config=config.to_dict(), seed=seed),
                                 self.timeout_s, deadline)
        if result.get("seconds") is not None and result["ok"]:
            self.budget.durations.append(result["seconds"])
        return result

    def time_default(self) -> None:
        result = self.time_pass(self.default, self.seed + 10_000, self.budget.deadline)
        self.budget.restart_s = worker.startup_seconds()
        self.cut_runs += bool(result.get("cut"))
        if result["ok"]:
            self.first_default = result["median_ms"]
            self.log(f"{self.key}: the default, end to end: {result['median_ms']:.4f} ms")
        else:
            self.log(f"{self.key}: the default failed end to end ({result['reason']}); "
                     "it is timed again at the end")

    def promising_strategies(self, slots: list, margin: float) -> list:
        """The slots of the strategies worth searching: the strategy is a choice above the
        stages, made on the strategies' defaults timed end to end. One whose default is
        slower than the fastest default by more than `margin` is not searched: its
        stages would have to gain more than that over their defaults (H200, d128 T 4096:
        two-stage 0.61 ms against fused 0.376, from the stage studies of run 11)."""
        times = {self.default.strategy: self.first_default}
        for strategy in dict.fromkeys(s.strategy for s in slots):
            if strategy in times:
                continue
            config = _pass_sections(default_config(self.bucket.head_dim, torch_dtype(self.bucket.dtype),
                                                   strategy), backward=False)
            result = self.time_pass(config, self.seed + 10_000, self.budget.deadline)
            times[strategy] = result["median_ms"] if result["ok"] else None
        timed = [t for t in times.values() if t is not None]
        if not timed:
            return slots
        fastest = min(timed)
        kept = {s for s, t in times.items() if t is None or t <= fastest * margin}
        dropped = sorted(set(times) - kept)
        if dropped:
            self.log(f"{self.key}: the defaults end to end: " + ", ".join(
                f"{s} {'failed' if t is None else f'{t:.4f} ms'}" for s, t in times.items())
                + f"; not searching {', '.join(dropped)} (more than {margin - 1:.0%} "
                "slower than the fastest; --space strategy: names one to search it anyway)")
        return [s for s in slots if s.strategy in kept]

    def search(self, searches: list, ahead) -> None:
        for search in searches:
            done = search.total - search.remaining
            how = (f"every point of {search.size} ({done} already in the study)" if search.exhaustive
                   else f"{search.remaining} trials of {search.size} points ({done} already in the study)")
            self.log(f"{self.key} {search.slot.name}: {how}")
        self.searched = searches
        for i, search in enumerate(searches):
            search_deadline = self.budget.search_deadline()
            if search_deadline is not None and self.budget.left(search_deadline) <= 0:
                break
            if not search.remaining:
                continue
            soft = hard = None
            if search_deadline is not None:  # the stage's share: its trials of those left
                later = sum(s.remaining for s in searches[i:])
                share = self.budget.left(search_deadline) * search.remaining / later
                soft = self.budget.clock() + share
                # a trial may run past its stage's share by one share at most: one slow
                # candidate (H200: a 40 s solve_bwd compile) must not take the later stages'
                # time (attn_bwd ran no trial at all)
                hard = min(search_deadline, soft + share)
            search.run(soft, hard, ahead, self.on_trial)

    def on_trial(self, search, trial) -> None:
        trials = search.study.get_trials(deepcopy=False)
        _, done, failed, cut = search.counts(trials)
        state = "cut" if trial.user_attrs.get("cut") else trial.state.name.lower()
        note = f"{search.slot.name} trial {trial.number} {state}" + (
            "" if trial.value is None else f" {trial.value:.4f} ms") + (
            f" ({trial.user_attrs['failure'][:100]})" if "failure" in trial.user_attrs and
            not trial.user_attrs.get("cut") else "")
        best = search.best(trials)
        left = sum(max(0, s.remaining - s.evaluated) for s in self.searched)
        self.log(self.progress.line(self.key, note, done, max(search.total, done), failed, cut,
                                    best[1] if best else None,
                                    sum(s.ran for s in self.searched), left))

    def combinations(self, searches: list) -> list[KernelConfig]:
        """The stages' bests put together: one config per strategy searched (a stage with
        no checked trial keeps the default's knobs); the default itself left out. A
        forward+backward bucket's backward bests go with the best training forward its
        local search found, or where it found none, with the forward it keeps and (where
        that differs) the default's forward: the forward bucket's pick is the fastest
        inference forward, and a training forward (which saves more) may spill under it
        (H200, d64 T1024: a pick with maxnreg 128 made the pass slower than the default's,
        so the backward's 10 % were lost; run 18)."""
        bests = {s.slot.name: s.best() for s in searches}
        for search in searches:
            best = bests[search.slot.name]
            self.log(f"{self.key} {search.slot.name}: " + (
                ("no candidate passed" if search.evaluated else
                 "no trial ran in its share of the time: the default's knobs stay")
                if best is None else
                f"best {best[1]:.4f} ms " + " ".join(f"{k}={v}" for k, v in sorted(best[0].items()))))
        out = []
        if self.bucket.backward:
            sections = {s.slot.section: (bests[s.slot.name] or (None,))[0] for s in searches}
            forwards = (self.fixed, self.default)
            if sections.get("solve"):  # the training forward's search (its strategy: the kept one's)
                forwards = (KernelConfig(strategy=self.fixed.strategy, solve=sections["solve"],
                                         attn=self.fixed.attn),)
            for forward in forwards:
                out.append(KernelConfig(
                    strategy=forward.strategy, solve=forward.solve, attn=forward.attn,
                    solve_bwd=sections.get("solve_bwd") or self.default.solve_bwd,
                    attn_bwd=sections.get("attn_bwd") or self.default.attn_bwd))
        else:
            for strategy in dict.fromkeys(s.slot.strategy for s in searches):
                base = default_config(self.bucket.head_dim, torch_dtype(self.bucket.dtype), strategy)
                sections = {s.slot.section: (bests[s.slot.name] or (None,))[0]
                            for s in searches if s.slot.strategy == strategy}
                out.append(_pass_sections(KernelConfig(
                    strategy=strategy, solve=sections.get("solve") or base.solve,
                    attn=sections.get("attn") or base.attn), backward=False))
        unique = {c.json: c for c in out if c.json != self.default.json}
        return list(unique.values())

    def finish(self, searches: list) -> BucketResult:
        counts = [s.counts() for s in searches]
        failures, cut = sum(c[2] for c in counts), sum(c[3] for c in counts)
        combos = self.combinations(searches)
        configs = [self.default] + ([self.kept] if self.kept is not None else []) + \
            [c for c in combos if self.kept is None or c.json != self.kept.json]
        for rep in range(2 + EXTRA_ROUNDS):  # interleaved: d, c1, c2, d, c1, c2 (drift spreads over all)
            if rep >= 2 and (len(configs) < 2 or final_noise(
                    [self.times.get(c.json, []) for c in configs]) <= QUIET):
                break  # a third round and later only where the first two disagree
            for i, config in enumerate(configs):
                if not self.budget.fits(self.budget.deadline):
                    self.log(f"{self.key}: no time left to time {describe(config)} end to end")
                    self.cut_runs += 1
                    continue
                result = self.time_pass(config, self.seed + 10_001 + 2 * i + rep, self.budget.deadline)
                self.cut_runs += bool(result.get("cut"))
                if result["ok"]:
                    self.times.setdefault(config.json, []).append(result["median_ms"])
                elif not result.get("cut"):
                    self.failed.add(config.json)
                    self.log(f"{self.key}: {describe(config)} failed end to end: {result['reason']}")
        for i, config in enumerate(configs):
            if self.times.get(config.json):
                name = "the default" if i == 0 else "the tuned file's entry" \
                    if self.kept is not None and config.json == self.kept.json else f"combination {i}"
                self.log(f"{self.key}: {name} end to end: "
                         + ", ".join(f"{t:.4f}" for t in self.times[config.json]) + " ms")
        if not self.times.get(self.default.json) and self.first_default is not None:
            self.times[self.default.json] = [self.first_default]  # no final time: the first one
        timings = [(c, self.times[c.json]) for c in configs if self.times.get(c.json)]
        default_times = self.times.get(self.default.json)
        if not timings:
            if self.budget.deadline is not None and (cut or self.cut_runs):
                raise DfgenError(f"{self.key}: no candidate finished within the bucket's "
                                 f"{self.budget.seconds / 60:g} min ({cut + self.cut_runs} cut); "
                                 "nothing written for this bucket (give it more --minutes)")
            raise DfgenError(f"{self.key}: no candidate, not even the default, passed the check")
        if not default_times:  # a combination is kept only when measured faster than the default
            raise DfgenError(f"{self.key}: the built-in default was not timed within the bucket's "
                             "budget, so no candidate can be shown to beat it; nothing written "
                             "for this bucket (give it more --minutes)")
        kept = self.kept
        if kept is not None and not self.times.get(kept.json) and kept.json not in self.failed:
            raise DfgenError(f"{self.key}: the tuned file's entry was not timed within the "
                             "bucket's budget, so no candidate can be shown to beat it; the entry "
                             "stays as it is (give it more --minutes)")
        noise = final_noise([t for _, t in timings])
        # the one to beat: the file's entry where it was timed, else the default; a
        # challenger replaces it only when faster by more than the noise
        order = sorted(timings, key=lambda ct: kept is None or ct[0].json != kept.json)
        best, best_ms = order[0][0], min(order[0][1])
        for config, times in order[1:]:
            if min(times) < best_ms * (1.0 - noise):
                best, best_ms = config, min(times)
        entry = {**self.bucket.fields(), "config": best.to_dict(), "median_ms": round(best_ms, 5),
                 "default_ms": round(min(default_times), 5),
                 "trials": sum(c[0] for c in counts), "failures": failures}
        ran = sum(s.ran for s in searches)
        elapsed = self.budget.elapsed()
        self.log(f"{self.key}: best {best_ms:.4f} ms (default {min(default_times):.4f} ms, "
                 f"noise {noise:.1%}) {describe(best)}; {rate_text(ran, elapsed)} "
                 f"[{clock_text(elapsed)} in the bucket]")
        return BucketResult(self.key, entry, failures, {s.slot.name: s.study for s in searches},
                            combos, cut, ran, elapsed)


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


BUCKETS_EXPECTED = ("a YAML list of buckets {pass: fwd|fwd+bwd|decode, dtype: bf16|fp16|fp32, "
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
    lines = ["| bucket | tuned ms | default ms | speedup | trials | failures | cut | trials/min |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        e = r.entry
        default_ms = e.get("default_ms")
        speed = f"{default_ms / e['median_ms']:.2f}x" if default_ms else "n/a"
        lines.append(f"| {r.key} | {e['median_ms']:.4f} | "
                     f"{default_ms if default_ms is not None else 'n/a'} | {speed} | "
                     f"{e['trials']} | {r.failures} | {r.cut} | {r.rate().split()[0]} |")
    return "\n".join(lines)
