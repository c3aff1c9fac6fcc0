"""Opening an Optuna storage for the tuner: a journal file (one host) or a database URL.

A tune that dies mid-trial must not leave its study unusable:
- a database storage records a heartbeat for every running trial; a trial whose process
  stopped beating for GRACE_S seconds is failed by the next tune that runs a trial on the
  study, and retried once (same parameters). Optuna's journal storage has no heartbeat
  (optuna 5.0: JournalStorage is not a BaseHeartbeat).
- a journal file whose last record was torn by a crash or a full disk: optuna 5.0 reads
  past it once, then appends after the torn bytes and fails on the next read with a raw
  JSONDecodeError. The torn tail is moved to a file beside the journal before opening.
"""

from __future__ import annotations

import datetime
import json
import time
import warnings
from pathlib import Path

import optuna

from ...errors import DfgenError

HEARTBEAT_S = 30  # a running trial's process records that it lives this often
GRACE_S = 120  # ... and is taken for dead after this long without a heartbeat


def open_storage(spec: str, log=print, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S):
    """An Optuna storage: a database URL (sqlite:///, postgresql://, mysql://) or a file path
    (a journal file, safe for several processes on one host and needing no server)."""
    if "://" not in spec:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        Path(spec).parent.mkdir(parents=True, exist_ok=True)
        repair_journal(Path(spec), log)
        return JournalStorage(JournalFileBackend(spec))
    with warnings.catch_warnings():  # the heartbeat and its retry callback are experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
            retry = {"heartbeat_stale_trial_callback":
                     optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
        else:
            retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
        for attempt in range(5):  # processes that create one database's tables at once can collide
            try:
                return optuna.storages.RDBStorage(spec, heartbeat_interval=heartbeat_s,
                                                  grace_period=grace_s, **retry)
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))


def repair_journal(path: Path, log=print) -> None:
    """Move a torn last record of the journal at `path` aside (to `<path>.torn-<time>`),
    saying so in one line; a bad record with good ones after it is an error that says
    what to do. Holds the journal's own lock, so a record being written is not taken
    for a torn one."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        good_end, offset, bad_line = 0, 0, None
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            offset += len(line)
            if bad_line is None and _is_record(line):
                good_end = offset
            elif bad_line is None:
                bad_line = number
            elif _is_record(line):
                raise DfgenError(
                    f"--storage {path}: line {bad_line} is not a journal record but later "
                    "lines are, so the study cannot be read past it; move the file aside "
                    "and pass a new --storage to start a new study")
        if bad_line is None:
            return
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = path.with_name(f"{path.name}.torn-{stamp}")
        aside.write_bytes(data[good_end:])
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    finally:
        lock.release()
    log(f"dfgen tune: {path} ended in a torn record ({len(data) - good_end} bytes, from an "
        f"interrupted write); moved it to {aside}; the study resumes from the records before it")


def _is_record(line: bytes) -> bool:
    if not line.endswith(b"\n"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def ask_trial(study: "optuna.Study"):
    """study.ask() with what Study.optimize does around each trial, for the tuner's
    ask-and-tell loop: on a database storage, trials whose process stopped beating are
    failed first (and retried once, by the storage's callback), and the new trial's
    heartbeat is recorded until `end_heartbeat(beat)`. Returns (trial, beat)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with warnings.catch_warnings():  # fail_stale_trials is experimental; ask() warns
        warnings.simplefilter("ignore")  # that heartbeats are meant for optimize()
        optuna.storages.fail_stale_trials(study)
        trial = study.ask()
    beat = get_heartbeat_thread(trial._trial_id, study._storage)
    beat.start()
    return trial, beat


def end_heartbeat(beat) -> None:
    """Stop a trial's heartbeat (before telling the study its result)."""
    beat.join()
