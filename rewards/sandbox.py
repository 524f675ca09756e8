"""Run untrusted Python on a plain Linux host: namespaces, an unprivileged uid, resource limits, timeouts.

The strongest level available is detected once (`isolation()`), or forced with R1_SANDBOX:
- "namespaces" (root + util-linux unshare): new network, PID and mount namespaces; fresh tmpfs on /tmp
  (the working directory), /var/tmp, /dev/shm and /run/lock; the program runs as a per-run unprivileged
  uid, so RLIMIT_NPROC holds; when the program exits or is killed, the kernel kills everything it started.
- "uid" (root, no namespaces): the same uid and limits in a fresh host temp directory; NO network isolation;
  leftovers are killed by uid after the run.
- "rlimits" (not root): limits and a temp directory only. See rewards/README.md for what each stops.
"""

from __future__ import annotations

import atexit
import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
RUNNER = (_HERE / "wire.py").read_text() + "\n" + (_HERE / "_runner.py").read_text()
_TMPFS_DIRS = ("/var/tmp", "/dev/shm", "/run/lock", "/tmp")  # every world-writable directory of the host


@functools.cache
def _fstab(mb: int) -> str:
    """One `mount -a` for all tmpfs mounts (one exec, not four). Its own source name, or `mount -a` skips
    a directory the host already has a tmpfs on (/dev/shm); /tmp comes last, since the file lives there."""
    fd, path = tempfile.mkstemp(prefix="r1-sandbox-fstab-")
    with os.fdopen(fd, "w") as f:
        for d in _TMPFS_DIRS:
            if os.path.isdir(d):
                f.write(f"r1-sandbox {d} tmpfs size={mb}m,mode=1777,nosuid,nodev 0 0\n")
    os.chmod(path, 0o644)
    atexit.register(os.unlink, path)
    return path
_NS = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--"]


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits; `cpu_s` is CPU seconds for the whole run (wall time is the caller's)."""

    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file, and size of each tmpfs
    nproc: int = 32
    nofile: int = 64
    output_bytes: int = 1 << 20  # stdout kept; more than this fails the run


_UIDS_RANGE = (61000, 61512)


class _Uids:
    """Each concurrent run gets its own uid: runs cannot signal or read each other, NPROC counts per run."""

    def __init__(self) -> None:
        self.free = list(range(*_UIDS_RANGE))
        self.lock = threading.Lock()

    def take(self) -> int:
        with self.lock:
            return self.free.pop(0)  # oldest first: a uid is reused as late as possible

    def give(self, uid: int) -> None:
        with self.lock:
            self.free.append(uid)


_UIDS = _Uids()


def _world_executable(path: str) -> bool:
    """Can an unprivileged user run this? (every directory on the way must be searchable by others)"""
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & 0o001 for d in [p, *p.parents]) and p.is_file()


@functools.cache
def sandbox_python() -> str:
    """An interpreter the sandbox uid can execute (pyenv under /root is not): the program sees stdlib only."""
    if os.geteuid() != 0:
        return sys.executable
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if cand and os.path.exists(cand) and _world_executable(cand):
            return cand
    raise RuntimeError("no Python interpreter executable by an unprivileged user; install python3")


def _argv(level: str, uid: int, lim: Limits) -> list[str]:
    cmd = [sandbox_python(), "-S", "-I", "-B", "-c", RUNNER]
    limits = [f"--cpu={lim.cpu_s}", f"--as={lim.memory_mb << 20}", f"--fsize={lim.file_mb << 20}",
              f"--nofile={lim.nofile}", f"--nproc={lim.nproc}", "--core=0"]
    if level in ("namespaces", "uid"):  # prlimit before setpriv: NPROC binds once the uid is not root
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--", *cmd]
    cmd = ["prlimit", *limits, "--", *cmd]
    if level == "namespaces":
        mounts = f"mount -a -T {_fstab(lim.file_mb * 4)} && cd /tmp && exec \"$@\""
        cmd = [*_NS, "/bin/sh", "-c", mounts, "sh", *cmd]
    return cmd


