"""Run a script in N gloo processes with torchrun (the way `accelerate launch` starts them on a CPU)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, tmp_path: Path, *args: str, nproc: int = 2, fsdp: bool = False,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """`script` (Python source) run by `nproc` ranks; FSDP2 as accelerate's FSDP config turns it on. Fails the test
    with the ranks' stderr when a rank fails."""
    path = tmp_path / "launched.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true" if fsdp else "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(path),
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r
