"""r1.policy, the one home for policies: resolve a model, load it (the native V3 model for DeepSeek-V3 checkpoints,
transformers for any other causal LM), export it in HF format, and hand its weights to a separate engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models import exported
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from r1.model.config import load_config
from r1.model.hf import load_state
from r1.model.model import V3ForCausalLM
from r1.policy import build_model, engine_weights, export, load_policy, resolve_model
from r1.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    export(LlamaForCausalLM(cfg), load_tokenizer("char"), d)
    return d


def test_resolve_local_and_missing(v3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model(str(v3_dir)) == v3_dir
    for missing in (str(tmp_path / "nothing"), "./rel/path/x", "no-slash-name", str(tmp_path)):
        with pytest.raises(FileNotFoundError, match="not found"):
            resolve_model(missing)
    # a hub-shaped name with the hub unreachable (offline: no download in tests) is one line naming it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("no-such-owner/no-such-model")
    assert "'no-such-owner/no-such-model' is not a local directory and the hub gave" in str(e.value)
    assert "\n" not in str(e.value)


def test_native_round_trip(v3_dir: Path, tmp_path: Path) -> None:
    """A DeepSeek-V3 directory loads as the native model; export then load gives the same tensors, and an export
    from a given state dict (a sharded model's gathered weights) writes those instead of the module's."""
    m = load_policy(str(v3_dir))
    assert isinstance(m, V3ForCausalLM)
    export(m, load_tokenizer("char"), tmp_path / "again")
    again = load_policy(str(tmp_path / "again"))
    sd, sd2 = m.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    export(m, load_tokenizer("char"), tmp_path / "zeros", state_dict=zeros)
    assert all(not v.is_floating_point() or v.abs().sum() == 0
               for v in load_policy(str(tmp_path / "zeros")).state_dict().values())
    assert load_policy(str(v3_dir), dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_transformers_causal_lm(llama_dir: Path, tmp_path: Path) -> None:
    """Any other model_type loads through transformers and exports with save_pretrained: the same logits as the
    model transformers loads itself."""
    m = load_policy(str(llama_dir))
    assert isinstance(m, LlamaForCausalLM)
    export(m, load_tokenizer("char"), tmp_path / "out")
    ref = AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_policy(str(tmp_path / "out"))(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_build_model_preset_or_directory(v3_dir: Path) -> None:
    m = build_model("tiny")
    assert isinstance(m, V3ForCausalLM) and m.config == load_config("tiny")
    assert isinstance(build_model(str(v3_dir)), V3ForCausalLM)


def test_bad_config_json_names_the_file(v3_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    for text, why in (("{not json", "is not valid JSON"), ("[1, 2]", "is not a JSON object")):
        (d / "config.json").write_text(text)
        with pytest.raises(ValueError) as e:
            load_policy(str(d))
        assert str(e.value).startswith(f"{d / 'config.json'} {why}") and "\n" not in str(e.value)


class _Engine:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model


def test_engine_weights(v3_dir: Path, llama_dir: Path) -> None:
    """Nothing for an engine that holds the policy itself; otherwise HF-named tensors that bring a separate copy to
    the policy's weights (native: the names of the checkpoint files; transformers: its state dict)."""
    policy = load_policy(str(v3_dir))
    assert engine_weights(policy, _Engine(policy)) == []
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    other = load_policy(str(v3_dir))
    named = engine_weights(policy, _Engine(other))
    from safetensors import safe_open

    on_disk = {k for f in v3_dir.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}  # noqa: SIM118
    assert {k for k, _ in named} == on_disk
    load_state(named, other)
    a, b = policy.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    llama = load_policy(str(llama_dir))
    assert [k for k, _ in engine_weights(llama, _Engine(None))] == list(llama.state_dict())
