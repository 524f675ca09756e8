"""Run untrusted Python on a plain Linux host: namespaces, a private root, an unprivileged uid, limits, timeouts.

The strongest level available is detected once (`isolation()`), or forced with R1_SANDBOX:
- "namespaces" (root + util-linux unshare and mount): new network, PID and mount namespaces; the program is
  chrooted into a root that holds only the Python installation (read-only, nosuid) and a fresh tmpfs /tmp (its
  working directory) and /dev/shm, plus /proc of its own PID namespace and five character devices; it runs as a
  per-run unprivileged uid, so RLIMIT_NPROC holds; when it exits or is killed, the kernel kills all it started.
- "uid" (root, no namespaces): the same uid and limits in a fresh host temp directory; NO network or file
  isolation; leftovers are killed by uid after the run.
- "rlimits" (not root): limits and a temp directory only. See rewards/README.md for what each stops.
Every level starts the program with a minimal environment (PATH, LANG, HOME): no token of the trainer's.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import resource
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

from rewards.pool import end_group

_HERE = Path(__file__).resolve().parent
RUNNER = (_HERE / "wire.py").read_text() + "\n" + (_HERE / "_runner.py").read_text()
_PATH = "/usr/local/bin:/usr/bin:/bin"
_NS = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--"]
_DEVICES = ("null", "zero", "full", "random", "urandom")
_HOST_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # merged-/usr symlinks, or directories to bind


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits; `cpu_s` is CPU seconds for the whole run (wall time is the caller's)."""

    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file, and size of each tmpfs
    nproc: int = 32
    nofile: int = 64
    output_bytes: int = 1 << 20  # stdout kept; more than this fails the run

    def rlimits(self) -> list[tuple[int, int]]:
        """(resource, value) pairs the sandboxed interpreter sets on itself before the program runs."""
        return [(resource.RLIMIT_CPU, self.cpu_s), (resource.RLIMIT_AS, self.memory_mb << 20),
                (resource.RLIMIT_FSIZE, self.file_mb << 20), (resource.RLIMIT_NOFILE, self.nofile),
                (resource.RLIMIT_NPROC, self.nproc), (resource.RLIMIT_CORE, 0)]


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


def _python_dirs() -> list[str]:
    """The Python installation the program may see: /usr (libc, the loader, /bin/sh) and the interpreter's
    prefixes and directory, at their host paths so that its sys.path stays valid after the chroot."""
    py = sandbox_python()
    out = subprocess.run([py, "-S", "-I", "-c", "import sys; print(sys.base_prefix); print(sys.base_exec_prefix)"],
                         capture_output=True, text=True, env={"PATH": _PATH}, check=True).stdout.split("\n")
    dirs = sorted({"/usr", os.path.dirname(os.path.realpath(py)), *(os.path.realpath(d) for d in out if d)})
    keep: list[str] = []
    for d in dirs:  # sorted: a parent comes before its children
        if d != "/" and not any(d.startswith(k + "/") for k in keep):
            keep.append(d)
    return keep


_ROOT_LOCK = threading.Lock()
_LIVE: set[int] = set()  # pids of the runs not yet closed
_LIVE_LOCK = threading.Lock()


def _root(tmpfs_mb: int) -> tuple[str, str]:
    with _ROOT_LOCK:  # concurrent first runs build it once
        return _build_root(tmpfs_mb)


@functools.cache
def _build_root(tmpfs_mb: int) -> tuple[str, str]:
    """A skeleton root (mount points only, root-owned, built once) and the fstab that fills it in each run's
    mount namespace: one `mount -a` (one exec) for every mount; /tmp of the root is mounted first."""
    root = tempfile.mkdtemp(prefix="r1-sandbox-root-")
    atexit.register(shutil.rmtree, root, True)
    binds = _python_dirs()
    for d in ("tmp", "proc", "dev/shm", *(b.lstrip("/") for b in binds)):
        os.makedirs(f"{root}/{d}")
    lines = [f"r1-sandbox {root}/tmp tmpfs size={tmpfs_mb}m,mode=1777,nosuid,nodev 0 0"]
    for d in binds:
        lines.append(f"{d} {root}{d} none bind,ro,nosuid,nodev 0 0")
    for name in _HOST_LINKS:
        host = f"/{name}"
        if os.path.islink(host):
            os.symlink(os.readlink(host), f"{root}/{name}")
        elif os.path.isdir(host) and host not in binds:
            os.makedirs(f"{root}{host}")
            lines.append(f"{host} {root}{host} none bind,ro,nosuid,nodev 0 0")
    for dev in _DEVICES:
        Path(root, "dev", dev).touch()
        lines.append(f"/dev/{dev} {root}/dev/{dev} none bind,nosuid,noexec 0 0")
    if os.path.exists("/etc/ld.so.cache"):  # where the loader finds the libraries of C extension modules
        os.makedirs(f"{root}/etc")
        Path(root, "etc", "ld.so.cache").touch()
        lines.append(f"/etc/ld.so.cache {root}/etc/ld.so.cache none bind,ro,nosuid,nodev 0 0")
    lines.append(f"r1-sandbox {root}/dev/shm tmpfs size={tmpfs_mb}m,mode=1777,nosuid,nodev 0 0")
    lines.append(f"proc {root}/proc proc nosuid,nodev,noexec 0 0")
    fd, fstab = tempfile.mkstemp(prefix="r1-sandbox-fstab-")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(fstab, 0o644)
    atexit.register(os.unlink, fstab)
    os.chmod(root, 0o755)
    return root, fstab


