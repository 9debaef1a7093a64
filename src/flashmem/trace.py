"""Trace: the order in which a model runs its ops and the weights each one uses, from a real input.

An op is one call of a module that owns tensors directly (parameters or buffers; a leaf such as
`nn.Linear`, or a container whose forward uses its own tensors). Buffers stream like parameters; the
trace refuses a forward that writes to one, since a streamed copy would lose the write. A module called twice gives two ops; a parameter shared by two
modules (a tied LM head) is one `Weight` with two slots. An op's weights must stay in place from its
entry to its exit, which for a container spans the ops nested inside it (`end_index`).

The trace runs the model once with each op's weights loaded on demand into a scratch buffer, so it works
for models that do not fit on the device, and measures the activations' peak on CUDA.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import FlashmemError
from .units import align_up, fmt_bytes


@dataclass(frozen=True)
class Weight:
    """A parameter or buffer, however many modules hold it."""
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    slots: tuple[tuple[str, str], ...]  # (module name, attribute) pairs that hold it
    is_buffer: bool = False


@dataclass(frozen=True)
class Op:
    """One call of a module that owns weights, in execution order."""
    index: int
    module: str
    weights: tuple[int, ...]
    end_index: int  # index of the last op entered before this one exits (itself if none is nested)


@dataclass(frozen=True)
class Program:
    """What the planner plans: ops in order and the weights they use."""
    weights: tuple[Weight, ...]
    ops: tuple[Op, ...]
    activation_bytes: int  # peak device bytes the forward's activations took (CUDA, reserved); 0 where not measured
    fixed_bytes: int  # held on the device for good beside the arena: the CUDA math libraries' workspace
    signature: str  # shapes and dtypes of the traced inputs


@dataclass(frozen=True)
class ModelWeights:
    """The model's parameters as flashmem sees them, before any trace."""
    weights: tuple[Weight, ...]
    owned: dict[str, tuple[int, ...]]  # module name -> the weights it owns directly
    max_working_bytes: int  # most weight bytes any module needs at once (itself plus its ancestors)
    max_working_module: str


def owned_tensors(module: nn.Module):
    """(table, attribute, tensor) for the parameters, then the buffers, that `module` holds itself."""
    for table in (module._parameters, module._buffers):
        for attr, t in table.items():
            if t is not None:
                yield table, attr, t


def collect_weights(model: nn.Module, alignment: int) -> tuple[ModelWeights, list[torch.Tensor]]:
    """Weights of `model` (tied parameters once) and the tensors holding them now."""
    index_of: dict[int, int] = {}
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    slots: list[list[tuple[str, str]]] = []
    owned: dict[str, tuple[int, ...]] = {}
    is_buffer: list[bool] = []
    for mod_name, module in model.named_modules():
        mine = []
        for table, attr, param in owned_tensors(module):
            if id(param) not in index_of:
                is_buffer.append(table is module._buffers)
                index_of[id(param)] = len(tensors)
                tensors.append(param)
                names.append(f"{mod_name}.{attr}" if mod_name else attr)
                slots.append([])
            w = index_of[id(param)]
            slots[w].append((mod_name, attr))
            mine.append(w)
        if mine:
            owned[mod_name] = tuple(mine)
    weights = tuple(
        Weight(i, names[i], tuple(t.shape), t.dtype, t.numel() * t.element_size(), tuple(slots[i]), is_buffer[i])
        for i, t in enumerate(tensors))

    def own_bytes(module: nn.Module) -> int:
        return sum(align_up(t.numel() * t.element_size(), alignment) for _, _, t in owned_tensors(module))

    best, best_name = 0, ""
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if not own_bytes(module):
            continue
        parts = mod_name.split(".") if mod_name else []
        total = own_bytes(model) + sum(own_bytes(model.get_submodule(".".join(parts[:k])))
                                       for k in range(1, len(parts) + 1))
        if total > best:
            best, best_name = total, mod_name
    return ModelWeights(weights, owned, best, best_name), tensors


