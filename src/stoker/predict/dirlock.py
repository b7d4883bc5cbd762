"""One live predict run per ``output_dir``.

Two runs in one folder would both append to the part files and both write the final ones, so the first run holds
an exclusive ``flock`` on ``output_dir/.stoker-predict.lock`` and a second run is refused at once, told which process
holds it. The kernel drops the lock when the last descriptor of it closes, so a killed run never leaves a stale lock.
The ``NPROC_PER_NODE`` launcher hands its descriptor to its workers: the folder stays locked until the launcher and
every worker are gone, not merely the launcher.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from stoker.errors import ConfigError

LOCK_FILE = ".stoker-predict.lock"


class OutputDirLock:
    """The held lock; ``fd`` is what a launcher passes to its workers."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock; the file stays, harmless and reused by the next run
            self.fd = -1


def lock_output_dir(output_dir: str | Path) -> OutputDirLock | None:
    """Lock ``output_dir`` for this run, or raise ``ConfigError`` naming the run that holds it. ``None`` where
    ``flock`` does not exist (Windows): there nothing guards the folder."""
    try:
        import fcntl
    except ImportError:
        return None
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot use output_dir {folder}: {exc.strerror or exc}. Choose a folder this user can "
                          "write to.", param="output_dir") from None  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ConfigError(f"output_dir {folder} is in use by another predict run ({_describe(holder)}). Wait for it "
                          "to finish or stop it, or choose another output_dir.", param="output_dir") from None  # fmt: skip
    os.ftruncate(fd, 0)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(["stoker", *sys.argv[1:]])}  # fmt: skip
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return OutputDirLock(fd)


def _read_holder(fd: int) -> dict[str, object]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, object]) -> str:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "its process id was not recorded"
    text = f"process {pid}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    if holder.get("command"):
        text += f": {holder['command']}"
    if holder.get("host") == socket.gethostname() and not _alive(pid):
        text += "; that process has exited and its worker processes are still stopping"
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
