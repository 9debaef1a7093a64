"""Shared fixtures and helpers for the flashmem tests.

Every model here is built from a small config with random weights (nothing is downloaded). A model
factory is seeded, so calling it twice gives two models with the same weights: `flashmem.stream` takes
a model's weights away, so a test that needs the model again (or a reference output) builds it again.
References are always computed with every weight resident, BEFORE the model is handed to flashmem.
"""
from __future__ import annotations

import functools
import gc
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import flashmem

try:  # transformers warns about special-token ids outside the tiny vocabularies; keep the output clean
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except Exception:  # pragma: no cover
    pass

VOCAB = 512
HF_KINDS = ("gpt2", "neo", "llama")
ALL_KINDS = HF_KINDS + ("mlp", "cnn", "nested")


# -- models -----------------------------------------------------------------------------------------------
def hf_config(kind: str, **overrides):
    """A small transformers config of the given shape (GPT-Neo with a global and a local attention layer)."""
    from transformers import GPT2Config, GPTNeoConfig, LlamaConfig

    if kind == "gpt2":
        args = dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                    eos_token_id=0)
        cls = GPT2Config
    elif kind == "neo":
        args = dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=4,
                    attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=0, eos_token_id=0)
        cls = GPTNeoConfig
    elif kind == "llama":
        args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                    eos_token_id=0)
        cls = LlamaConfig
    else:
        raise ValueError(kind)
    args.update(overrides)
    return cls(**args)


def hf_model(kind: str, seed: int = 0, dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    from transformers import GPT2LMHeadModel, GPTNeoForCausalLM, LlamaForCausalLM

    cls = {"gpt2": GPT2LMHeadModel, "neo": GPTNeoForCausalLM, "llama": LlamaForCausalLM}[kind]
    config = hf_config(kind, **overrides)
    torch.manual_seed(seed)
    model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 64),
                         nn.ReLU(), nn.Linear(64, 8))


class CNN(nn.Module):
    """conv + batchnorm (eval, non-trivial running stats) + pooling + linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.1, 0.1)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.gap(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.flatten(1))


class Block(nn.Module):
    """A container that uses its own parameter around its children: its weight must stay in place
    across the ops nested in it, and after the last of them (the sleep stands for the container's own
    work after its last child, long enough for an IO thread running ahead to show any early overwrite)."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(width))
        self.lin1 = nn.Linear(width, 2 * width)
        self.lin2 = nn.Linear(2 * width, width)

    def forward(self, x):
        h = self.lin2(torch.tanh(self.lin1(x * self.scale)))
        time.sleep(0.02)
        return h + x * self.scale


