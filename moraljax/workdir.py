"""A run directory that one process at a time may write, and files written whole.

Two processes writing one workdir interleave metrics.csv and overwrite each
other's summaries, so every command that writes a workdir (a run, its
resumption, an evaluation, a suite, a sweep) first takes the workdir's lock:

    with workdir.hold(path, purpose="training"):
        ...

The lock is an advisory `flock` on `<workdir>/.moraljax.lock`, which also
records the holder (PID, host, purpose, start time) for the refusal message.
The kernel drops a flock when its process dies, however it dies, so a lock
left by a killed run never blocks its resumption: the next process simply
takes it (and says whose it was). Within one process the lock is re-entrant,
so a suite that holds its workdir can train and evaluate programs inside it.

`write_text_atomic` writes a small file through a temporary file and a
rename, so a reader (or a run killed mid-write) sees the old file or the new
one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import tempfile
import time
from collections.abc import Iterator

LOCK_FILENAME = ".moraljax.lock"


class WorkdirError(ValueError):
    """A workdir that cannot be used: held by another process, not a directory, not writable."""


_UMASK = os.umask(0)
os.umask(_UMASK)

# Locks this process holds: resolved workdir -> (open file, hold count).
_held: dict[pathlib.Path, tuple[object, int]] = {}


def check_writable(workdir: str | os.PathLike) -> pathlib.Path:
    """Creates `workdir` if needed and checks a file can be written in it.

    Returns:
        The workdir as a Path.

    Raises:
        WorkdirError: it (or a parent) is a file, or it cannot be created or
            written, with the path and the reason in one line.
    """
    path = pathlib.Path(workdir)
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"workdir={str(path)!r} is a file, not a directory; expected a directory"
                           " (new or an earlier run's) to write the run into.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise WorkdirError(f"workdir={str(path)!r} cannot be written ({reason}); expected a directory"
                           " this user can create files in.") from None
    return path


def _holder_text(record: str) -> str:
    """'PID 123 on host x (training, since 2026-11-30 10:00:00)' from a lock file's record."""
    try:
        holder = json.loads(record)
        return (f"PID {holder['pid']} on host {holder['host']} ({holder['purpose']},"
                f" since {holder['since']})")
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, purpose: str) -> Iterator[pathlib.Path]:
    """Holds `workdir`'s lock for the body (re-entrant within this process).

    Args:
        workdir: the directory (created if missing, and removed again if the
            body wrote nothing into it; checked writable first).
        purpose: what the holder does ("training", "evaluation", ...), shown to
            a process that is refused.

    Yields:
        The workdir as a Path.

    Raises:
        WorkdirError: another live process holds the lock (its PID and host
            are named), or the workdir cannot be used.
    """
    created = not pathlib.Path(workdir).exists()
    path = check_writable(workdir)
    key = path.resolve()
    if key in _held:
        handle, count = _held[key]
        _held[key] = (handle, count + 1)
        try:
            yield path
        finally:
            handle, count = _held[key]
            _held[key] = (handle, count - 1)
        return
    lock_path = path / LOCK_FILENAME
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.seek(0)
        holder = _holder_text(handle.read())
        handle.close()
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise WorkdirError(f"workdir={str(path)!r} cannot be locked ({error.strerror});"
                               " expected a local or shared file system with file locks.") from None
        raise WorkdirError(f"workdir={str(path)!r} is in use by {holder}; wait for it to finish,"
                           " stop it, or use another --workdir.") from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous:  # Left by a process that died holding it: the kernel released its flock.
        print(f"moraljax: taking over the lock of {path}, left by {_holder_text(previous)} which is no"
              " longer running")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    _held[key] = (handle, 1)
    try:
        yield path
    finally:
        _, count = _held.pop(key)
        assert count == 1, count
        # Empty the record before releasing, so the next holder does not
        # mistake a clean exit for a dead holder.
        handle.seek(0)
        handle.truncate()
        handle.flush()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
        # Refused before writing anything: leave no trace of the attempt (best
        # effort; a failure here must not hide the error that ended the body).
        with contextlib.suppress(OSError):
            if created and [p.name for p in path.iterdir()] == [LOCK_FILENAME]:
                lock_path.unlink()
                path.rmdir()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` via a temporary file in the same directory and a rename.

    A reader, or a run killed at any moment, finds either the previous file
    or the complete new one.
    """
    path = pathlib.Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private; give it the mode a plain open() would.
        os.fchmod(descriptor, 0o666 & ~_UMASK)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
