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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.discovery import parse_mountinfo

log = logging.getLogger(__name__)

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_IMMUTABLE_FL, FS_APPEND_FL = 0x10, 0x20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CleanError(Exception):
    """The volume is not clean; the message says what is left and why."""


class VolumeBusyError(Exception):
    """Another agent instance on this node holds the volume's cleaning lock."""


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


def clean_filesystem(root: str, device: int, skip: Iterable[str] = (),
                     stop: threading.Event | None = None,
                     deadline: float = float("inf")) -> FsReport:
    """Remove everything inside the mount point `root`, keeping `root` itself.

    `device` is the st_dev the volume must have; `skip` are absolute paths of mounts nested in
    it (from the mount table), which are left alone, as is any directory that is a mount point
    (another device, or a bind mount of this one). Raises CleanError when anything is left,
    listing it, and when `stop` is set or the monotonic `deadline` passes.
    """
    walk = _Walk(device, {posixpath.normpath(p) for p in skip}, stop, deadline)
    fd = os.open(root, DIR_FLAGS)
    try:
        st = os.fstat(fd)
        if st.st_dev != device:
            raise CleanError(f"{root} is not the expected filesystem (device {st.st_dev:#x}, "
                             f"expected {device:#x}); refusing to clean")
        walk.empty_tree(fd, posixpath.normpath(root), st)
    finally:
        os.close(fd)
    report = walk.report
    if report.flags_cleared:
        log.warning("%s: cleared immutable/append-only flags on %d entries to remove them "
                    "(first: %r)", root, len(report.flags_cleared), report.flags_cleared[0])
    problems = [f"nested mount {p!r} left alone" for p in report.nested_mounts]
    problems += report.resisted
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CleanError(f"{root}: not clean: {'; '.join(problems[:5])}{more}")
    return report


