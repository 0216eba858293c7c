"""Cleaning released volumes: where a local-volume agent can destroy the wrong data.

The filesystem cleaner walks the volume through directory file descriptors, never by path: it
never follows a symlink, never crosses into another filesystem or a nested mount, checks every
directory it enters and returns to is the one it saw, and holds one descriptor at a time so a
10,000-level tree is no problem. Anything it could not remove fails the clean: a volume is
offered again only when it is empty. The block cleaner, and a class's own filesystem cleaner
(`fsCleanerCommand`), run the configured command with idle I/O priority and a timeout. Which
volumes are dirty is kept on the host (the state dir), so a PV deleted by hand, or an agent
killed mid-clean, never makes an uncleaned volume available.
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
import queue
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.discovery import mounts_under, parse_mountinfo
from agent.identity import Match, compare
from agent.pv import rfc3339

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


def clean_filesystem(root: str, device: int, skip: Iterable[str] = (),  # noqa: PLR0913, PLR0917 - the walk's root, its device and its three optional bounds
                     stop: threading.Event | None = None,
                     deadline: float = float("inf"), root_fd: int | None = None) -> FsReport:
    """Remove everything inside the mount point `root`, keeping `root` itself.

    `device` is the st_dev the volume must have; `skip` are absolute paths of mounts nested in
    it (from the mount table), which are left alone, as is any directory that is a mount point
    (another device, or a bind mount of this one). Raises CleanError when anything is left,
    listing it, and when `stop` is set or the monotonic `deadline` passes. With `root_fd`,
    the directory already open there is cleaned (`root` only names it).
    """
    walk = _Walk(device, {posixpath.normpath(p) for p in skip}, stop, deadline)
    fd = os.dup(root_fd) if root_fd is not None else os.open(root, DIR_FLAGS)
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
                      label: str, stop: Callable[[], str] | None = None) -> None:
    """Run a block cleaner with LOCAL_PV_BLKDEVICE set (see `_run_child`)."""
    log.info("clean %s: running %s on %s", label, " ".join(command), device)
    code, _ = _run_child(list(command), {**os.environ, "LOCAL_PV_BLKDEVICE": device},
                         timeout, label, stop)
    if code != 0:
        raise CleanError(f"{command[0]} exited with status {code}")


def run_filesystem_cleaner(root_fd: int, root: str, device: int, skip: Sequence[str],  # noqa: PLR0913, PLR0917 - what the child needs, by name; one call site
                           timeout: float, label: str,
                           stop: Callable[[], str] | None = None) -> str:
    """Empty the directory open as `root_fd` in a child process (`python -m agent.cleaner`).

    A child, not a thread: a thread blocked on a frozen or hung filesystem is in an
    uninterruptible sleep that no signal ends, and it would hold the whole agent's exit with
    it. A child can be killed and left behind; it dies when the filesystem answers again.
    """
    argv = [sys.executable, "-m", "agent.cleaner", "--fd", str(root_fd), "--root", root,
            "--device", str(device), *[a for s in skip for a in ("--skip", s)]]
    code, lines = _run_child(argv, dict(os.environ), timeout, label, stop, pass_fds=(root_fd,))
    results = [line[len(RESULT):] for line in lines if line.startswith(RESULT)]
    if not results:
        raise CleanError(f"the filesystem cleaner exited with status {code} without a result")
    result = json.loads(results[-1])
    if code != 0 or not result.get("ok"):
        raise CleanError(str(result.get("detail", f"exit status {code}")))
    return str(result.get("detail", ""))


def run_fs_cleaner_command(command: Sequence[str], root_fd: int, root: str, timeout: float,  # noqa: PLR0913, PLR0917 - what the child needs, by name; one call site
                           label: str, stop: Callable[[], str] | None = None) -> None:
    """Run a class's `fsCleanerCommand` with LOCAL_PV_FS_PATH set to the volume's directory
    in the agent's container, as block cleaners get LOCAL_PV_BLKDEVICE (see `_run_child`).

    It starts in the directory open as `root_fd`, the one whose identity was just checked,
    so a command working on `.` cannot be sent elsewhere by a disk swapped meanwhile.
    """
    log.info("clean %s: running %s on %s", label, " ".join(command), root)
    code, _ = _run_child(list(command), {**os.environ, FS_PATH_ENV: root}, timeout, label,
                         stop, pass_fds=(root_fd,), cwd=f"/proc/self/fd/{root_fd}")
    if code != 0:
        raise CleanError(f"{command[0]} exited with status {code}")


FS_PATH_ENV = "LOCAL_PV_FS_PATH"
RESULT = "localpv-agent-clean-result: "


def _run_child(argv: list[str], env: dict[str, str], timeout: float, label: str,  # noqa: PLR0913, PLR0917 - the process, its bounds and its fds; every argument is used
               stop: Callable[[], str] | None, pass_fds: Sequence[int] = (),
               cwd: str | None = None) -> tuple[int, list[str]]:
    """Run a cleaner process at idle I/O priority, dying with the agent, its output streamed
    to the log. `stop` returns why to end it early ("" to go on): its whole process group is
    killed, as on timeout, and never waited for without a bound."""
    if shutil.which("ionice"):
        argv = ["ionice", "-c", "3", *argv]
    if shutil.which("setpriv"):  # the cleaner dies with the agent: a restart never races it
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    try:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=tuple(pass_fds), cwd=cwd)
    except OSError as exc:
        raise CleanError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    assert proc.stdout is not None
    stream = proc.stdout
    lines: list[str] = []

    def pump() -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if not line.startswith(RESULT):
                log.info("clean %s: %s", label, line)

    reader = threading.Thread(target=pump, name=f"clean-output {label}", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while (code := proc.poll()) is None:
            why = stop() if stop is not None else ""
            if why:
                raise CleanError(why)
            if time.monotonic() > deadline:
                raise CleanError(f"the cleaner did not finish within {timeout:g}s; killed")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)  # a child stuck on a frozen disk dies only when it thaws
        reader.join(2)
        if not reader.is_alive():  # else a stuck child still holds the pipe: leave it be
            stream.close()
    return code, lines


def _child_main(argv: Sequence[str]) -> int:
    """`python -m agent.cleaner`: the filesystem clean of `run_filesystem_cleaner`."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m agent.cleaner")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--device", type=int, required=True)
    parser.add_argument("--skip", action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    try:
        report = clean_filesystem(args.root, args.device, args.skip, root_fd=args.fd)
    except (CleanError, OSError) as exc:
        print(RESULT + json.dumps({"ok": False, "detail": str(exc)}), flush=True)
        return 1
    print(RESULT + json.dumps({"ok": True, "detail": report.summary()}), flush=True)
    return 0


def state_file_name(path: str, suffix: str) -> str:
    """A volume's file name in the state dir (dirty records, locks): the first 32 hex digits of
    the SHA-256 of its host path (any bytes, as surrogate escapes), a fixed-length name for any
    path. Existing state dirs hold these names: changing the scheme orphans their records."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()
    return digest[:32] + suffix


class DirtyStore:
    """Host paths of volumes that held a tenant's data and are not cleaned yet, each with the
    identity of the disk that held it.

    Kept on the host (the state dir), not on the PV: it must survive the PV being deleted.
    Read from the directory on every call, so agent instances sharing it (a twin during a
    rollout) see each other's marks and clears at once.
    """

    def __init__(self, state_dir: str) -> None:
        self.dir = Path(state_dir, "dirty")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._warned: set[str] = set()

    def records(self) -> dict[str, DirtyRecord]:
        found: dict[str, DirtyRecord] = {}
        for f in sorted(self.dir.glob("*.json")):
            try:
                raw = json.loads(f.read_text())
                identity = raw.get("identity")
                found[str(raw["path"])] = DirtyRecord(
                    str(raw["path"]), str(raw.get("pv", "")), str(raw.get("since", "")),
                    {str(k): str(v) for k, v in identity.items()}
                    if isinstance(identity, dict) else None)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                if f.name not in self._warned:  # a corrupt record still marks nothing clean
                    self._warned.add(f.name)
                    log.warning("unreadable dirty-volume record %s; its volume is unknown to "
                                "the agent: check it by hand", f)
        return found

    def paths(self) -> frozenset[str]:
        return frozenset(self.records())

    def get(self, path: str) -> DirtyRecord | None:
        return self.records().get(path)

    def mark(self, path: str, pv_name: str, identity: Mapping[str, str]) -> None:
        if self._file(path).exists():
            return
        record = {"path": path, "pv": pv_name, "identity": dict(identity),
                  "since": rfc3339(time.time())}
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
        log.info("volume %s holds data of PV %s: it is cleaned before being offered again",
                 path, pv_name)

    def clear(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(path).unlink()

    def file_of(self, path: str) -> Path:
        """Where a volume's record lives (for the manual step an operator may have to take)."""
        return self._file(path)

    def _file(self, path: str) -> Path:
        return self.dir / state_file_name(path, ".json")


@dataclass(frozen=True)
class DirtyRecord:
    path: str
    pv: str
    since: str
    identity: Mapping[str, str] | None  # None: written before identities were recorded


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
    identity: Mapping[str, str] = field(default_factory=dict)  # recorded: checked before wiping
    nested_mounts: tuple[str, ...] = ()
    capacity_bytes: int = 0
    via_job: bool = False  # cleaned by a Kubernetes Job (useJobForCleaning)
    fs_command: tuple[str, ...] = ()  # the class's fsCleanerCommand; empty: the built-in one


@dataclass(frozen=True)
class CleanOutcome:
    job: CleanJob
    ok: bool
    seconds: float
    detail: str
    busy: bool = False  # not attempted: another instance is cleaning it
    disk_changed: bool = False  # not attempted: a different disk is at the path


class DiskChangedError(CleanError):
    """The disk at the path is not the one recorded: nothing was touched."""


class VolumeLock:
    """A host-wide lock per volume (a lock file in the state dir, which every agent instance
    of the node shares): two agents never clean one volume at once, with a PV or without."""

    def __init__(self, lock_dir: Path | None, key: str) -> None:
        self.key = key
        self._fd: int | None = None
        if lock_dir is None:
            return
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / state_file_name(key, ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VolumeBusyError(key) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


@dataclass
class _Running:
    job: CleanJob
    lock: VolumeLock
    cancelled: str = ""  # why the clean must end, once it must
    ok: bool | None = None  # how it ended, once it has


class Cleaner:
    """Runs cleanings on a bounded set of workers; each volume's lock is held from the
    decision (`lock`) until the loop has acted on the outcome (`release`).

    Right before the first byte is removed, a worker re-checks under the lock what the
    decision assumed: `confirm` (the PV, or its absence, as decided; raises CleanError when
    not) and `identify` (the identity of the disk at the path now, read from the device).
    """

    def __init__(self, concurrency: int = 2, timeout: float = 6 * 3600.0, *,  # noqa: PLR0913 - settings and callbacks, all by keyword after two
                 identify: Callable[[CleanJob], Mapping[str, str]],
                 confirm: Callable[[CleanJob], None] | None = None,
                 on_done: Callable[[], None] | None = None,
                 mountinfo: str = "/proc/self/mountinfo",
                 lock_dir: str | None = None) -> None:
        self.timeout = timeout
        self.identify = identify
        self.confirm = confirm
        self.on_done = on_done
        self.mountinfo = mountinfo
        self.lock_dir = Path(lock_dir) if lock_dir else None
        self._stopping = False
        self._queue: queue.SimpleQueue[CleanJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._done: list[CleanOutcome] = []
        # Daemon threads: a worker stuck on a sick disk must never hold the agent's exit.
        self._workers = [threading.Thread(target=self._work, name=f"clean-{i}", daemon=True)
                         for i in range(max(1, concurrency))]
        for worker in self._workers:
            worker.start()

    def running(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._running)

    def lock(self, key: str) -> VolumeLock | None:
        """Take the volume's lock now, at the decision; None when another instance holds it."""
        try:
            return VolumeLock(self.lock_dir, key)
        except VolumeBusyError:
            return None

    def submit(self, job: CleanJob, lock: VolumeLock | None = None) -> bool:
        """Queue a clean; the lock (taken here when not given) passes to the cleaner."""
        with self._lock:
            if job.key in self._running or self._stopping:
                if lock is not None:
                    lock.release()
                return False
        if lock is None:
            lock = self.lock(job.key)
            if lock is None:
                log.info("clean %s: another agent on this node is cleaning it", job.key)
                self._finish(CleanOutcome(job, False, 0.0, "busy", busy=True))
                return True
        with self._lock:
            self._running[job.key] = _Running(job, lock)
        self._queue.put(job)
        return True

    def cancel(self, key: str, why: str) -> None:
        """End the clean of a volume, queued or running (a different disk is there now)."""
        with self._lock:
            entry = self._running.get(key)
            if entry is not None and not entry.cancelled:
                entry.cancelled = why
                log.warning("clean %s cancelled: %s", key, why)

    def collect(self) -> list[CleanOutcome]:
        """Finished outcomes. Their volumes stay locked and count as being cleaned until
        `release`, so a pass never sees a volume neither running nor finished."""
        with self._lock:
            done, self._done = self._done, []
            return done

    def release(self, key: str) -> None:
        """The loop has acted on the outcome (PV deleted, dirty record cleared, or failure
        recorded): the volume may be decided on again."""
        with self._lock:
            entry = self._running.pop(key, None)
        if entry is not None:
            entry.lock.release()

    def shutdown(self) -> None:
        """Stop: running cleans end (their processes are killed) and resume after a restart.
        Never waits for a worker stuck on a disk."""
        with self._lock:
            self._stopping = True
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + 1.5
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def _stop_reason(self, key: str) -> str:
        with self._lock:
            if self._stopping:
                return "stopped with the agent; the clean resumes after its restart"
            entry = self._running.get(key)
            return entry.cancelled if entry is not None else "no longer wanted"

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            outcome = self._clean(job)
            self._finish(outcome)

    def table(self) -> tuple[int, int, int]:
        """Cleans running, succeeded and failed, the last two until released (the upstream's
        process table counts the same way, for its `proctable_*` metrics)."""
        with self._lock:
            ends = [r.ok for r in self._running.values()]
        return ends.count(None), ends.count(True), ends.count(False)

    def _finish(self, outcome: CleanOutcome) -> None:
        with self._lock:
            self._done.append(outcome)
            entry = self._running.get(outcome.job.key)
            if entry is not None and not outcome.busy:
                entry.ok = outcome.ok
        if self.on_done is not None:
            try:
                self.on_done()
            except Exception:
                log.exception("clean completion callback failed")

    def _clean(self, job: CleanJob) -> CleanOutcome:
        started = time.monotonic()
        label = job.pv_name or job.key

        def failed(detail: str, **flags: bool) -> CleanOutcome:
            return CleanOutcome(job, False, time.monotonic() - started, detail, **flags)

        try:
            if why := self._stop_reason(job.key):
                raise CleanError(why)
            if self.confirm is not None:
                self.confirm(job)  # the decision still holds, checked under the lock
            detail = self._verify_and_clean(job, label)
        except DiskChangedError as exc:
            log.warning("clean %s not started: %s", label, exc)
            return failed(str(exc), disk_changed=True)
        except (CleanError, OSError) as exc:
            log.warning("clean %s failed: %s", label, exc)
            return failed(str(exc))
        except Exception as exc:  # a bug must fail this clean, not the worker
            log.exception("clean %s crashed", label)
            return failed(repr(exc))
        log.info("clean %s done: %s", label, detail)
        return CleanOutcome(job, True, time.monotonic() - started, detail)

    def check_identity(self, job: CleanJob) -> None:
        """The disk at the path now, read from the device itself, is the one recorded."""
        try:
            observed = self.identify(job)
        except Exception as exc:  # a hung or vanished disk: never wipe on a guess
            raise CleanError(f"cannot read the identity of the disk at {job.container_path}: "
                             f"{exc or type(exc).__name__}; not cleaning") from None
        verdict = compare(job.identity, observed, job.raw_device)
        if verdict.match is Match.DIFFERENT:
            raise DiskChangedError(f"a different disk is at {job.key} ({verdict.describe()}); "
                                   "it is not cleaned")
        if verdict.match is Match.UNKNOWN:
            raise CleanError(f"the disk at {job.key} cannot be recognised (recorded: "
                             f"{dict(job.identity) or 'nothing'}; found: "
                             f"{dict(observed) or 'nothing'}); not cleaning it automatically")

    def _verify_and_clean(self, job: CleanJob, label: str) -> str:
        path = posixpath.normpath(job.container_path)
        parent = posixpath.dirname(path)
        if parent != posixpath.normpath(job.mount_dir) or path == job.mount_dir:
            raise CleanError(f"{path} is not an entry of {job.mount_dir}; refusing to clean")

        def stop() -> str:
            return self._stop_reason(job.key)

        if job.raw_device:
            verify_block_device(path, job.device)
            self.check_identity(job)
            run_block_cleaner(job.command, path, self.timeout, label, stop)
            return f"{job.command[0]} succeeded"
        real = os.path.realpath(path)  # an entry may be a link to a mount in the same dir
        if posixpath.dirname(real) != posixpath.normpath(job.mount_dir):
            raise CleanError(f"{path} leads to {real}, outside {job.mount_dir}; refusing")
        # Open the root first and check what is open: a swap of the disk at the path after
        # this point cannot redirect the clean, which works on this descriptor alone.
        root_fd = os.open(real, DIR_FLAGS)
        try:
            st = os.fstat(root_fd)
            if not stat.S_ISDIR(st.st_mode) or _devno(st.st_dev) != job.device:
                raise CleanError(f"{real} is no longer the mount of device {job.device}; "
                                 "refusing")
            self.check_identity(job)
            # The mount table now, not when the clean was decided: a mount may have appeared.
            with open(self.mountinfo, encoding="utf-8", errors="surrogateescape") as f:
                nested = mounts_under(parse_mountinfo(f.read()), real)
            if job.fs_command:
                return self._run_fs_command(job, root_fd, real, st, label, stop)
            return run_filesystem_cleaner(root_fd, real, st.st_dev,
                                          [*job.nested_mounts, *nested], self.timeout, label,
                                          stop)
        finally:
            os.close(root_fd)

    def _run_fs_command(self, job: CleanJob, root_fd: int, real: str, st: os.stat_result,  # noqa: PLR0913, PLR0917 - one clean's already-checked facts, passed on unchanged
                        label: str, stop: Callable[[], str]) -> str:
        """The class's own filesystem cleaner; afterwards the mount point must still hold
        the same filesystem (a command that unmounted it fails the clean)."""
        run_fs_cleaner_command(job.fs_command, root_fd, real, self.timeout, label, stop)
        after = os.stat(real, follow_symlinks=False)
        if (after.st_dev, after.st_ino) != (st.st_dev, st.st_ino):
            raise CleanError(f"{job.fs_command[0]} left {real} no longer the mount of device "
                             f"{job.device}")
        return f"{job.fs_command[0]} succeeded"


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


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
