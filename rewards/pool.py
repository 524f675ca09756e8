"""Long-lived worker processes with a per-item wall-clock timeout; a worker that overruns or dies is replaced.

concurrent.futures can neither time out nor kill one task, and a dead worker breaks the whole pool. Here the
parent sends chunks of items, each worker streams back one result per item, and the parent keeps a deadline
per item: past it (or on a crash) the worker is killed, that item gets `default`, and the rest of its chunk
goes to the next free worker. Workers are fresh interpreters (`python -c`), never forks, so a trainer
holding threads or CUDA state is never forked and its __main__ is never re-imported.
"""

from __future__ import annotations

import atexit
import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

_HDR = struct.Struct("<I")
_READY = "__ready__"
_ROOT = str(Path(__file__).resolve().parents[1])  # so `rewards` imports in the child however it was found


def load(path: str) -> Callable:
    """'package.module:function' -> the function."""
    mod, _, name = path.partition(":")
    return getattr(import_module(mod), name)


def end_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads (started with start_new_session), close its pipes, reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for f in (proc.stdin, proc.stdout):
        try:
            if f is not None:
                f.close()
        except OSError:
            pass
    proc.wait()


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HDR.pack(len(data)) + data


def _serve(target: str, memory_mb: int | None, soft_timeout: float) -> None:
    """Worker main loop: read chunks from stdin, write one framed result per item to the original stdout."""
    import logging
    import resource

    if memory_mb:  # a runaway big-integer or matrix blows this worker's limit, never the host
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    logging.disable(logging.CRITICAL)  # math-verify logs every unparsable answer
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a stray print() in the target must not corrupt the result channel
    inp = sys.stdin.buffer

    fired = [False]

    def on_alarm(*_: Any) -> None:
        fired[0] = True
        raise TimeoutError

    # The soft alarm ends Python-level runaways cheaply; C-level ones (huge powers) need the parent's kill.
    signal.signal(signal.SIGALRM, on_alarm)
    fn = load(target)
    # A target's module may define worker_init() to import and warm what its first item would otherwise pay for
    # under that item's timeout (math-verify's import and first parse: ~0.3 s here, most of a short timeout).
    init = getattr(sys.modules[fn.__module__], "worker_init", None)
    if init is not None:
        init()
    out.write(_frame(_READY))
    while (hdr := inp.read(_HDR.size)) and len(hdr) == _HDR.size:
        for item in pickle.loads(inp.read(_HDR.unpack(hdr)[0])):
            fired[0] = False
            try:
                signal.setitimer(signal.ITIMER_REAL, soft_timeout)
                result = fn(item)
            except BaseException:  # noqa: BLE001 - MemoryError, RecursionError, TimeoutError all score default
                result = None
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            # A target may swallow the TimeoutError and return what it had (math-verify falls back to another
            # extraction mid-parse, which once turned "\sum_{k=1}^{10^{12}} k^k" into 1): an interrupted item
            # never counts.
            out.write(_frame(None if fired[0] else result))


class _Worker:
    def __init__(self, target: str, memory_mb: int | None, soft_timeout: float) -> None:
        code = f"import sys; sys.path.insert(0, {_ROOT!r}); from rewards.pool import _serve; " \
               f"_serve({target!r}, {memory_mb!r}, {soft_timeout!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.buf = bytearray()
        self.ready = False
        self.pending: deque[int] = deque()  # indices sent to this worker, answered in order
        self.deadline = math.inf

    def send(self, payload: list) -> None:
        self.proc.stdin.write(_frame(payload))
        self.proc.stdin.flush()

    def frames(self) -> list | None:
        """Read what is available; the complete frames, or None at EOF (the worker died)."""
        data = os.read(self.fd, 1 << 20)
        if not data:
            return None
        self.buf += data
        out = []
        while len(self.buf) >= _HDR.size and len(self.buf) >= _HDR.size + (n := _HDR.unpack_from(self.buf)[0]):
            out.append(pickle.loads(self.buf[_HDR.size:_HDR.size + n]))
            del self.buf[:_HDR.size + n]
        return out

    def kill(self) -> None:
        end_group(self.proc)


