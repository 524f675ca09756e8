"""Models the tests export once per module: a fresh native V3 of a preset, in HF format with the char tokenizer."""

from pathlib import Path

import pytest
import torch

from r1.model.config import load_config
from r1.model.model import V3ForCausalLM
from r1.policy import export
from r1.tokenizer import load_tokenizer


def exported(tmp_path_factory: pytest.TempPathFactory, preset: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    d = tmp_path_factory.mktemp(preset)
    export(V3ForCausalLM(load_config(preset)), load_tokenizer("char"), d)
    return d
