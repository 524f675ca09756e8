"""Build and load r1's small C kernels (r1/cpu/hc_kernels.c, moe_kernels.c) with the system C compiler, through
ctypes.

Why C and ctypes: the kernels are plain loops over fp32 arrays (no torch headers), so `cc -O3 -march=native
-fopenmp -shared` builds them in well under a second on first use (a torch C++ extension takes a minute), and
ctypes releases the GIL for the call. The library links libgomp.so.1, the soname of the OpenMP runtime torch
ships and has already loaded, so the kernels share torch's thread pool and honour torch.set_num_threads.

The built library is cached under $R1_CACHE (default ~/.cache/r1), keyed by the source, the flags and the
CPU's instruction-set flags (-march=native), written to a temporary name and renamed, so concurrent ranks
never load a half-written file. No compiler, or a failed build: `kernels()` returns None once, with a warning
naming the reason, and callers keep their torch paths (`R1_NO_CEXT=1` asks for that on purpose).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name(name) for name in ("hc_kernels.c", "moe_kernels.c")]
# -ffp-contract=fast: a * b + c as one FMA (ISO C modes such as -std=c11 otherwise keep them apart)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11"]
LIBS = ["-lm"]
FALLBACK = "HC's stream mixing and small-MoE decoding run on torch ops (slower)"
MAX_STREAMS = 16  # the kernels' stack arrays (MAX_N, MAX_SQ in hc_kernels.c) hold this many streams
_L, _F = ctypes.c_long, ctypes.c_float
# name -> (number of tensor arguments, the scalars after them)
SIGNATURES = {"hc_combine": (5, [_L] * 3), "hc_write_bwd": (5, [_L] * 3),  # N, n, D
              "hc_read_fwd": (14, [_F] + [_L] * 4), "hc_read_bwd": (19, [_L] * 4),  # (eps,) N, n, D, iters
              "hc_proj_wgrad": (7, [_L] * 3),  # N, n, D
              "moe_decode": (9, [_L] * 6)}  # N, K, E, D, I, Is


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


@cache
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (R1_NO_CEXT=1, no C compiler, a failed build or load)."""
    if os.environ.get("R1_NO_CEXT") == "1":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        warnings.warn(f"r1: no C compiler (cc/gcc) found: {FALLBACK}", stacklevel=2)
        return None
    src = b"".join(f.read_bytes() for f in SOURCES)
    key = hashlib.sha256(src + " ".join([cc, *FLAGS, *LIBS]).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = Path(os.environ.get("R1_CACHE", Path.home() / ".cache" / "r1")) / f"r1_kernels-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_so = Path(tmp) / out.name
                subprocess.run([cc, *FLAGS, *map(str, SOURCES), *LIBS, "-o", str(tmp_so)], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(tmp_so, out)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            names = ", ".join(f.name for f in SOURCES)
            warnings.warn(f"r1: building {names} failed ({detail.strip()[:300]}): {FALLBACK}", stacklevel=2)
            return None
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:  # e.g. a cache file from another toolchain
        warnings.warn(f"r1: loading {out} failed ({e}): {FALLBACK}", stacklevel=2)
        return None
    for name, (n_tensors, scalars) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * n_tensors + scalars
        fn.restype = None
    return lib


def fits(n: int, *ts: Tensor) -> bool:
    """True where the kernels apply: n streams at most MAX_STREAMS, every tensor fp32, contiguous, on the CPU,
    and the library loaded."""
    return n <= MAX_STREAMS and \
        all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts) and \
        kernels() is not None


def call(name: str, tensors: list[Tensor], *scalars: float) -> None:
    """Run kernel `name` on the tensors' storage (each checked by `fits` beforehand), then its scalars (SIGNATURES)."""
    getattr(kernels(), name)(*(t.data_ptr() for t in tensors), *scalars)
