"""Resume bookkeeping for a run: its parameters, a durable log of finished chunks, a run lock.

On disk, beside ``OUT.zarr`` (paths from :mod:`tilesegment.store.layout`)::

    OUT.zarr.lock                 while a run writes OUT.zarr: JSON {pid, host, started, argv,
                                  pid_start}; flock'ed by the holder (see RunLock)
    OUT.tilesegment/
      run.json                    {"format": 1, "params": {...}, "info": {...}}: what the
                                  output was created with; ``--resume`` refuses other params
                                  and another slide (its name, size and content fingerprint:
                                  :mod:`tilesegment.infer.identity`)
      done.log                    one line "<row> <col>\\n" per finished chunk (chunk-grid
                                  indices), appended only after the chunk's files are fsync'd

A chunk's record is written only after every file of the chunk (probabilities, mask, tissue)
and the directories naming them are fsync'd, and the log itself is fsync'd after each batch
of records, so a record always describes data that survives a crash or a power cut. The
reverse does not hold: a chunk written just before a crash may lack its record and is simply
computed again on resume, giving the same bytes. A record torn by a crash (no final newline)
is dropped when the log is reopened.

Outputs written by older versions kept this folder inside the group (``OUT.zarr/.tilesegment``,
which zarr warns about); :func:`adopt_legacy_state` moves it, and their report, beside it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tilesegment.errors import ConfigError, StoreError
from tilesegment.store.layout import (
    DONE_LOG,
    LEGACY_STATE_DIR,
    PARAMS_FILE,
    ChunkKey,
    legacy_report_path,
    legacy_state_dir,
    lock_path,
    report_path,
    state_dir,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def adopt_legacy_state(output: Path) -> bool:
    """Move the resume state and report an older version kept inside ``output`` beside it.

    Returns whether anything was moved. Called before resuming, so that outputs written before
    the state moved out of the Zarr group resume as before and end up with a clean group.
    """
    moved = False
    for old, new in (
        (legacy_state_dir(output), state_dir(output)),
        (legacy_report_path(output), report_path(output)),
    ):
        if old.exists() and not new.exists():
            os.replace(old, new)
            log.info("moved %s to %s", old, new)
            moved = True
    return moved


def reset_state(output: Path) -> None:
    """Delete the resume state and report of an earlier output at ``output`` (it is replaced)."""
    import shutil

    for folder in (state_dir(output), legacy_state_dir(output)):
        if folder.is_dir():
            shutil.rmtree(folder)
    for report in (report_path(output), legacy_report_path(output)):
        with contextlib.suppress(FileNotFoundError):
            report.unlink()


# ---------------------------------------------------------------------------------------------
# durable small files


def fsync_dir(path: Path) -> None:
    """fsync a directory so that the names created in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> bool:
    """fsync an existing file's data; False when it does not exist (e.g. an empty chunk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (temp file, fsync, rename, fsync)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# run parameters


def write_params(output: Path, params: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """Record the parameters ``output`` is created with (checked by :func:`check_params`).

    ``params`` decide the output's bytes and must match on resume; ``info`` is provenance
    (batch size, devices, command line) that may change between attempts.
    """
    folder = state_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT_VERSION, "params": dict(params), "info": dict(info)}
    write_durably(folder / PARAMS_FILE, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_params(output: Path) -> dict[str, Any] | None:
    """The recorded parameters, or None when the output has none (not created by a run)."""
    record = read_record(output)
    return None if record is None else record[0]


def read_record(output: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The recorded (params, info), or None when the output has none (not created by a run).

    Also reads the record of an output written by an older version (inside the group)."""
    path = state_dir(output) / PARAMS_FILE
    if not path.exists() and (legacy_state_dir(output) / PARAMS_FILE).exists():
        path = legacy_state_dir(output) / PARAMS_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: unreadable run parameters ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
        raise StoreError(f"{path}: not a tilesegment run record of format {FORMAT_VERSION}")
    return dict(doc["params"]), dict(doc.get("info") or {})


