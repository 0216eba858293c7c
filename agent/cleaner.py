"""Cleaning released volumes: where a local-volume agent can destroy the wrong data.

The filesystem cleaner walks the volume through directory file descriptors, never by path: it
never follows a symlink, never crosses into another filesystem or a nested mount, checks every
directory it enters and returns to is the one it saw, and holds one descriptor at a time so a
10,000-level tree is no problem. Anything it could not remove fails the clean: a volume is
offered again only when it is empty. The block cleaner runs the configured command with idle
I/O priority and a timeout. Which volumes are dirty is kept on the host (the state dir), so a
PV deleted by hand, or an agent killed mid-clean, never makes an uncleaned volume available.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import signal
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_IMMUTABLE_FL, FS_APPEND_FL = 0x10, 0x20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CleanError(Exception):
    """The volume is not clean; the message says what is left and why."""


@dataclass
class FsReport:
    files: int = 0
    dirs: int = 0
    flags_cleared: list[str] = field(default_factory=list)
    nested_mounts: list[str] = field(default_factory=list)
    resisted: list[str] = field(default_factory=list)  # "path: error"

    def summary(self) -> str:
        text = f"removed {self.files} files and {self.dirs} directories"
        if self.flags_cleared:
            text += (f"; cleared immutable/append-only flags on {len(self.flags_cleared)} "
                     f"entries (first: {self.flags_cleared[0]!r})")
        return text


def clean_filesystem(root: str, device: int, skip: Iterable[str] = ()) -> FsReport:
    """Remove everything inside the mount point `root`, keeping `root` itself.

    `device` is the st_dev the volume must have; `skip` are absolute paths of mounts nested in
    it (from the mount table), which are left alone, as is anything on another device. Raises
    CleanError when anything is left, listing it.
    """
    skip_set = {posixpath.normpath(p) for p in skip}
    report = FsReport()
    fd = os.open(root, DIR_FLAGS)
    try:
        st = os.fstat(fd)
        if st.st_dev != device:
            raise CleanError(f"{root} is not the expected filesystem (device {st.st_dev:#x}, "
                             f"expected {device:#x}); refusing to clean")
        _empty_tree(fd, posixpath.normpath(root), st, skip_set, report)
    finally:
        os.close(fd)
    if report.flags_cleared:
        log.warning("%s: cleared immutable/append-only flags on %d entries to remove them "
                    "(first: %r)", root, len(report.flags_cleared), report.flags_cleared[0])
    problems = [f"nested mount {p!r} left alone" for p in report.nested_mounts]
    problems += report.resisted
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CleanError(f"{root}: not clean: {'; '.join(problems[:5])}{more}")
    return report


def _empty_tree(root_fd: int, root_path: str, root_st: os.stat_result, skip: set[str],
                report: FsReport) -> None:
    """Depth first, one descriptor at a time; `chain` remembers each level's identity."""
    cur = os.dup(root_fd)
    path = root_path
    chain: list[tuple[str, tuple[int, int]]] = [("", (root_st.st_dev, root_st.st_ino))]
    stuck: set[tuple[int, int]] = set()  # directories that could not be emptied
    try:
        while True:
            child = _next_child_dir(cur, path, root_st.st_dev, skip, stuck, report)
            if child is not None:
                name, ident = child
                fd = os.open(name, DIR_FLAGS, dir_fd=cur)
                _expect_identity(fd, ident, posixpath.join(path, name))
                os.close(cur)
                cur, path = fd, posixpath.join(path, name)
                chain.append((name, ident))
                continue
            if len(chain) == 1:
                return
            name, ident = chain.pop()
            parent = os.open("..", DIR_FLAGS, dir_fd=cur)
            _expect_identity(parent, chain[-1][1], posixpath.dirname(path))
            os.close(cur)
            cur, path = parent, posixpath.dirname(path)
            try:
                _remove(cur, name, is_dir=True)
                report.dirs += 1
            except OSError as exc:
                if exc.errno == errno.EPERM and _clear_flags_at(cur, name):
                    report.flags_cleared.append(posixpath.join(path, name))
                    with contextlib.suppress(OSError):
                        _remove(cur, name, is_dir=True)
                        report.dirs += 1
                        continue
                stuck.add(ident)  # its remaining content is already reported
    finally:
        os.close(cur)