class WorkerPool:
    """`map(items)` runs `target(item)` for each item in `workers` processes; timeouts and crashes give `default`.

    `timeout` bounds each item (wall clock); `memory_mb` is each worker's address-space limit. Calls from
    several threads are serialised. Counters `timeouts` and `crashes` help tests and logs.
    """

    def __init__(self, target: str, workers: int = 2, timeout: float = 3.0, memory_mb: int | None = 2048,
                 chunk: int = 64, start_timeout: float = 60.0) -> None:
        self.target, self.workers, self.timeout, self.memory_mb = target, workers, timeout, memory_mb
        self.chunk, self.start_timeout = chunk, start_timeout
        self.timeouts = self.crashes = 0
        self._lock = threading.Lock()
        self._pool: list[_Worker] = []

    def _spawn(self) -> _Worker:
        w = _Worker(self.target, self.memory_mb, max(0.05, 0.8 * self.timeout))
        w.deadline = time.monotonic() + self.start_timeout
        return w

    def map(self, items: Sequence[Any], default: Any = None) -> list:
        n = len(items)
        results = [default] * n
        if not n:
            return results
        size = max(1, min(self.chunk, math.ceil(n / (4 * self.workers))))  # small enough to balance the load
        todo = deque(list(range(i, min(i + size, n))) for i in range(0, n, size))
        with self._lock:
            while len(self._pool) < self.workers:
                self._pool.append(self._spawn())
            pool = self._pool

            def fail(k: int, timed_out: bool) -> None:
                w = pool[k]
                w.kill()
                if not w.ready:  # it never got to serve: the target does not import; retrying would spin
                    pool[k] = self._spawn()
                    raise RuntimeError(f"worker for {self.target} failed to start (exit {w.proc.returncode})")
                if w.pending:
                    results[w.pending.popleft()] = default
                    self.timeouts += timed_out
                    self.crashes += not timed_out
                if w.pending:
                    todo.appendleft(list(w.pending))
                pool[k] = self._spawn()

            while todo or any(w.pending for w in pool):
                now = time.monotonic()
                for w in pool:
                    if w.ready and not w.pending and todo:
                        w.pending.extend(todo.popleft())
                        w.deadline = now + self.timeout
                        try:
                            w.send([items[i] for i in w.pending])
                        except OSError:  # died between chunks; the EOF below replaces it
                            pass
                wait = max(0.0, min(w.deadline for w in pool) - now)
                ready, _, _ = select.select([w.fd for w in pool], [], [], wait)
                for k, w in enumerate(pool):
                    if w.fd in ready:
                        got = w.frames()
                        if got is None:
                            fail(k, timed_out=False)
                            continue
                        for r in got:
                            if not w.ready and r == _READY:
                                w.ready = True
                            elif w.pending:
                                results[w.pending.popleft()] = r
                        if w.ready:
                            w.deadline = time.monotonic() + self.timeout if w.pending else math.inf
                now = time.monotonic()
                for k, w in enumerate(pool):
                    if w.deadline < now:
                        fail(k, timed_out=w.ready)
        return results

    def close(self) -> None:
        with self._lock:
            for w in self._pool:
                w.kill()
            self._pool.clear()


_POOLS: dict[tuple, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(target: str, workers: int, timeout: float, memory_mb: int | None = 2048) -> WorkerPool:
    """One long-lived pool per configuration, created on first use and shut down at exit."""
    key = (target, workers, timeout, memory_mb)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = WorkerPool(target, workers, timeout, memory_mb)
        return _POOLS[key]


@atexit.register
def close_pools() -> None:
    """Stop every shared pool's workers; a later call to a pool starts fresh ones."""
    with _POOLS_LOCK:
        for p in _POOLS.values():
            p.close()


