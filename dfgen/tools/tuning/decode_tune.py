"""A decode bucket's tune: the decoding step's knobs (templates/decode.py.jinja's header,
the one slot "decode") searched like a stage, then the best re-timed against the default.

The steps are a forward bucket's (tuner.tune_bucket) with one stage: the default timed end
to end first; one Optuna study in the tune's storage (stages.StageSearch: swept when the
feasible space has at most `sweep_max` points, else TPE with refinement; a rerun resumes
it), each candidate checked and timed in the long-lived worker (evaluate.DecodeBench:
decoding steps at a small cache against the naive reference, then the bucket's step
against the default knobs' step, then timed); then the default, the tuned file's entry
and the best timed end to end, interleaved, and the best written only when faster by more
than the noise. The entry records the decode template's hash as its provenance
(tuned_with.templates), which it goes stale against."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ...errors import ConfigError
from ...kernels.decode import decode_knobs, default_decode_knobs, describe_decode_knobs
from ...select.bucket import Bucket
from ...select.tuned_file import decode_section, templates_of
from ...settings import torch_dtype
from .evaluate import DECODE_SLOT
from .progress import BucketBudget, TuneProgress
from .space import check_limits
from .stages import SWEEP_MAX, StageSearch, slot
from .tuner import BucketResult, _BucketTune, _final_runs


@dataclass(frozen=True)
class DecodeConfig:
    """A decoding step's knobs, every one set, in the form the bucket tune handles configs:
    `json` names it, `to_dict()` is a decode entry's config, `decode` its section."""
    decode: dict = field(default_factory=dict)

    @property
    def json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict:
        return {"decode": dict(self.decode)}

    def __str__(self) -> str:
        return describe_decode_knobs(self.decode)


def tune_decode_bucket(bucket: Bucket, *, trials, sampler: str, seed: int, storage,
                       timeout_s: float, log=print, minutes: float | None = None,
                       limits: dict | None = None, starts: Sequence[Mapping] = (),
                       cold_start: bool = False, progress: TuneProgress | None = None,
                       sweep_max: int = SWEEP_MAX, ahead=None, converge: bool = False,
                       incumbent: Mapping | None = None) -> BucketResult:
    """Tune one decode bucket (tuner.tune_bucket's arguments, less the forward's).
    `starts`: configs whose `decode` section is tried first after the default and the
    tuned file's entry (`incumbent`); others (forward configs from --try) are skipped."""
    dtype = torch_dtype(bucket.dtype)
    default = DecodeConfig(default_decode_knobs(bucket.head_dim, dtype))
    check_limits(limits)
    kept = _decode_starts([incumbent] if incumbent is not None else [], bucket, log)
    firsts = [default] + kept + _decode_starts(starts, bucket, log)
    kept = kept[0] if kept and kept[0].json != default.json else None
    budget = BucketBudget(minutes, retime_runs=_final_runs(1 + (kept is not None)))
    progress = progress or TuneProgress(1, trials, minutes)
    progress.start_bucket(budget)

    tune = DecodeTune(bucket, default, None, seed, timeout_s, budget, progress, log, kept)
    try:
        tune.time_default()
        search = StageSearch(slot(DECODE_SLOT), bucket, storage=storage, sampler=sampler,
                             seed=seed, trials=trials, sweep_max=sweep_max, limits=limits,
                             cold_start=cold_start, converge=converge,
                             request=tune.stage_request, firsts=firsts, timeout_s=timeout_s,
                             log=log)
        tune.search([search], ahead)
        result = tune.finish([search])
    finally:
        progress.finish_bucket()
    result.entry["tuned_with"] = {"templates": templates_of("decode")}
    return result


class DecodeTune(_BucketTune):
    """A decode bucket's end-to-end timings around its one search (_BucketTune's steps)."""

    def combinations(self, searches: list) -> list[DecodeConfig]:
        """The search's best knobs, where they are not the default's."""
        (search,) = searches
        best = search.best()
        self.log(f"{self.key} {DECODE_SLOT}: " + (
            ("no candidate passed" if search.evaluated else
             "no trial ran in its share of the time: the default's knobs stay")
            if best is None else f"best {best[1]:.4f} ms {DecodeConfig(best[0])}"))
        if best is None:
            return []
        config = DecodeConfig(dict(self.default.decode, **best[0]))
        return [] if config.json == self.default.json else [config]


def _decode_starts(starts: Sequence[Mapping], bucket: Bucket, log) -> list[DecodeConfig]:
    """The decode configs among `starts` that the template takes at this bucket (knobs
    left out: the default's); forward configs (no `decode` section) are not for it."""
    dtype = torch_dtype(bucket.dtype)
    out = []
    for i, start in enumerate(starts):
        if not isinstance(start, Mapping) or "decode" not in start:
            continue
        try:
            out.append(DecodeConfig(decode_knobs(decode_section(start), bucket.head_dim, dtype)))
        except ConfigError as err:
            log(f"{bucket.key}: start config {i + 1} does not fit this bucket or the decode "
                f"template ({err}); not tried")
    return out