def _next_child_dir(
    fd: int, path: str, device: int, skip: set[str], stuck: set[tuple[int, int]],
    report: FsReport,
) -> tuple[str, tuple[int, int]] | None:
    """Remove every non-directory in `fd`; return the first subdirectory still to empty."""
    with os.scandir(fd) as entries:
        for entry in entries:
            name = entry.name
            full = posixpath.join(path, name)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if st.st_dev != device or full in skip:
                    if full not in report.nested_mounts:
                        report.nested_mounts.append(full)
                    stuck.add(ident)
                    continue
                if ident not in stuck:
                    return name, ident
                continue
            _unlink_entry(fd, name, full, st, report)
    return None


def _unlink_entry(fd: int, name: str, full: str, st: os.stat_result, report: FsReport) -> None:
    try:
        _remove(fd, name, is_dir=False)
        report.files += 1
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        first = exc
    # Immutable or append-only (on the entry or its directory): root may clear the flags.
    cleared = _clear_flags(fd)
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        cleared = _clear_flags_at(fd, name) or cleared
    if cleared:
        report.flags_cleared.append(full)
        try:
            _remove(fd, name, is_dir=False)
            report.files += 1
            return
        except OSError as exc:
            first = exc
    report.resisted.append(f"{full!r}: {first.strerror or first}")


def _remove(fd: int, name: str, is_dir: bool) -> None:
    if is_dir:
        os.rmdir(name, dir_fd=fd)
    else:
        os.unlink(name, dir_fd=fd)


def _expect_identity(fd: int, ident: tuple[int, int], path: str) -> None:
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != ident:
        os.close(fd)
        raise CleanError(f"{path} changed while it was being cleaned; stopping")


