"""Reading YAML files whatever they hold, and writing files so that a reader never sees a
partial one."""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def _umask() -> int:
    """The process's umask (reading it means setting it: done under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: readers
    see the old file or the new one, and two writers leave one complete file. The file
    keeps the permission bits of the one it replaces; a new file gets the umask's default
    (mkstemp alone would make every file private, 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_yaml(path) -> object:
    """The YAML data in the file at `path` (safe loader). Anything that keeps the file from
    being read as YAML (missing, unreadable, not UTF-8, bad syntax, nested too deeply) is a
    one-line ConfigError naming the file; so is a value the loader cannot build (a date
    such as 2026-13-45 raises ValueError inside PyYAML)."""
    import yaml

    from .errors import ConfigError

    path = Path(path)
    try:
        return yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())[:300]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except Exception as err:  # noqa: BLE001 - whatever the loader raises, the file is unusable
        raise ConfigError(f"{path}: not valid YAML ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:300]})") from None