def check_params(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    output: Path,
    ignore: Collection[str] = (),
) -> None:
    """Raise :class:`ConfigError` (one line, naming each difference) unless they match.

    Keys in ``ignore`` are left out (the slide's identity has its own check, which also
    accepts records written before some of its keys existed).
    """
    # JSON round trip so tuples and lists compare equal.
    a = json.loads(json.dumps(dict(stored), sort_keys=True))
    b = json.loads(json.dumps(dict(current), sort_keys=True))
    diffs = [
        f"{key} {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key) and key not in ignore
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume {output}: it was started with other parameters ("
            + "; ".join(diffs)
            + "); rerun with the original options or use --overwrite to start again"
        )


# ---------------------------------------------------------------------------------------------
# the done log


class DoneLog:
    """The durable record of finished chunks: ``done.log`` in the run's state folder.

    Lifecycle: construct (reads the records already on disk and drops a torn last line),
    :meth:`add` finished chunks from any thread, :meth:`close` (which waits until every
    added chunk is durable). A committer thread batches the work: every ``interval_s`` it
    fsyncs the files of the chunks added since (several at once, so the filesystem can
    group them into one journal commit), then their directories, then appends their records
    and fsyncs the log. Compute never waits for the disk.

    Thread-safe. Not picklable: the coordinating process owns the log; workers report
    finished chunks to it.

    Parameters
    ----------
    output : path
        The ``OUT.zarr`` folder.
    fsync : bool
        Make records durable (fsync files, folders and the log). False keeps the ordering
        but skips the flushes; a process crash is still safe, a power cut is not.
    on_commit : callable, optional
        Called from the committer thread with each batch of keys once it is durable.
    """

    def __init__(
        self,
        output: Path,
        *,
        fsync: bool = True,
        interval_s: float = 0.5,
        on_commit: Callable[[list[ChunkKey]], None] | None = None,
    ) -> None:
        folder = state_dir(output)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / DONE_LOG
        self._fsync = fsync
        self._interval_s = interval_s
        self._on_commit = on_commit
        self.done: set[ChunkKey] = read_done(self.path, repair=True)
        self._fh = self.path.open("ab")
        if fsync:
            fsync_dir(folder)
        self._pending: list[tuple[ChunkKey, tuple[Path, ...]]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._urgent = False
        self._error: BaseException | None = None
        self._committing = 0
        self._thread = threading.Thread(target=self._run, name="ts-commit", daemon=True)
        self._thread.start()

    def add(self, key: ChunkKey, files: Iterable[Path] = ()) -> None:
        """Record ``key`` as finished once ``files`` (those that exist) are durable."""
        with self._cond:
            self._raise_error()
            if self._closing:
                raise StoreError(f"{self.path} is closed")
            self._pending.append(((int(key[0]), int(key[1])), tuple(files)))
            self._cond.notify_all()

    def flush(self) -> None:
        """Block until every chunk added so far is durable."""
        with self._cond:
            self._urgent = True
            self._cond.notify_all()
            while (self._pending or self._committing) and self._error is None:
                self._cond.wait(0.1)
            self._raise_error()

    def close(self) -> None:
        """Flush, stop the committer and close the log. Idempotent."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._fh.close()
        self._raise_error()

    def __enter__(self) -> DoneLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise StoreError(
                f"cannot record finished chunks in {self.path}: {self._error}"
            ) from self._error

    def _run(self) -> None:
        with ThreadPoolExecutor(4, thread_name_prefix="ts-fsync") as fsyncs:
            while True:
                with self._cond:
                    while not self._pending and not self._closing:
                        self._cond.wait()
                    # Let a batch build up; flush() and close() cut the wait short.
                    deadline = time.monotonic() + self._interval_s
                    while not (self._closing or self._urgent):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    self._urgent = False
                    batch, self._pending = self._pending, []
                    self._committing = len(batch)
                    if self._closing and not batch:
                        return
                try:
                    self._commit(batch, fsyncs)
                except BaseException as exc:  # reported by the next add/flush/close
                    with self._cond:
                        self._error = exc
                        self._committing = 0
                        self._cond.notify_all()
                    return
                with self._cond:
                    self._committing = 0
                    self._cond.notify_all()

    def _commit(self, batch: list[tuple[ChunkKey, tuple[Path, ...]]], fsyncs) -> None:
        if not batch:
            return
        if self._fsync:
            files = sorted({f for _, fs in batch for f in fs})
            present = [f for f, ok in zip(files, fsyncs.map(fsync_file, files), strict=True) if ok]
            # The rename that published each chunk file lives in its folder; new row folders
            # live in their parents.
            dirs = sorted({f.parent for f in present} | {f.parent.parent for f in present})
            list(fsyncs.map(fsync_dir, dirs))
        self._fh.write("".join(f"{y} {x}\n" for (y, x), _ in batch).encode())
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())
        keys = [k for k, _ in batch]
        self.done.update(keys)
        if self._on_commit is not None:
            self._on_commit(keys)


def read_done(path: Path, *, repair: bool = False) -> set[ChunkKey]:
    """The chunk keys recorded in a done log (empty if it does not exist).

    With ``repair``, a torn last record (a crash mid-append) is cut off the file so that the
    next append starts on a fresh line.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last record (%d bytes)", path, len(data) - end)
        if repair:
            with path.open("r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
    done: set[ChunkKey] = set()
    for number, line in enumerate(data[:end].decode("ascii", "replace").splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise StoreError(f"{path}:{number}: malformed record {line!r}")
        done.add((int(parts[0]), int(parts[1])))
    return done


# ---------------------------------------------------------------------------------------------
# the run lock


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds (or held) a run lock."""

    pid: int
    host: str
    started: str
    """ISO 8601 local time when the run took the lock."""
    argv: tuple[str, ...] = ()
    pid_start: int | None = None
    """Start time of the process in clock ticks after boot (Linux), to tell a reused pid."""

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (started {self.started})"

    def alive(self) -> bool | None:
        """Whether the holder still runs: None when it is on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by someone else
        start = process_start_ticks(self.pid)
        return self.pid_start is None or start is None or start == self.pid_start


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (start time after boot), None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; it ends at the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def _holder_from(fd: int) -> LockHolder | None:
    try:
        text = os.pread(fd, 1 << 16, 0).decode()
        doc = json.loads(text)
        doc["argv"] = tuple(doc.get("argv", ()))
        return LockHolder(**doc)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return None


class RunLock:
    """Exclusive right to write one output: ``OUT.zarr.lock``, held for the run's lifetime.

    The lock file is created atomically (written and ``flock``-ed under a temporary name,
    then hard-linked into place, which fails if a lock exists) and stays ``flock``-ed by its
    holder. The kernel drops a flock when its process dies, however it dies, so a lock file
    whose flock can be taken is stale; it is taken over (with a warning naming the old holder)
    unless its JSON names a live process on this host, or another host (whose pids cannot be
    checked from here). Not inherited by worker processes. Not picklable.
    """

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self._fd: int | None = None
        self.previous: LockHolder | None = None
        """The stale holder taken over by :meth:`acquire`, if any."""

    def acquire(self) -> RunLock:
        import fcntl

        me = LockHolder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            argv=tuple(sys.argv),
            pid_start=process_start_ticks(os.getpid()),
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{me.pid}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, (json.dumps(asdict(me)) + "\n").encode())
            os.fsync(fd)
            for _ in range(50):
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    pass
                stale = self._inspect_existing(fcntl)
                if stale is None:
                    continue  # the lock vanished or changed under us: try again
                os.replace(tmp, self.path)  # take over; our flock'ed inode is now the lock
                self.previous = stale
                log.warning(
                    "taking over the stale lock %s of %s, which no longer runs",
                    self.path,
                    stale.describe(),
                )
                break
            else:
                raise StoreError(f"cannot take the lock {self.path}: it keeps changing")
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self._fd = fd
        return self

    def _inspect_existing(self, fcntl) -> LockHolder | None:
        """The stale holder of the existing lock, None if it vanished; raises if it is held."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise self._held(_holder_from(fd)) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                return None
            holder = _holder_from(fd)
            if holder is None:
                # Nobody holds the flock and the content is unreadable: a crash while taking
                # the lock. Treat it as stale.
                return LockHolder(pid=-1, host="unknown", started="unknown")
            alive = holder.alive()
            if alive is None or alive:
                raise self._held(holder)
            return holder
        finally:
            os.close(fd)

    def _held(self, holder: LockHolder | None) -> StoreError:
        who = holder.describe() if holder is not None else "another run (lock being written)"
        hint = (
            "wait for it to finish or stop it"
            if holder is None or holder.host == socket.gethostname()
            else f"if that run is gone, delete {self.path}"
        )
        return StoreError(f"{self.output} is being written by {who}; {hint}")

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the flock. Idempotent."""
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_partial_files(output: Path) -> int:
    """Delete the ``*.partial`` temporaries a killed zarr write left anywhere in ``output``.

    zarr writes each chunk or metadata document to ``KEY.<uuid>.partial`` and renames it into
    place, so a kill mid-write leaves such a file behind; it is never part of an array.
    Returns how many were removed.
    """
    count = 0
    for root, dirs, files in os.walk(output):
        if root == str(output) and LEGACY_STATE_DIR in dirs:
            dirs.remove(LEGACY_STATE_DIR)
        for f in files:
            if f.endswith(".partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, f))
                    count += 1
    return count


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")