def _clear_flags_at(dir_fd: int, name: str) -> bool:
    """Clear immutable/append-only flags on a regular file or directory (never a device)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                     | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if not (stat.S_ISREG(os.fstat(fd).st_mode) or stat.S_ISDIR(os.fstat(fd).st_mode)):
            return False
        return _clear_flags(fd)
    finally:
        os.close(fd)


def _clear_flags(fd: int) -> bool:
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        if not flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
            return False
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags & ~(FS_IMMUTABLE_FL
                                                                    | FS_APPEND_FL)))
    except OSError:
        return False
    return True


def run_block_cleaner(command: Sequence[str], device: str, timeout: float,
                      label: str) -> None:
    """Run a block cleaner with LOCAL_PV_BLKDEVICE set, at idle I/O priority, streaming its
    output to the log; kill its whole process group on timeout."""
    argv = list(command)
    if shutil.which("ionice"):
        argv = ["ionice", "-c", "3", *argv]
    if shutil.which("setpriv"):  # the cleaner dies with the agent: a restart never races it
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    env = {**os.environ, "LOCAL_PV_BLKDEVICE": device}
    log.info("clean %s: running %s on %s", label, " ".join(command), device)
    try:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise CleanError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    assert proc.stdout is not None
    stream = proc.stdout

    def pump() -> None:
        for line in stream:
            log.info("clean %s: %s", label, line.decode(errors="replace").rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise CleanError(f"{command[0]} did not finish within {timeout:g}s; killed") from None
    finally:
        reader.join(5)
    if code != 0:
        raise CleanError(f"{command[0]} exited with status {code}")


class DirtyStore:
    """Host paths of volumes that held a tenant's data and are not cleaned yet.

    Kept on the host (the state dir), not on the PV: it must survive the PV being deleted.
    """

    def __init__(self, state_dir: str) -> None:
        self.dir = Path(state_dir, "dirty")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._paths: dict[str, dict[str, str]] = {}
        for f in self.dir.glob("*.json"):
            try:
                record = json.loads(f.read_text())
                self._paths[record["path"]] = record
            except (OSError, ValueError, KeyError):
                log.warning("ignoring unreadable dirty-volume record %s", f)

    def paths(self) -> frozenset[str]:
        return frozenset(self._paths)

    def mark(self, path: str, pv_name: str) -> None:
        if path in self._paths:
            return
        record = {"path": path, "pv": pv_name, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                       time.gmtime())}
        tmp = self._file(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._file(path))  # atomic: a crash leaves the old state or the new
        self._paths[path] = record
        log.info("volume %s holds data of PV %s: it is cleaned before being offered again",
                 path, pv_name)

    def clear(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(path).unlink()
        self._paths.pop(path, None)

    def _file(self, path: str) -> Path:
        digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()
        return self.dir / f"{digest[:32]}.json"


@dataclass(frozen=True)
class CleanJob:
    """Everything a worker needs to clean one volume, decided before it starts."""

    key: str  # the volume's host path
    pv_name: str | None
    pv_uid: str
    class_name: str
    mode: str  # the PV's volumeMode (metrics)
    raw_device: bool  # clean with the block cleaner
    container_path: str
    mount_dir: str  # the class's mountDir (resolved): cleaning never leaves it
    device: str  # "major:minor" the volume must still be
    command: tuple[str, ...]
    nested_mounts: tuple[str, ...] = ()
    capacity_bytes: int = 0
    via_job: bool = False  # cleaned by a Kubernetes Job (useJobForCleaning)


@dataclass(frozen=True)
class CleanOutcome:
    job: CleanJob
    ok: bool
    seconds: float
    detail: str


class Cleaner:
    """Runs cleanings on a bounded pool; finished outcomes wait for the loop to collect."""

    def __init__(self, concurrency: int = 2, timeout: float = 6 * 3600.0,
                 on_done: Callable[[], None] | None = None) -> None:
        self.timeout = timeout
        self.on_done = on_done
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency),
                                        thread_name_prefix="clean")
        self._lock = threading.Lock()
        self._running: dict[str, CleanJob] = {}
        self._done: list[CleanOutcome] = []

    def running(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._running)

    def submit(self, job: CleanJob) -> bool:
        with self._lock:
            if job.key in self._running:
                return False
            self._running[job.key] = job
        future: Future[CleanOutcome] = self._pool.submit(self._clean, job)
        future.add_done_callback(self._finished)
        return True

    def collect(self) -> list[CleanOutcome]:
        with self._lock:
            done, self._done = self._done, []
            return done

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _finished(self, future: Future[CleanOutcome]) -> None:
        outcome = future.result()
        with self._lock:
            self._running.pop(outcome.job.key, None)
            self._done.append(outcome)
        if self.on_done is not None:
            self._notify_safely(self.on_done)

    @staticmethod
    def _notify_safely(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("clean completion callback failed")

    def _clean(self, job: CleanJob) -> CleanOutcome:
        started = time.monotonic()
        label = job.pv_name or job.key
        try:
            detail = self._verify_and_clean(job, label)
        except (CleanError, OSError) as exc:
            log.warning("clean %s failed: %s", label, exc)
            return CleanOutcome(job, False, time.monotonic() - started, str(exc))
        except Exception as exc:  # a bug must fail this clean, not the worker
            log.exception("clean %s crashed", label)
            return CleanOutcome(job, False, time.monotonic() - started, repr(exc))
        log.info("clean %s done: %s", label, detail)
        return CleanOutcome(job, True, time.monotonic() - started, detail)

    def _verify_and_clean(self, job: CleanJob, label: str) -> str:
        path = posixpath.normpath(job.container_path)
        parent = posixpath.dirname(path)
        if parent != posixpath.normpath(job.mount_dir) or path == job.mount_dir:
            raise CleanError(f"{path} is not an entry of {job.mount_dir}; refusing to clean")
        if job.raw_device:
            st = os.stat(path)
            if not stat.S_ISBLK(st.st_mode) or _devno(st.st_rdev) != job.device:
                raise CleanError(f"{path} is no longer block device {job.device}; refusing")
            run_block_cleaner(job.command, path, self.timeout, label)
            return f"{job.command[0]} succeeded"
        real = os.path.realpath(path)  # an entry may be a link to a mount in the same dir
        if posixpath.dirname(real) != posixpath.normpath(job.mount_dir):
            raise CleanError(f"{path} leads to {real}, outside {job.mount_dir}; refusing")
        st = os.lstat(real)
        if not stat.S_ISDIR(st.st_mode) or _devno(st.st_dev) != job.device:
            raise CleanError(f"{real} is no longer the mount of device {job.device}; refusing")
        report = clean_filesystem(real, st.st_dev, job.nested_mounts)
        return report.summary()


def _devno(value: int) -> str:
    return f"{os.major(value)}:{os.minor(value)}"


def capacity_breakdown(size_bytes: int) -> str:
    """The upstream's `capacity` label: size rounded up to a multiple of 500 GiB."""
    step = 500 << 30
    return f"{-(-size_bytes // step) * 500}G"