def _env(home: str) -> dict[str, str]:
    """All the program's environment: nothing of the trainer's (tokens for hubs and trackers live there)."""
    return {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": home}


def _argv(level: str, uid: int, lim: Limits) -> list[str]:
    """The runner sets its own limits, chroot and uid (`_confine` in rewards/_runner.py) before it reads the
    program: two execs fewer than prlimit and setpriv, and the chroot needs root after the mounts."""
    root, fstab = _root(lim.file_mb * 4) if level == "namespaces" else ("", "")
    conf = {"rlimits": lim.rlimits(), "uid": uid if level in ("namespaces", "uid") else None, "root": root,
            "no_new_privs": level in ("namespaces", "uid")}  # no setuid binary gives the uid back (nosuid too)
    cmd = [sandbox_python(), "-S", "-I", "-B", "-c", RUNNER, json.dumps(conf)]
    if level == "namespaces":
        cmd = [*_NS, "/bin/sh", "-c", f"mount -a -T {fstab} && exec \"$@\"", "sh", *cmd]
    return cmd



class Run:
    """One sandboxed program. The header (code, mode) is sent at start; then `exchange` talks to it."""

    def __init__(self, code: str, mode: str, limits: Limits = Limits(), level: str | None = None) -> None:
        self.level = level or isolation()
        self.limits = limits
        self.uid = _UIDS.take()
        self.workdir = None
        if self.level != "namespaces":
            self.workdir = tempfile.mkdtemp(prefix="r1-sandbox-")
            if self.level == "uid":
                os.chown(self.workdir, self.uid, self.uid)
            os.chmod(self.workdir, 0o700)
        with _LIVE_LOCK:  # registered before reap_orphans can see it exit: its status is this run's to read
            self.proc = subprocess.Popen(_argv(self.level, self.uid, limits), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=self.workdir,
                                         env=_env(self.workdir or "/tmp"), start_new_session=True, close_fds=True)
            _LIVE.add(self.proc.pid)
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
        """Kill the program and everything it started, and reap them."""
        if self.level == "namespaces":
            # Kill the namespace's init, not unshare: unshare then reaps it. Killed together, the init would be
            # orphaned to PID 1, which is the trainer itself in a container (and never waits for it).
            try:
                init = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                for pid in init:
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        end_group(self.proc)
        with _LIVE_LOCK:
            _LIVE.discard(self.proc.pid)
        if self.level == "uid":  # no PID namespace: a daemonised child escaped the group; kill all of its uid
            subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--",
                            "kill", "-9", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={"PATH": _PATH})
        if self.level != "rlimits":
            reap_orphans()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _UIDS.give(self.uid)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reap_orphans() -> None:
    """Wait for zombie children of this process that ran as a sandbox uid: processes a program detached are
    re-parented to PID 1 when killed, and PID 1 is the trainer when it runs as a container's entry point. A live
    run's own process is left to its Run, which reads its exit status."""
    with _LIVE_LOCK:
        _reap_orphans()


def _reap_orphans() -> None:
    for task in os.scandir("/proc/self/task"):
        try:
            kids = Path(task.path, "children").read_text().split()
        except OSError:
            continue
        for pid in kids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                zombie = "\nState:\tZ" in status
                uid = int(status.split("\nUid:")[1].split()[0])
            except (OSError, IndexError, ValueError):
                continue
            if zombie and _UIDS_RANGE[0] <= uid < _UIDS_RANGE[1] and int(pid) not in _LIVE:
                try:
                    os.waitpid(int(pid), os.WNOHANG)
                except ChildProcessError:
                    pass


def _probe(level: str) -> bool:
    """Does this level work here? A tiny program must run as another uid and, with namespaces, see no network
    interface but loopback and no host file (/etc is not in its root)."""
    code = "import os, socket\nprint(os.getuid(), os.path.exists('/etc/passwd'), " \
           "sorted(n for _, n in socket.if_nameindex()))"
    try:
        with Run(code, "stdio", level=level) as run:
            out = run.exchange(b"", time.monotonic() + 20, until_newline=False, close_stdin=True)
    except (OSError, RuntimeError, subprocess.CalledProcessError):
        return False
    if not out:
        return False
    uid, etc, ifaces = out.decode().split(" ", 2)
    return (level == "rlimits" or uid != "0") and \
        (level != "namespaces" or (ifaces.strip() == "['lo']" and etc == "False"))


LEVELS = ("namespaces", "uid", "rlimits")
_TOOLS = {"namespaces": ("unshare", "mount"), "uid": ("setpriv",), "rlimits": ()}


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
        if all(shutil.which(t, path=_PATH) for t in _TOOLS[level]) and _probe(level):
            return level
    raise RuntimeError("no sandbox level works here")