class Run:
    """One sandboxed program. The header (code, mode) is sent at start; then `exchange` talks to it."""

    def __init__(self, code: str, mode: str, limits: Limits = Limits(), level: str | None = None) -> None:
        import json

        self.level = level or isolation()
        self.limits = limits
        self.uid = _UIDS.take()
        self.workdir = None
        if self.level != "namespaces":
            self.workdir = tempfile.mkdtemp(prefix="r1-sandbox-")
            if self.level == "uid":
                os.chown(self.workdir, self.uid, self.uid)
            os.chmod(self.workdir, 0o700)
        self.proc = subprocess.Popen(_argv(self.level, self.uid, limits), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=self.workdir,
                                     start_new_session=True, close_fds=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        os.set_blocking(self.proc.stdin.fileno(), False)
        header = json.dumps({"code": code, "mode": mode}).encode()
        self._out = bytearray(len(header).to_bytes(8, "little") + header)
        self._buf = bytearray()

    def exchange(self, data: bytes, deadline: float, until_newline: bool, close_stdin: bool = False) -> bytes | None:
        """Send `data`, then read stdout up to a newline or EOF. None on timeout or oversized output."""
        self._out += data
        if close_stdin and not self._out and not self.proc.stdin.closed:
            self.proc.stdin.close()
        fd_in, fd_out = self.proc.stdin, self.proc.stdout.fileno()
        while True:
            if until_newline and (k := self._buf.find(b"\n")) >= 0:
                line = bytes(self._buf[:k + 1])
                del self._buf[:k + 1]
                return line
            if len(self._buf) > self.limits.output_bytes:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            wr = [fd_in] if self._out and not fd_in.closed else []
            r, w, _ = select.select([fd_out], wr, [], left)
            if w:
                try:
                    del self._out[:os.write(fd_in.fileno(), self._out[:1 << 16])]
                except BlockingIOError:
                    pass
                except BrokenPipeError:  # it stopped reading (exited): its output still decides
                    self._out.clear()
                if not self._out and close_stdin:
                    fd_in.close()
            if r:
                chunk = os.read(fd_out, 1 << 16)
                if not chunk:  # EOF: the program ended (or closed stdout)
                    if until_newline:
                        return None
                    out = bytes(self._buf)
                    self._buf.clear()
                    return out
                self._buf += chunk

    def returncode(self, deadline: float) -> int | None:
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Kill the whole process group (in a PID namespace, killing it takes every descendant along)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc.wait()
        if self.level == "uid":  # no PID namespace: a daemonised child escaped the group; kill all of its uid
            subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--",
                            "kill", "-9", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _UIDS.give(self.uid)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _probe(level: str) -> bool:
    """Does this level work here? Runs a tiny program that must see no network interface but loopback."""
    code = "import os, socket\nprint(os.getuid(), sorted(n for _, n in socket.if_nameindex()))"
    try:
        with Run(code, "stdio", level=level) as run:
            out = run.exchange(b"", time.monotonic() + 20, until_newline=False, close_stdin=True)
    except (OSError, RuntimeError):
        return False
    if not out:
        return False
    uid, ifaces = out.decode().split(" ", 1)
    return (level == "rlimits" or uid != "0") and (level != "namespaces" or ifaces.strip() == "['lo']")


LEVELS = ("namespaces", "uid", "rlimits")


@functools.cache
def isolation() -> str:
    """The isolation level in use: R1_SANDBOX if set, else the strongest that works on this machine."""
    forced = os.environ.get("R1_SANDBOX")
    if forced:
        if forced not in LEVELS:
            raise ValueError(f"R1_SANDBOX must be one of {LEVELS}, got {forced!r}")
        return forced
    candidates = LEVELS if os.geteuid() == 0 else ("rlimits",)
    for level in candidates:
        if shutil.which("prlimit") and (level == "rlimits" or shutil.which("setpriv")) and _probe(level):
            return level
    raise RuntimeError("no sandbox level works here (need util-linux prlimit)")