class Nested(nn.Module):
    """Containers with their own weights, a module called twice (non-consecutively) and a weight tied
    between two modules."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.shared = nn.Linear(32, 32)
        self.blocks = nn.ModuleList([Block(32), Block(32)])
        self.tied = nn.Linear(32, 32)
        self.tied.weight = self.shared.weight
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        x = self.shared(self.inp(x))
        x = self.blocks[0](x)
        x = self.shared(x)  # the same module again, after others ran
        x = self.blocks[1](x)
        x = self.tied(x)  # shared.weight under another module
        return self.out(x)


def make_model(kind: str, seed: int = 0) -> nn.Module:
    if kind in HF_KINDS:
        return hf_model(kind, seed)
    torch.manual_seed(seed)
    model = {"mlp": MLP, "cnn": CNN, "nested": Nested}[kind]()
    return model.eval()


def make_input(kind: str, seed: int = 1, seq: int = 12, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind in HF_KINDS:
        return torch.randint(0, VOCAB, (batch, seq), generator=g)
    if kind == "mlp":
        return torch.randn(batch * 2, 32, generator=g)
    if kind == "cnn":
        return torch.randn(batch, 3, 16, 16, generator=g)
    if kind == "nested":
        return torch.randn(batch * 2, 16, generator=g)
    raise ValueError(kind)


def out_of(output) -> torch.Tensor:
    """The tensor to compare: logits for transformers models, the output itself otherwise."""
    return getattr(output, "logits", output)


@torch.no_grad()
def resident(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    return out_of(model(*args, **kwargs))


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied parameters once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _accepts(factory, example, budget: int, device: str, **kwargs):
    """None if stream accepts `budget`, else the BudgetTooSmall it raised."""
    try:
        sm = flashmem.stream(factory(), budget, device=device, example_inputs=(example,), **kwargs)
    except flashmem.BudgetTooSmall as err:
        assert err.budget_bytes == budget
        assert err.need_bytes > budget, f"BudgetTooSmall asks for {err.need_bytes} B at a budget of {budget} B"
        return err
    sm.close()
    return None


def minimum_budget(factory, example, device: str = "cpu", max_tries: int = 8, **kwargs) -> tuple[int, int]:
    """(a budget close to the smallest flashmem accepts, a lower bound below which it refuses).

    Start at 1 byte and raise the budget to what each BudgetTooSmall error asks for (its need_bytes)
    until stream succeeds; the first error's need_bytes is the lower bound. Then bisect between the two
    (64 B steps) for a smaller budget that still plans. Each try gets a fresh model from `factory`."""
    budget, lower = 1, None
    for _ in range(max_tries):
        err = _accepts(factory, example, budget, device, **kwargs)
        if err is None:
            break
        lower = err.need_bytes if lower is None else lower
        budget = err.need_bytes
    else:
        raise AssertionError(f"no budget found in {max_tries} tries (last {budget} B)")
    assert lower is not None, "a budget of 1 byte was accepted"
    lo, hi = lower, budget  # hi plans
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if _accepts(factory, example, mid, device, **kwargs) is None:
            hi = mid
        else:
            lo = mid
    return hi, lower


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture
def streams():
    """Opens StreamedModels and closes them (IO thread, spill files) at the end of the test."""
    opened = []

    def open_(model, budget, *example, device="cpu", **kwargs):
        sm = flashmem.stream(model, budget, device=device, example_inputs=example, **kwargs)
        opened.append(sm)
        return sm

    yield open_
    close_all(opened)


def close_all(opened) -> None:
    """Close StreamedModels (IO threads, spill files), whatever state a test left them in."""
    for sm in opened:
        try:
            sm.close()
        except Exception:
            pass
    gc.collect()


def save_folder(model: nn.Module, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> Path:
    """A small Llama-shaped model saved with save_pretrained as one model.safetensors."""
    return save_folder(hf_model("llama"), tmp_path_factory.mktemp("llama-single"))


@pytest.fixture(scope="session")
def llama_sharded_folder(tmp_path_factory) -> Path:
    """The same model saved in several shards with an index."""
    folder = save_folder(hf_model("llama"), tmp_path_factory.mktemp("llama-sharded"), max_shard_size="150KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory) -> Path:
    """A small GPT-2 (lm_head tied to wte, so the files hold the weight once)."""
    return save_folder(hf_model("gpt2"), tmp_path_factory.mktemp("gpt2-tied"))


# -- shared by the planner, cost model, cache and report tests ------------------------------------------------
def program(sizes: list[int], ops: list[tuple[str, tuple[int, ...], int]], *, activation_bytes: int = 0,
            fixed_bytes: int = 0, signature: str = "test"):
    """A Program from weight sizes (bytes, uint8 weights W0, W1, ...) and ops (module, weights, end_index)."""
    from flashmem.trace import Op, Program, Weight

    slots: dict[int, list] = {i: [] for i in range(len(sizes))}
    for module, ws, _ in ops:
        for w in ws:
            if (module, f"w{w}") not in slots[w]:
                slots[w].append((module, f"w{w}"))
    weights = tuple(Weight(i, f"W{i}", (n,), torch.uint8, n, tuple(slots[i])) for i, n in enumerate(sizes))
    return Program(weights=weights, ops=tuple(Op(i, m, tuple(ws), end) for i, (m, ws, end) in enumerate(ops)),
                   activation_bytes=activation_bytes, fixed_bytes=fixed_bytes, signature=signature)


@functools.lru_cache(maxsize=None)
def streaming_budget(kind: str = "mlp") -> int:
    """A budget under which flashmem streams some of the model's weights (whatever flashmem adds to the
    weights' bytes): about 70% of the model's bytes, raised to what BudgetTooSmall asks for."""
    x = make_input(kind)
    budget = int(model_bytes(make_model(kind)) * 0.7)
    for _ in range(6):
        try:
            sm = flashmem.stream(make_model(kind), budget, device="cpu", example_inputs=(x,))
        except flashmem.BudgetTooSmall as err:
            assert err.need_bytes > budget
            budget = err.need_bytes
            continue
        try:
            assert sm.plan.loads, f"nothing streams at {budget} B"
            return budget
        finally:
            sm.close()
    raise AssertionError(f"no budget accepted up to {budget} B")