def input_signature(args: tuple, kwargs: dict) -> str:
    """A short key for the shapes and dtypes of a call's inputs."""
    leaves, spec = tree_flatten((args, kwargs))
    parts = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(f"T{tuple(leaf.shape)}:{leaf.dtype}")
        elif isinstance(leaf, (int, float, bool, str, type(None))):
            parts.append(repr(leaf))
        else:
            parts.append(type(leaf).__qualname__)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def typed_view(raw: torch.Tensor, weight: Weight) -> torch.Tensor:
    """The weight over `raw` bytes (uint8): a parameter, or a plain tensor for a buffer."""
    t = raw.view(weight.dtype).view(weight.shape)
    return t if weight.is_buffer else nn.Parameter(t, requires_grad=False)


def placeholder(weight: Weight) -> torch.Tensor:
    """What a slot holds while its weight is not in place: a meta tensor, so a stray use fails loudly."""
    return typed_view(torch.empty(weight.nbytes, dtype=torch.uint8, device="meta"), weight)


def set_slots(model: nn.Module, weight: Weight, value: torch.Tensor) -> None:
    """Make every module that holds `weight` hold `value` instead."""
    for mod_name, attr in weight.slots:
        module = model.get_submodule(mod_name)
        (module._buffers if weight.is_buffer else module._parameters)[attr] = value


class ScratchLoader:
    """Loads each op's weights into scratch buffers on entry (stack order) and unloads them on exit; with
    several buffers, a weight goes to the first with room at its top."""

    def __init__(self, model: nn.Module, mw: ModelWeights, read_into: Callable[[int, torch.Tensor], None],
                 scratch: torch.Tensor | list[torch.Tensor], alignment: int, resident_views: dict[int, torch.Tensor],
                 fix: str = "a module is used from outside its parent; raise the budget"):
        self.fix = fix  # what the error says to do when the scratch buffer is too small
        self.model = model
        self.mw = mw
        self.read_into = read_into
        self.scratch = [scratch] if isinstance(scratch, torch.Tensor) else list(scratch)
        self.alignment = alignment
        self.resident_views = resident_views
        self.tops = [0] * len(self.scratch)
        self.saved_tops: list[list[int]] = []
        self.slot_weight = {slot: w.index for w in mw.weights for slot in w.slots}

    def enter(self, mod_name: str) -> None:
        module = self.model.get_submodule(mod_name)
        self.saved_tops.append(list(self.tops))
        for table, attr, _ in list(owned_tensors(module)):
            w = self.mw.weights[self._weight_of(mod_name, attr)]
            view = self.resident_views.get(w.index)
            if view is None:
                view = self._load(w, f"op {mod_name!r}")
            table[attr] = view

    def load_foreign(self, weight: int) -> torch.Tensor:
        """Put `weight` in place in every module that holds it, for the op in flight (stack order: freed
        when that op exits); returns its tensor."""
        w = self.mw.weights[weight]
        view = self.resident_views.get(weight)
        if view is None:
            view = self._load(w, f"weight {w.name!r}, used outside its own module's call,")
        self.set_slots(weight, view)
        return view

    def _load(self, w: Weight, who: str) -> torch.Tensor:
        """Read `w` into the scratch buffer's top (stack order)."""
        size = align_up(w.nbytes, self.alignment)
        k = next((k for k, buf in enumerate(self.scratch) if self.tops[k] + size <= buf.numel()), None)
        if k is None:
            room = ", ".join(f"{buf.numel() - top} B" for buf, top in zip(self.scratch, self.tops))
            raise FlashmemError(f"{who} needs {w.nbytes} B more of weights in place, but the scratch buffer has "
                                f"{room} left; {self.fix}")
        raw = self.scratch[k][self.tops[k]:self.tops[k] + w.nbytes]
        self.read_into(w.index, raw)
        self.tops[k] += size
        return typed_view(raw, w)

    def set_slots(self, weight: int, value: torch.Tensor) -> None:
        set_slots(self.model, self.mw.weights[weight], value)

    def exit(self, mod_name: str, placeholders: dict[int, torch.Tensor]) -> None:
        module = self.model.get_submodule(mod_name)
        for table, attr, t in list(owned_tensors(module)):
            w = self._weight_of(mod_name, attr)
            if self.mw.weights[w].is_buffer and w not in self.resident_views:
                self._check_unchanged(mod_name, attr, w, t)
            table[attr] = self.resident_views.get(w, placeholders[w])
        self.tops = self.saved_tops.pop()

    def _check_unchanged(self, mod_name: str, attr: str, w: int, t: torch.Tensor) -> None:
        # Compared on the host: a device buffer here would count as activations in the trace.
        stored = torch.empty(self.mw.weights[w].nbytes, dtype=torch.uint8)
        self.read_into(w, stored)
        if not torch.equal(stored, t.detach().reshape(-1).view(torch.uint8).cpu()):
            raise FlashmemError(f"the forward wrote to buffer {mod_name}.{attr}; flashmem streams buffers "
                                f"read-only, so the write would be lost. Put the model in eval mode, or keep "
                                f"state such as caches out of module buffers")

    def _weight_of(self, mod_name: str, attr: str) -> int:
        w = self.slot_weight.get((mod_name, attr))
        if w is None:
            raise FlashmemError(f"parameter {mod_name}.{attr} was added after flashmem took the model; "
                                f"build the StreamedModel again")
        return w


