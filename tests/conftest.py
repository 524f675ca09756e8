import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (tests/_v3ref.py)
torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
