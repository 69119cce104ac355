"""One training run per output_dir: an advisory lock file, `output_dir/.minilora.lock`.

Two runs writing one folder would interleave metrics.jsonl and overwrite each other's checkpoints. The lock
is an `flock` on the file, which the kernel drops when its holder dies, so a lock left by a killed run
(kill -9, out of memory) is recognised as stale and taken over; the file names the holder (pid, host, start
time) for the error a second run gets.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

LOCK_NAME = ".minilora.lock"


class OutputDirLocked(RuntimeError):
    """Another live run holds the output_dir."""


@contextmanager
def output_dir_lock(out_dir: Path):
    """Hold `out_dir`'s lock for the body (creating the folder); OutputDirLocked naming the holder otherwise."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    fd = _acquire(path)
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while still locked: a waiting opener then sees a new file, not ours
            os.close(fd)


def _acquire(path: Path) -> int | None:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096)
            os.close(fd)
            raise _locked(path, holder) from None
        except OSError as e:  # a file system without locks (some network mounts)
            os.close(fd)
            warnings.warn(f"cannot lock {path} ({e}): nothing stops a second run from writing to this output_dir",
                          stacklevel=4)
            return None
        with suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)  # the holder removed the file between our open and our lock: try the new one
    previous = os.read(fd, 4096)
    if _names_a_live_process(previous):  # a holder without flock (a file system that ignores it)
        os.close(fd)
        raise _locked(path, previous)
    if previous.strip():
        warnings.warn(f"{path}: the run that held this output_dir ({_describe(previous)}) ended without "
                      "releasing it (killed?); taking it over", stacklevel=4)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _locked(path: Path, holder: bytes) -> OutputDirLocked:
    return OutputDirLocked(f"output_dir {path.parent} is in use by another training run ({_describe(holder)}; lock "
                           f"file {path}): wait for it to finish, or use another output_dir (if that process is no "
                           "minilora run, delete the lock file)")


def _names_a_live_process(raw: bytes) -> bool:
    """Whether the lock file names a process on this host that still runs."""
    try:
        info = json.loads(raw)
        pid = int(info["pid"])
        if info["host"] != socket.gethostname() or pid <= 0:
            return False
        os.kill(pid, 0)
    except (ValueError, KeyError, TypeError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
