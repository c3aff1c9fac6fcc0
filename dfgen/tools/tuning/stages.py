"""Search per stage: each stage of a bucket is searched on its own kernel time, in an
Optuna study of its own in the tune's storage (one per stage and bucket, so that
optuna-dashboard lists them):

    dfgen:{bucket key}:{slot}:templates-{hash}[:{sampler}-space-{hash}][:cold-start]

A slot is a stage in its place (evaluate.SLOTS): the forward's solve_fwd under the fused
strategy (it writes o) or the two-stage one (it writes u, then attn_fwd runs); in a
training pass the same solve_fwd also writing a, then the backward's solve_bwd and
attn_bwd. A pass's time is the sum of its kernels' times and each kernel's best knobs do
not depend on the others' (the forward saves the same u, a and lse whatever its config),
so the stages are searched apart and their bests combined.

A training pass's forward is searched locally (`local`): from the forward the pass keeps
(the forward bucket's pick) and the default, one knob at a time, to a local optimum. The
fastest inference forward is not always the fastest training one (H200, d64 T 1024: the
forward bucket's pick, maxnreg 128 and bf16, made the training pass slower than the
default's forward, and another forward, LOOKAHEAD 1 with relaxed polls, 4 % faster), and
the forward bucket's own search has already explored the space around its pick.

A stage whose feasible space has at most `sweep_max` points (or every stage, with
--sampler grid) is swept: every point once, in a seeded random order after the start
points, resumably (points already timed or failed are not run again; ones cut at a time
limit are). A larger one is sampled (TPE or random) for `trials` trials. Every candidate
is checked against the same stage under the default knobs before its time counts
(evaluate.py), in the long-lived worker (worker.py); with compile-ahead processes
(compile_ahead.py) the next candidates are asked for early and compiled meanwhile.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import optuna

from ...errors import DfgenError
from ...kernels.config import SECTION_OF_STAGE, KernelConfig
from ...kernels.spec import DECODE, STAGES, templates_hash
from . import worker
from .storage import ask_trial, end_heartbeat
from .evaluate import DECODE_SLOT, SLOTS, TRAINING_SLOTS
from .space import bucket_limits, grid_size, stage_choices, stage_knobs, stage_limits, stage_params, stage_points, strategies

SWEEP_MAX = 128  # a stage of at most this many feasible points is swept whole (GPU default)
# The last third of a sampled stage's trials refine its best point: one knob changed at a
# time. Replayed on the H200 sweeps of run 15 (bench/run.py sweep, 30 seeds, a quarter of
# each stage's points), TPE alone picked within 3 % end to end in 22 and 26 of 30 seeds
# (head dims 128 and 64), TPE then refinement in 29 and 28.
LOCAL_FRACTION = 1 / 3
# Trials of a local search at most: a one-knob neighbourhood of the forward's solve has 33
# to 36 points in the templates' space (19 to 22 in bench's h200-bf16), so 40 see the
# start points' whole neighbourhood.
LOCAL_MAX = 40
SAMPLERS = ("tpe", "random", "grid")
DONE = (optuna.trial.TrialState.COMPLETE,)


@dataclass(frozen=True)
class Slot:
    name: str  # "solve_fwd(fused)", "solve_fwd(two_stage)", "attn_fwd", "solve_bwd", "attn_bwd"
    stage: str  # the template stage
    strategy: str | None  # the forward strategy it belongs to; None: the backward's

    @property
    def section(self) -> str:
        """The config section that holds its knobs (decode: a decode entry's `decode`)."""
        return SECTION_OF_STAGE.get(self.stage, self.stage)


def slot(name: str) -> Slot:
    return Slot(name, *SLOTS[name])


def bucket_slots(bucket, limits: dict | None, forward_strategy: str = "fused") -> list[Slot]:
    """The stages a bucket searches: a forward bucket those of each strategy it may use
    (the variant's and the limits' choice); a forward+backward bucket its forward's solve
    as a training pass runs it (`forward_strategy`: the strategy of the forward it keeps),
    then the backward's two; a decode bucket its one step."""
    if bucket.decode:
        return [slot(DECODE_SLOT)]
    if bucket.backward:
        return [slot(TRAINING_SLOTS[forward_strategy]), slot("solve_bwd"), slot("attn_bwd")]
    training = set(TRAINING_SLOTS.values())
    out = []
    for strategy in strategies(bucket.variant, limits):
        out += [slot(n) for n, (_, s) in SLOTS.items() if s == strategy and n not in training]
    return out


def is_local(slot: Slot) -> bool:
    """Whether a slot is searched locally (a training pass's forward: the module docstring)."""
    return slot.name in TRAINING_SLOTS.values()


def stage_trials(trials, size: int) -> int:
    """A sampled stage's number of trials: `trials` (an int), or a share of the stage's
    points ("25%": a quarter of them, at least one)."""
    if isinstance(trials, str) and trials.endswith("%"):
        return max(1, int(float(trials[:-1]) / 100 * size))
    return int(trials)


def tpe_startup(trials: int) -> int:
    """TPE's random start for a budget of `trials` guided ones: small budgets keep most
    trials guided."""
    return max(3, min(10, trials // 3))


def make_sampler(name: str, seed: int, trials: int = 30):
    """tpe (default; it counts trials asked for ahead and still running as bad, constant
    liar; its random start shrinks with small budgets so that some trials are guided) or
    random. A swept stage needs none (its points are queued), but gets a random one for a
    trial another process left it nothing to take."""
    if name == "tpe":
        with warnings.catch_warnings():  # multivariate/group/constant_liar are experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              constant_liar=True,
                                              n_startup_trials=tpe_startup(trials))
    if name in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    raise DfgenError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")


def study_name(key: str, slot: Slot, sampler: str, limits: dict | None, cold_start: bool,
               implied: dict | None = None) -> str:
    """One study per bucket, stage and template version; a limited space (limits of the
    stage's own section beyond those its dtype `implied`: space.bucket_limits) or a sweep
    is its own study, and so is a cold start."""
    stages = (DECODE,) if slot.stage == DECODE else STAGES  # the templates it runs (and shared parts)
    name = f"dfgen:{key}:{slot.name}:templates-{templates_hash(stages)}"
    implied = implied or {}
    own = {param: values for param, values in stage_limits(slot.stage, limits).items()
           if implied.get(param) != values}
    if own or sampler == "grid":
        blob = json.dumps(own, sort_keys=True)
        name += f":{sampler}-space-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
    return name + (":cold-start" if cold_start else "")


def stage_studies(storage) -> list[tuple[str, str, optuna.Study]]:
    """(bucket key, slot name, study) of every stage study in a tune's storage (study_name's
    form; other studies are skipped)."""
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        parts = summary.study_name.split(":")
        if len(parts) >= 4 and parts[0] == "dfgen" and parts[2] in SLOTS:
            out.append((parts[1], parts[2],
                        optuna.load_study(study_name=summary.study_name, storage=storage)))
    return out


def _point(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def _taken(trials) -> set:
    """The points of a swept study that need no (other) run: timed, failed for a reason
    of their own, queued or running (a point cut at a time limit is run again)."""
    State = optuna.trial.TrialState
    out = set()
    for t in trials:
        if t.state in (State.COMPLETE, State.RUNNING) or (
                t.state == State.FAIL and not t.user_attrs.get("cut")):
            out.add(_point(t.params or t.system_attrs.get("fixed_params", {})))
        elif t.state == State.WAITING:
            out.add(_point(t.system_attrs.get("fixed_params", {})))
    return out


class StageSearch:
    """One stage's study in one bucket. Made, it knows how many trials it has left
    (`remaining`); `run()` then evaluates them until they are done or its time is up.

    A swept stage queues its points one at a time, just before asking for a trial (so
    that the study holds no long queue that every read of it would reread), skipping the
    points the study already has: processes sharing the study split the sweep between
    them. A point left running by a killed process is not run again in a journal study
    (no heartbeat tells it from a live one); a database study fails and retries it.

    A local search (a training pass's forward: is_local) starts from `anchors` (taken
    even in a cold start: the forward the pass keeps, this tune's own pick) and the start
    points, then only tries untried one-knob neighbours of the best point so far, and ends
    when it has none (a local optimum) or after its trials (at most LOCAL_MAX; LOCAL_MAX
    with `converge`). It is not swept under --sampler grid unless its space is within
    `sweep_max` points."""

    def __init__(self, slot: Slot, bucket, *, storage, sampler: str, seed: int, trials: int,
                 sweep_max: int, limits: dict | None, cold_start: bool, converge: bool = False,
                 firsts: Sequence[KernelConfig], request: dict, timeout_s: float, log=print,
                 anchors: Sequence[KernelConfig] = ()):
        self.slot, self.key, self.timeout_s, self.log = slot, bucket.key, timeout_s, log
        self.request = dict(request, op="stage", slot=slot.name)
        self.space = stage_choices(slot.stage, bucket.head_dim, limits)
        self.size = grid_size(self.space)
        self.exhaustive = self.size <= sweep_max or (sampler == "grid" and not is_local(slot))
        self.local = is_local(slot) and not self.exhaustive
        trials = stage_trials(trials, self.size)
        if self.local:  # converging: to a local optimum, at most LOCAL_MAX trials
            trials = LOCAL_MAX if converge else min(trials, LOCAL_MAX)
        # the trials from this one on refine the best point (sampled stages; not "random";
        # a local search: all); `converge` (a tune without --trials): past `trials`,
        # refinement goes on (at most `trials` more) while the best point has a one-knob
        # neighbour no trial has, so that the stage ends at a local optimum
        self.refine_from = 0 if self.local else \
            trials - int(trials * LOCAL_FRACTION) if sampler == "tpe" else None
        self.extend_max = trials if converge and self.refine_from is not None \
            and not self.exhaustive and not self.local else 0
        self.extended = 0
        # past TPE's random start, candidates are asked for one ahead only (below: _depth)
        self.guided_from = 0 if self.local else tpe_startup(self.refine_from) \
            if sampler == "tpe" and not self.exhaustive else None
        self.rng = random.Random(f"{seed}:{slot.name}:refine")
        self.study = optuna.create_study(
            study_name=study_name(bucket.key, slot, sampler, limits, cold_start,
                                  bucket_limits(bucket.dtype)), storage=storage,
            load_if_exists=True, direction="minimize", sampler=make_sampler(sampler, seed, self.refine_from or trials))
        self.ran = 0  # candidates this process evaluated to the end (trials per minute)
        self.evaluated = 0  # trials this process finished (duplicates and cut ones too)
        firsts = self._first_points([("the kept forward", c) for c in anchors] + (
            [] if cold_start else [("the default" if i == 0 else "a start config", c)
                                   for i, c in enumerate(firsts)]))
        trials_now = self.study.get_trials(deepcopy=False)
        if self.exhaustive:  # the start points first, then the rest in a seeded random order
            points = stage_points(self.space)
            random.Random(f"{seed}:{slot.name}").shuffle(points)
            self.points = list({_point(p): p for p in firsts + points}.items())  # (key, params)
            self.cursor = 0  # the points before it were taken when last looked at
            taken = _taken(trials_now)
            self.remaining = len([key for key, _ in self.points if key not in taken])
        else:  # a new study's first trials are the start points
            if not trials_now:
                for params in firsts:
                    self.study.enqueue_trial(params, skip_if_exists=True)
            self.remaining = max(0, trials - len([t for t in trials_now if t.state.is_finished()]))
        # what the progress line counts to: the study's finished trials and those to come
        self.finished_before = len([t for t in trials_now if t.state.is_finished()])
        self.total = self.finished_before + self.remaining

    def _fits(self, params: dict) -> bool:
        return all(value in self.space.get(name, [value]) for name, value in params.items())

    def _first_points(self, firsts: Sequence[tuple[str, KernelConfig]]) -> list[dict]:
        """The points of this stage of the start configs ((what it is, config)) that lie in
        its space, in order; one outside it is named once."""
        out = []
        for what, config in firsts:
            params = stage_params(self.slot.stage, getattr(config, self.slot.section))
            if self._fits(params):
                out.append(params)
            else:
                self.log(f"{self.key} {self.slot.name}: {what} lies outside the searched space; "
                         "not tried first")
        return out

    def _queue_next_point(self, asked: set) -> bool:
        """A swept stage: queue the next point no trial has (False: none is left)."""
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == optuna.trial.TrialState.WAITING for t in trials):
            return True  # one queued already (here or by another process): ask() takes it
        taken = _taken(trials) | asked
        while self.cursor < len(self.points) and self.points[self.cursor][0] in taken:
            self.cursor += 1
        if self.cursor == len(self.points):
            return False
        self.study.enqueue_trial(self.points[self.cursor][1])
        return True

    def _untried_neighbours(self, trials, asked: set) -> list[dict]:
        """The points one knob away from the best one so far that no trial has, in a
        seeded random order (none: no trial was timed, or the best is a local optimum)."""
        timed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not timed:
            return []
        best = min(timed, key=lambda t: t.value).params
        taken = _taken(trials) | asked
        near = [dict(best, **{name: value}) for name, values in self.space.items()
                for value in values if value != best.get(name)]
        self.rng.shuffle(near)
        return [params for params in near if _point(params) not in taken]

    def _queue_neighbour(self, asked: set) -> bool:
        """A sampled stage past `refine_from` finished trials: queue a point one knob away
        from the best one so far that no trial has (none left: the sampler picks). Whether
        a point is queued now (this process's or another's)."""
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == optuna.trial.TrialState.WAITING for t in trials):
            return True
        if len([t for t in trials if t.state.is_finished()]) < self.refine_from:
            return False
        near = self._untried_neighbours(trials, asked)
        if near:
            self.study.enqueue_trial(near[0])
        return bool(near)

    def _local_step(self, asked: set, in_flight: bool) -> str:
        """A local search's next candidate: "queued" (a start point or an untried
        neighbour of the best is queued), "wait" (none now, but results are still to come
        that may move the best), "sample" (nothing timed yet: the sampler picks), "done"
        (a local optimum: every neighbour of the best has been tried)."""
        if self._queue_neighbour(asked):  # (refine_from is 0: from the first trial on)
            return "queued"
        if in_flight:
            return "wait"
        timed = any(t.state == optuna.trial.TrialState.COMPLETE
                    for t in self.study.get_trials(deepcopy=False))
        return "done" if timed else "sample"

    def _extend(self, asked: set) -> bool:
        """Past its trials, one more refinement trial (queued here) while the best point
        has an untried neighbour, at most `extend_max` in all: a stage left where one knob
        may still improve it has not converged (H200, cold start, forward d64 T 1024: 30
        trials ended on the default, converging found 1.17x; replays of the run-15 sweeps
        at 25 %: 27 and 29 of 30 seeds within 3 %, converging 30 and 30)."""
        if self.extended >= self.extend_max or not self._queue_neighbour(asked):
            return False
        self.extended += 1
        self.remaining += 1
        self.total += 1
        return True

    def _depth(self, lookahead: int, asked: int) -> int:
        """How many candidates may be asked for at once (the one being timed included): a
        sweep's order is fixed and a random start learns nothing, so every compile-ahead
        process gets one; past TPE's random start each result steers the next candidate,
        and candidates asked ahead are picked without the results still to come (replays of
        the H200 sweeps of run 15, 30 seeds: within 3 % end to end in 30 and 27 of 30 with
        one asked ahead, 21 and 20 with eight), so one is compiled ahead."""
        if self.guided_from is None or self.finished_before + asked < self.guided_from:
            return 1 + lookahead
        return 1 + min(1, lookahead)

    def stage_request(self, params: dict) -> dict:
        return dict(self.request, knobs=stage_knobs(self.slot.stage, params))

    def run(self, soft_deadline: float | None, hard_deadline: float | None, ahead=None,
            on_trial: Callable = lambda search, trial: None) -> None:
        """Evaluate the remaining trials one at a time in the worker; no new one starts
        after `soft_deadline` (the stage's share of the bucket's time), and one running at
        `hard_deadline` (the bucket's search's end) is cut. With `ahead` (CompileAhead),
        its number of jobs are asked for early and compiled while one is timed."""
        lookahead = ahead.jobs if ahead is not None else 0
        queue: collections.deque = collections.deque()  # (trial, params, heartbeat) asked for
        asked, asked_points = 0, set()
        try:
            while soft_deadline is None or time.monotonic() < soft_deadline:
                while len(queue) < self._depth(lookahead, asked) and (
                        asked < self.remaining or self._extend(asked_points)):
                    if self.exhaustive and not self._queue_next_point(asked_points):
                        self.remaining = asked  # other processes took the rest
                        break
                    if self.local:
                        step = self._local_step(asked_points, bool(queue))
                        if step == "done":
                            self.total -= self.remaining - asked
                            self.remaining = asked
                        if step in ("wait", "done"):
                            break
                    elif not self.exhaustive and self.refine_from is not None:
                        self._queue_neighbour(asked_points)
                    trial, beat = ask_trial(self.study)
                    params = {name: trial.suggest_categorical(name, values)
                              for name, values in self.space.items()}
                    queue.append((trial, params, beat))
                    asked, _ = asked + 1, asked_points.add(_point(params))
                    if ahead is not None and len(queue) > 1:
                        ahead.submit(self.stage_request(params))
                if not queue:
                    break
                trial, params, beat = queue.popleft()
                try:
                    result = self._evaluate(params, hard_deadline)
                finally:
                    end_heartbeat(beat)
                finished = self._tell(trial, result)
                on_trial(self, finished)
                if finished.user_attrs.get("cut"):
                    break
        finally:  # asked for ahead, never timed: recorded as cut (a resume retries them)
            for trial, _, beat in queue:
                end_heartbeat(beat)
                trial.set_user_attr("cut", True)
                trial.set_user_attr("failure", "asked for ahead; the stage's time ran out first")
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if ahead is not None:
                ahead.forget()

    def _evaluate(self, params: dict, hard_deadline: float | None) -> dict:
        """The worker's reply for one candidate ({"duplicate_of": n} for a point the study
        already timed: it is not timed twice)."""
        self.evaluated += 1
        for old in self.study.get_trials(deepcopy=False, states=DONE):
            if old.params == params:
                return {"ok": True, "duplicate_of": old.number, "median_ms": old.value}
        result = worker.evaluate(self.stage_request(params), self.timeout_s, hard_deadline)
        if not result.get("cut"):
            self.ran += 1
        return result

    def _tell(self, trial, result: dict):
        """Record a reply in the study; returns the finished trial (a FrozenTrial)."""
        if "duplicate_of" in result:
            trial.set_user_attr("duplicate_of", result["duplicate_of"])
            return self.study.tell(trial, result["median_ms"])
        if result.get("cut"):
            trial.set_user_attr("cut", True)
        if not result["ok"]:
            trial.set_user_attr("failure", result["reason"])
            return self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trial.set_user_attr("error", result["error"])
        if result.get("first_s") is not None:  # the first call, compiling included
            trial.set_user_attr("first_s", round(result["first_s"], 3))
        return self.study.tell(trial, result["median_ms"])

    def best(self, trials=None) -> tuple[dict, float] | None:
        """(knobs, median ms) of the fastest checked trial (of `trials`, default: the
        study's); None if none passed."""
        trials = self.study.get_trials(deepcopy=False) if trials is None else trials
        timed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                 and "duplicate_of" not in t.user_attrs]
        if not timed:
            return None
        top = min(timed, key=lambda t: t.value)
        return stage_knobs(self.slot.stage, top.params), top.value

    def counts(self, trials=None) -> tuple[int, int, int, int]:
        """(trials in the study, finished ones, failed ones, cut ones) of `trials`
        (default: the study's)."""
        trials = self.study.get_trials(deepcopy=False) if trials is None else trials
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        cut = len([t for t in failed if t.user_attrs.get("cut")])
        return len(trials), len([t for t in trials if t.state.is_finished()]), len(failed) - cut, cut