class _Walk:
    """Depth first, one descriptor at a time; every entry that resists is tried once."""

    def __init__(self, device: int, skip: set[str], stop: threading.Event | None,
                 deadline: float) -> None:
        self.device = device
        self.skip = skip
        self.stop = stop
        self.deadline = deadline
        self.report = FsReport()
        self.given_up: set[str] = set()  # full paths left behind (reported once each)

    def empty_tree(self, root_fd: int, root_path: str, root_st: os.stat_result) -> None:
        cur = os.dup(root_fd)
        path = root_path
        # each level's (dev, ino), checked on the way down and again on the way back up
        chain: list[tuple[str, tuple[int, int]]] = [("", (root_st.st_dev, root_st.st_ino))]
        try:
            while True:
                self._check_time()
                child = self._next_child_dir(cur, path)
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
                name, _ = chain.pop()
                parent = os.open("..", DIR_FLAGS, dir_fd=cur)
                _expect_identity(parent, chain[-1][1], posixpath.dirname(path))
                os.close(cur)
                cur, path = parent, posixpath.dirname(path)
                self._remove_dir(cur, name, posixpath.join(path, name))
        finally:
            os.close(cur)

    def _check_time(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise CleanError("the agent is stopping; the clean resumes after its restart")
        if time.monotonic() > self.deadline:
            raise CleanError("the filesystem clean did not finish in time")

    def _next_child_dir(self, fd: int, path: str) -> tuple[str, tuple[int, int]] | None:
        """Remove every non-directory in `fd`; return the first subdirectory still to empty."""
        with os.scandir(fd) as entries:
            for entry in entries:
                full = posixpath.join(path, entry.name)
                if full in self.given_up:
                    continue
                try:
                    st = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    # A mount point: another device, or a bind mount of this one (the directory
                    # entry then names the covered inode, not the mounted one).
                    if (st.st_dev != self.device or full in self.skip
                            or entry.inode() != st.st_ino):
                        self.report.nested_mounts.append(full)
                        self.given_up.add(full)
                        continue
                    return entry.name, (st.st_dev, st.st_ino)
                self._unlink(fd, entry.name, full, st)
        return None

    def _unlink(self, fd: int, name: str, full: str, st: os.stat_result) -> None:
        failure = self._remove(fd, name, full, is_dir=False,
                               own_flags=stat.S_ISREG(st.st_mode))
        if failure is None:
            self.report.files += 1
        elif not isinstance(failure, FileNotFoundError):
            self._give_up(full, failure)

    def _remove_dir(self, parent_fd: int, name: str, full: str) -> None:
        """rmdir an emptied directory; anything that keeps it is left over and reported."""
        failure = self._remove(parent_fd, name, full, is_dir=True, own_flags=True)
        if failure is None:
            self.report.dirs += 1
            return
        inside = full + "/"
        if failure.errno != errno.ENOTEMPTY or not any(p.startswith(inside)
                                                       for p in self.given_up):
            self._give_up(full, failure)  # nothing inside explains it: report the directory
        self.given_up.add(full)

    def _remove(self, dir_fd: int, name: str, full: str, is_dir: bool,
                own_flags: bool) -> OSError | None:
        """Remove one entry; when immutable or append-only flags (on the entry, for regular
        files and directories only, or on its directory) stop it, clear them and try again."""
        try:
            _remove(dir_fd, name, is_dir)
            return None
        except OSError as exc:
            if exc.errno != errno.EPERM:
                return exc
            failure = exc
        cleared = _clear_flags(dir_fd)
        if own_flags:
            cleared = _clear_flags_at(dir_fd, name) or cleared
        if not cleared:
            return failure
        self.report.flags_cleared.append(full)
        try:
            _remove(dir_fd, name, is_dir)
        except OSError as exc:
            return exc
        return None

    def _give_up(self, full: str, exc: OSError) -> None:
        if full not in self.given_up:
            self.given_up.add(full)
            self.report.resisted.append(f"{full!r}: {exc.strerror or exc}")


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
                      label: str, stop: threading.Event | None = None) -> None:
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
    deadline = time.monotonic() + timeout
    try:
        while (code := proc.poll()) is None:
            if stop is not None and stop.is_set():
                raise CleanError(f"{command[0]} stopped with the agent; the clean resumes "
                                 "after its restart")
            if time.monotonic() > deadline:
                raise CleanError(f"{command[0]} did not finish within {timeout:g}s; killed")
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
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
        with tmp.open("w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())  # the record must survive a power cut
        os.replace(tmp, self._file(path))  # atomic: a crash leaves the old state or the new
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._paths[path] = record
        log.info("volume %s holds data of PV %s: it is cleaned before being offered again",
                 path, pv_name)

    def pv_name(self, path: str) -> str:
        """The PV that made the volume dirty, as recorded."""
        return str(self._paths.get(path, {}).get("pv", ""))

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
    busy: bool = False  # not attempted: another instance is cleaning it


class Cleaner:
    """Runs cleanings on a bounded pool; finished outcomes wait for the loop to collect."""

    def __init__(self, concurrency: int = 2, timeout: float = 6 * 3600.0,
                 on_done: Callable[[], None] | None = None,
                 mountinfo: str = "/proc/self/mountinfo",
                 lock_dir: str | None = None) -> None:
        self.timeout = timeout
        self.on_done = on_done
        self.mountinfo = mountinfo
        self.lock_dir = Path(lock_dir) if lock_dir else None
        self._stop = threading.Event()
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
        """Finished outcomes; only now do their volumes stop counting as being cleaned, so a
        pass never sees a volume neither running nor finished."""
        with self._lock:
            done, self._done = self._done, []
            for outcome in done:
                self._running.pop(outcome.job.key, None)
            return done

    def shutdown(self) -> None:
        """Stop: running cleans end (block cleaners are killed) and resume after a restart."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _finished(self, future: Future[CleanOutcome]) -> None:
        outcome = future.result()
        with self._lock:
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
            with self._volume_lock(job.key):
                detail = self._verify_and_clean(job, label)
        except VolumeBusyError:
            log.info("clean %s: another agent on this node is cleaning it", label)
            return CleanOutcome(job, False, time.monotonic() - started, "busy", busy=True)
        except (CleanError, OSError) as exc:
            log.warning("clean %s failed: %s", label, exc)
            return CleanOutcome(job, False, time.monotonic() - started, str(exc))
        except Exception as exc:  # a bug must fail this clean, not the worker
            log.exception("clean %s crashed", label)
            return CleanOutcome(job, False, time.monotonic() - started, repr(exc))
        log.info("clean %s done: %s", label, detail)
        return CleanOutcome(job, True, time.monotonic() - started, detail)

    @contextlib.contextmanager
    def _volume_lock(self, key: str) -> Iterator[None]:
        """A host-wide lock per volume (a lock file in the state dir, which every agent
        instance of the node shares): two agents never clean one volume at once, whether it
        has a PV or not."""
        if self.lock_dir is None:
            yield
            return
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        fd = os.open(self.lock_dir / f"{digest}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise VolumeBusyError(key) from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _verify_and_clean(self, job: CleanJob, label: str) -> str:
        path = posixpath.normpath(job.container_path)
        parent = posixpath.dirname(path)
        if parent != posixpath.normpath(job.mount_dir) or path == job.mount_dir:
            raise CleanError(f"{path} is not an entry of {job.mount_dir}; refusing to clean")
        if job.raw_device:
            verify_block_device(path, job.device)
            run_block_cleaner(job.command, path, self.timeout, label, self._stop)
            return f"{job.command[0]} succeeded"
        real = os.path.realpath(path)  # an entry may be a link to a mount in the same dir
        if posixpath.dirname(real) != posixpath.normpath(job.mount_dir):
            raise CleanError(f"{path} leads to {real}, outside {job.mount_dir}; refusing")
        st = os.lstat(real)
        if not stat.S_ISDIR(st.st_mode) or _devno(st.st_dev) != job.device:
            raise CleanError(f"{real} is no longer the mount of device {job.device}; refusing")
        # The mount table now, not when the clean was decided: a mount may have appeared since.
        with open(self.mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            nested = [m.mount_point for m in parse_mountinfo(f.read())
                      if m.mount_point.startswith(real.rstrip("/") + "/")]
        report = clean_filesystem(real, st.st_dev, [*job.nested_mounts, *nested],
                                  self._stop, time.monotonic() + self.timeout)
        return report.summary()


def verify_block_device(path: str, device: str) -> None:
    """Right before a wipe: the entry still leads to the recorded device, and nothing uses it."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode) or _devno(st.st_rdev) != device:
        raise CleanError(f"{path} is no longer block device {device}; refusing")
    _expect_unused(path)


def _expect_unused(device: str) -> None:
    """The kernel refuses an exclusive open of a device that is mounted (in any mount
    namespace) or held (LVM, md, another exclusive opener): never wipe such a device."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise CleanError(f"{device} is in use (mounted or held, maybe in another mount "
                             "namespace); refusing to wipe it") from None
        raise
    os.close(fd)


def _devno(value: int) -> str:
    return f"{os.major(value)}:{os.minor(value)}"


def capacity_breakdown(size_bytes: int) -> str:
    """The upstream's `capacity` label: size rounded up to a multiple of 500 GiB."""
    step = 500 << 30
    return f"{-(-size_bytes // step) * 500}G"