class MappedLoader(ScratchLoader):
    """A ScratchLoader for mapped files (`store.MappedFiles`): an op's weights are views of the files, their
    pages held from the op's entry to its exit; nothing is copied."""

    def __init__(self, model: nn.Module, mw: ModelWeights, files, resident_views: dict[int, torch.Tensor]):
        super().__init__(model, mw, files.store.read_into, torch.empty(0, dtype=torch.uint8), 1, resident_views)
        self.files = files
        self.held: list[list[int]] = []

    def enter(self, mod_name: str) -> None:
        self.held.append([])
        super().enter(mod_name)

    def _load(self, w: Weight, who: str) -> torch.Tensor:
        self.files.hold(w.index)
        self.held[-1].append(w.index)  # released when the op in flight exits
        return typed_view(self.files.view(w.index), w)

    def exit(self, mod_name: str, placeholders: dict[int, torch.Tensor]) -> None:
        super().exit(mod_name, placeholders)
        for w in self.held.pop():
            self.files.unhold(w)


class Tracer:
    """Records one call: fed by module hooks (`enter`/`exit` per op), loading weights on demand through
    `loader`; `finish` returns the program. The call it records is a real call: its output is the
    model's output, computed with every weight in place."""

    def __init__(self, mw: ModelWeights, loader: ScratchLoader, placeholders: dict[int, torch.Tensor],
                 device: torch.device, fixed_bytes: int, signature: str, budget_bytes: int | None = None,
                 held_bytes: int = 0):
        self.budget_bytes = budget_bytes  # CUDA: the trace's activations may not take the device past it
        self.held_bytes = held_bytes  # of the budget, what flashmem holds on the device already
        self._fraction: float | None = None  # the process's memory fraction before the trace capped it
        self.mw = mw
        self.loader = loader
        self.placeholders = placeholders
        self.device = device
        self.fixed_bytes = fixed_bytes
        self.signature = signature
        self.ops: list[list] = []  # [module name, weights, end index]
        self.stack: list[int] = []
        self.foreign: dict[int, list[int]] = {}  # op -> weights it used that its module does not hold
        self.placeholder_ids = {id(t): w for w, t in placeholders.items()}
        self.mode: _ForeignUses | None = None

    def use_foreign(self, weight: int) -> torch.Tensor:
        """A weight used while its module is not running (nn.MultiheadAttention reads out_proj.weight):
        attributed to the innermost op in flight, loaded for it."""
        if not self.stack:
            raise FlashmemError(f"the model uses weight {self.mw.weights[weight].name!r} outside every module "
                                f"call that holds weights; flashmem cannot place it. Keep the model's root "
                                f"free of direct uses of its children's weights")
        op = self.stack[-1]
        self.foreign.setdefault(op, []).append(weight)
        self.ops[op][1] = self.ops[op][1] + (weight,)
        return self.loader.load_foreign(weight)

    def watch_foreign_uses(self) -> None:
        self.mode = _ForeignUses(self)
        self.mode.__enter__()

    def start(self) -> None:
        self.watch_foreign_uses()
        if self.device.type == "cuda":
            # Start from an empty cache so the reserved growth we see is what the forward's activations
            # cost the caching allocator (segment rounding included), as it will in a streamed call.
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.allocated0 = torch.cuda.memory_allocated(self.device)
            self.reserved0 = torch.cuda.memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.budget_bytes is not None:
                self._cap_memory()
        else:
            from .run_cpu import reset_peak_rss, rss_bytes

            self.rss_tracked = reset_peak_rss()
            self.rss0 = rss_bytes()

    def enter(self, name: str) -> None:
        self.stack.append(len(self.ops))
        self.ops.append([name, self.mw.owned[name], None])
        self.loader.enter(name)

    def exit(self, name: str) -> None:
        i = self.stack.pop()
        self.ops[i][2] = len(self.ops) - 1
        for w in self.foreign.get(i, ()):
            self.loader.set_slots(w, self.loader.resident_views.get(w, self.placeholders[w]))
        self.loader.exit(name, self.placeholders)

    def _cap_memory(self) -> None:
        """Make the caching allocator refuse (out of memory) what would take the device past the budget:
        an input whose activations do not fit fails in its trace instead of overrunning."""
        from .run_cuda import cap_allocator  # imported here: run_cuda builds on this module

        self._fraction = cap_allocator(self.device, self.reserved0 - self.held_bytes + self.budget_bytes)

    def _uncap_memory(self) -> None:
        from .run_cuda import lift_allocator_cap

        self._fraction = lift_allocator_cap(self.device, self._fraction)

    def explain_failure(self, err: BaseException) -> None:
        """Add to an out-of-memory error of a capped trace what it means and the fix."""
        if self._fraction is not None and isinstance(err, torch.OutOfMemoryError) and hasattr(err, "add_note"):
            err.add_note(f"flashmem: tracing this input's signature ({self.signature}), its activations needed "
                         f"more device memory than the budget of {fmt_bytes(self.budget_bytes)} leaves beside "
                         f"the {fmt_bytes(self.held_bytes)} of weights flashmem holds; raise the budget or call "
                         f"with a smaller input (the budget was not exceeded)")

    def _leave_mode(self) -> None:
        self._uncap_memory()
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None

    def abort(self) -> None:
        self._leave_mode()
        while self.stack:
            self.exit(self.ops[self.stack[-1]][0])

    def finish(self) -> Program:
        self._leave_mode()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            activation_bytes = max(torch.cuda.max_memory_allocated(self.device) - self.allocated0,
                                   torch.cuda.max_memory_reserved(self.device) - self.reserved0)
        else:
            from .run_cpu import peak_rss_bytes

            activation_bytes = max(peak_rss_bytes() - self.rss0, 0) if self.rss_tracked else 0
        if not self.ops:
            raise FlashmemError("the traced forward used no parameters; is the example input right?")
        return Program(
            weights=self.mw.weights,
            ops=tuple(Op(i, name, ws, end) for i, (name, ws, end) in enumerate(self.ops)),
            activation_bytes=activation_bytes,
            fixed_bytes=self.fixed_bytes,
            signature=self.signature,
        )


