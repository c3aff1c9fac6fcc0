"""A tune's clock: each bucket's wall-clock budget (search, then the final end-to-end
timing) and the progress line printed after every trial (bucket i of N, the stage's
trials and best, time left, trials per minute)."""

from __future__ import annotations

import statistics
import time


def clock_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class BucketBudget:
    """`minutes` of wall time for one bucket (None: no cap). The search stops early enough
    to leave the final end-to-end timing (`retime_runs` evaluations, one at a time) a
    reserve: as long as that many end-to-end evaluations took so far (a third of the
    budget before any finished), plus a worker's start-up (`restart_s`, in case the one
    running is killed at the search's end), between 15 % and half of the budget."""

    def __init__(self, minutes: float | None, retime_runs: int = 6, clock=time.monotonic):
        self.clock = clock
        self.start = clock()
        self.seconds = minutes * 60 if minutes else None
        self.deadline = self.start + self.seconds if self.seconds else None
        self.rounds = max(1, retime_runs)
        self.durations: list[float] = []  # wall seconds of end-to-end evaluations that ran to the end
        self.restart_s = 0.0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self, deadline: float | None) -> float | None:
        return None if deadline is None else deadline - self.clock()

    def typical(self) -> float | None:
        """A finished evaluation's typical wall time (None before one finished)."""
        return statistics.median(self.durations) if self.durations else None

    def search_deadline(self) -> float | None:
        if self.deadline is None:
            return None
        typical = self.typical()
        reserve = self.seconds / 3 if typical is None else \
            1.25 * (self.rounds * typical + self.restart_s)
        return self.deadline - min(max(reserve, 0.15 * self.seconds), 0.5 * self.seconds)

    def fits(self, deadline: float | None) -> bool:
        """Whether an evaluation started now is expected to end before `deadline`."""
        left = self.left(deadline)
        return left is None or left > max(1.0, 0.8 * (self.typical() or 0.0))


class TuneProgress:
    """Where a tune of `buckets` buckets stands; `line()` is the text after every trial."""

    def __init__(self, buckets: int, trials: int, minutes: float | None,
                 total_minutes: float | None = None, clock=time.monotonic, converge: bool = False):
        self.buckets, self.trials, self.minutes, self.clock = buckets, trials, minutes, clock
        self.total_minutes, self.converge = total_minutes, converge
        self.start = clock()
        self.finished: list[float] = []  # wall seconds of each finished bucket
        self.index = 0

    def budget_text(self, timeout_s: float, sweep_max: int | None = None) -> str:
        head = (f"{self.buckets} bucket{'s' if self.buckets != 1 else ''} x "
                + (f"{self.trials} trials per sampled stage, then refinement until no neighbour "
                   f"of the best is untried (at most {2 * self.trials})" if self.converge else
                   f"at most {self.trials} trials per sampled stage"))
        if sweep_max:
            head += f" (a stage of at most {sweep_max} points: every point)"
        if self.minutes:
            whole = self.buckets * self.minutes
            if self.total_minutes and self.total_minutes < whole:
                return (f"{head}, at most {self.minutes:g} min each and {self.total_minutes:g} min "
                        f"in all (--total-minutes: about {self.total_minutes / self.buckets * 60:.0f} s "
                        "a bucket, more where earlier ones finish early)")
            return f"{head}, at most {self.minutes:g} min each: at most {whole:g} min"
        if self.total_minutes:
            return (f"{head}, {self.total_minutes:g} min in all (--total-minutes), shared among "
                    "the buckets left")
        return (f"{head}, no time cap per bucket (--minutes sets one); a candidate may take "
                f"up to {timeout_s:g} s")

    def start_bucket(self, budget: BucketBudget) -> None:
        self.index, self.budget = self.index + 1, budget

    def finish_bucket(self) -> None:
        self.finished.append(self.budget.elapsed())

    def line(self, key: str, note: str, done: int, total: int, failed: int, cut: int,
             best: float | None, ran_here: int, left: int | None = None) -> str:
        """One progress line: `note` (the stage and trial), the stage's `done` of `total`
        trials (`failed`, `cut`) and its `best`; `ran_here`: candidates this process
        evaluated in this bucket (its pace: trials per minute), `left`: trials still to
        run in the bucket, all its stages (default: the stage's)."""
        elapsed = self.budget.elapsed()
        left = max(0, total - done) if left is None else left
        bucket_left = None
        if ran_here:  # the search's pace, then the final timing
            bucket_left = elapsed / ran_here * left \
                + self.budget.rounds * (self.budget.typical() or 0.0)
        cap_left = self.budget.left(self.budget.deadline)
        if cap_left is not None:
            bucket_left = max(0.0, cap_left if bucket_left is None else min(bucket_left, cap_left))
        text = (f"[bucket {self.index}/{self.buckets}] {key} {note} | {done}/{total} trials "
                f"({failed} failed, {cut} cut) | best "
                + ("none yet" if best is None else f"{best:.4f} ms")
                + f" | {clock_text(elapsed)} elapsed")
        if bucket_left is not None:
            text += f", ~{clock_text(bucket_left)} left in bucket"
            later = self.buckets - self.index
            if later and self.finished:
                text += f", ~{clock_text(bucket_left + later * statistics.mean(self.finished))} in all"
            elif later:
                per_bucket = elapsed + bucket_left
                if self.minutes:
                    per_bucket = min(per_bucket, self.minutes * 60)
                text += f", ~{clock_text(bucket_left + later * per_bucket)} in all"
        return text + f" | {rate_text(ran_here, elapsed)}"


def rate_text(trials: int, seconds: float) -> str:
    """'12.5 trials/min': candidates evaluated per minute of wall time."""
    return f"{trials / max(seconds, 1e-9) * 60:.1f} trials/min"
