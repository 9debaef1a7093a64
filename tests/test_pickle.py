"""Pickle checkpoints are untrusted: refused by default, and with allow_pickle=True loaded as weights only."""
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flashmem


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def pickle_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    model = llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder)  # config.json + model.safetensors
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model, folder


def test_pickle_checkpoint_is_refused_by_default(pickle_folder):
    _, folder = pickle_folder
    with pytest.raises(flashmem.BadModelFolder) as err:
        flashmem.from_pretrained(folder, budget="1MiB")
    message = str(err.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "allow_pickle=True" in message


def test_allow_pickle_loads_weights_only_and_streams_exactly(pickle_folder):
    model, folder = pickle_folder
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        ref = model(ids).logits
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    sm = flashmem.from_pretrained(folder, budget=total // 2, allow_pickle=True, example_inputs=(ids,))
    with torch.no_grad():
        assert torch.equal(sm(ids).logits, ref)
    assert sm.plan.loads  # it streams
    sm.close()


class Boom:
    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_a_pickle_that_is_not_weights_only_is_refused_even_when_allowed(pickle_folder):
    _, folder = pickle_folder
    torch.save({"model.embed_tokens.weight": Boom()}, folder / "pytorch_model.bin")
    with pytest.raises(flashmem.BadModelFolder, match="weights only"):
        flashmem.from_pretrained(folder, budget="1MiB", allow_pickle=True)