# Reading these from a weight needs no bytes: the placeholder answers them (HF's ViTModel reads its patch
# projection's dtype in its own forward, outside any op).
_METADATA = {torch.Tensor.dtype.__get__, torch.Tensor.shape.__get__, torch.Tensor.ndim.__get__,
             torch.Tensor.requires_grad.__get__, torch.Tensor.layout.__get__, torch.Tensor.size, torch.Tensor.dim,
             torch.Tensor.numel, torch.Tensor.nelement, torch.Tensor.element_size, torch.Tensor.is_floating_point,
             torch.Tensor.is_complex}


class _ForeignUses(TorchFunctionMode):
    """During a trace: a torch function given a weight that is not in place (a placeholder) gets the weight,
    loaded for the op in flight, instead of failing on the meta tensor."""

    def __init__(self, tracer: Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        ids = self.tracer.placeholder_ids
        leaves, spec = tree_flatten((args, kwargs))
        if any(isinstance(a, torch.Tensor) and id(a) in ids for a in leaves):
            leaves = [self.tracer.use_foreign(ids[id(a)]) if isinstance(a, torch.Tensor) and id(a) in ids else a
                      for a in leaves]
            args, kwargs = tree_unflatten(leaves, spec)
        return func(*args, **kwargs)


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its first qualified name."""
    return {id(m): name for name, m in model.named_modules()}
