"""Shared by bench_cuda.py and bench_cpu.py: the random GPT-Neo model on storage, timing and memory
helpers, the one-subprocess-per-mode driver, and the table.

Nothing here imports torch at module level: the parent process of a benchmark only starts children and
collects their JSON rows, so it never touches the device (allocator state and CUDA contexts stay per mode).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from flashmem.run_cpu import reset_peak_rss, status_bytes  # noqa: F401  (the benchmarks' RSS readings)

ROW_TAG = "@@BENCH_ROW "
SEED = 1234
FORMAT = 2  # bump when the stored model's contents change


# -- the model ------------------------------------------------------------------------------------------
def neo_config_dict(size: str) -> dict:
    """GPTNeoConfig arguments. Every shape has an untied lm_head (its own parameter)."""
    if size == "2.7B":
        return dict(hidden_size=2560, num_layers=32, num_heads=20, vocab_size=50257, max_position_embeddings=2048,
                    attention_types=[[["global", "local"], 16]], window_size=256, tie_word_embeddings=False)
    if size == "125M":
        return dict(hidden_size=768, num_layers=12, num_heads=12, vocab_size=50257, max_position_embeddings=2048,
                    attention_types=[[["global", "local"], 6]], window_size=256, tie_word_embeddings=False)
    if size == "tiny":
        return dict(hidden_size=64, num_layers=4, num_heads=4, vocab_size=1000, max_position_embeddings=64,
                    attention_types=[[["global", "local"], 2]], window_size=16, tie_word_embeddings=False,
                    bos_token_id=999, eos_token_id=999)
    raise ValueError(size)


def make_config(size: str):
    from transformers import GPTNeoConfig

    config = GPTNeoConfig(**neo_config_dict(size))
    config.architectures = ["GPTNeoForCausalLM"]
    return config


def build_on_meta(config, dtype):
    """GPTNeoForCausalLM with parameters on the meta device (buffers real, on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import GPTNeoForCausalLM

    with init_empty_weights(include_buffers=False):
        model = GPTNeoForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def random_state_dict(model, dtype, seed: int = SEED, device: str = "cpu") -> dict:
    """Seeded cheap fill: N(0, 0.02) for matrices and biases, 1 + N(0, 0.02) for LayerNorm weights.
    Generated on `device` (fast on a GPU) and returned on the CPU."""
    import torch
    from torch import nn

    gen = torch.Generator(device=device).manual_seed(seed)
    norm_weights = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    out = {}
    for name, p in model.named_parameters():
        t = torch.randn(tuple(p.shape), generator=gen, device=device, dtype=torch.float32).mul_(0.02)
        if name in norm_weights:
            t.add_(1.0)
        out[name] = t.to(dtype).cpu()
    return out


def prepare_model_folder(folder: Path, size: str, dtype_name: str, gen_device: str) -> dict:
    """Write config.json + model.safetensors (a folder flashmem.from_pretrained and transformers can read),
    unless the folder already holds this exact model. Returns the folder's meta.json contents."""
    import torch
    from safetensors.torch import save_file

    want = {"format": FORMAT, "size": size, "dtype": dtype_name, "seed": SEED, "config": neo_config_dict(size)}
    meta_path = folder / "meta.json"
    if meta_path.exists() and (folder / "model.safetensors").exists():
        have = json.loads(meta_path.read_text())
        if {k: have.get(k) for k in want} == want:
            have["reused"] = True
            return have
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, dtype_name)
    config = make_config(size)
    model = build_on_meta(config, dtype)
    t0 = time.perf_counter()
    sd = random_state_dict(model, dtype, SEED, gen_device)
    t_fill = time.perf_counter() - t0
    assert "lm_head.weight" in sd and "transformer.wte.weight" in sd, "untied lm_head expected"
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    t_all = time.perf_counter() - t0
    weight_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    meta = dict(want, weight_bytes=weight_bytes, n_params=sum(t.numel() for t in sd.values()),
                gen_device=gen_device, fill_s=round(t_fill, 3), prepare_s=round(t_all, 3),
                gen_device_note="same seed on another device type gives other weights")
    meta_path.write_text(json.dumps(meta, indent=1))
    meta["reused"] = False
    return meta


def load_model(folder: Path, dtype):
    """The stored model, built on meta and given the file's tensors (assign=True, no copy beyond the
    safetensors load). Checks the untied head is its own parameter."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    model = build_on_meta(config, dtype)
    sd = load_file(str(folder / "model.safetensors"), device="cpu")
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    del sd
    params = {n for n, _ in model.named_parameters()}
    bad = [k for k in missing if k in params]
    if bad or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {bad[:5]}, unexpected {list(unexpected)[:5]}")
    meta_left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta_left:
        raise RuntimeError(f"parameters left on meta: {meta_left[:5]}")
    head, wte = model.lm_head.weight, model.transformer.wte.weight
    if head is wte or head.data_ptr() == wte.data_ptr():
        raise RuntimeError("lm_head is tied to the input embedding; the benchmark wants an untied head")
    if any(p.dtype != dtype for p in model.parameters()):
        raise RuntimeError("a parameter has the wrong dtype")
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def param_bytes_where(model, predicate) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if predicate(p))


def tensor_bytes_where(model, predicate) -> int:
    """Bytes of the parameters and buffers for which predicate(tensor) holds (flashmem streams buffers like
    parameters, and diffusers offloads them: GPT-Neo's attention masks are 4 MiB of bool per layer at 2048
    positions)."""
    return param_bytes_where(model, predicate) + sum(
        b.numel() * b.element_size() for b in model.buffers() if predicate(b))


def preload_modules() -> None:
    """Import what the modes use before measuring a baseline RSS, so imports do not count as model memory."""
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers
    from transformers import GPTNeoForCausalLM  # noqa: F401

    try:
        import flashmem  # noqa: F401
    except ImportError:
        pass


def input_ids(vocab: int, tokens: int):
    import torch

    gen = torch.Generator().manual_seed(SEED + tokens)
    return torch.randint(0, vocab, (1, tokens), generator=gen)


# -- measurements ---------------------------------------------------------------------------------------
def spread(times_s: list[float]) -> dict:
    return {"median_ms": statistics.median(times_s) * 1e3, "min_ms": min(times_s) * 1e3,
            "max_ms": max(times_s) * 1e3, "n": len(times_s),
            "times_ms": [round(t * 1e3, 3) for t in times_s]}


def compare(out, ref_path: Path) -> dict:
    """torch.equal against the resident logits saved at ref_path, and the largest absolute difference."""
    import torch

    if not ref_path.exists():
        return {"equal": None, "max_abs_diff": None, "ref": "missing (resident run failed or skipped)"}
    ref = torch.load(ref_path)
    got = out.detach().to("cpu")
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return {"equal": False, "max_abs_diff": None,
                "ref": f"shape/dtype differ: {tuple(got.shape)} {got.dtype} vs {tuple(ref.shape)} {ref.dtype}"}
    diff = (got.float() - ref.float()).abs().max().item()
    return {"equal": bool(torch.equal(got, ref)), "max_abs_diff": diff}


def emit(row: dict) -> None:
    """A child's result: one tagged JSON line on stdout."""
    sys.stdout.write(ROW_TAG + json.dumps(row, default=str) + "\n")
    sys.stdout.flush()


def error_row(base: dict, err: BaseException) -> dict:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return dict(base, error=f"{type(err).__name__}: {err}"[:600], traceback="".join(tb)[-3000:])


# -- the driver -----------------------------------------------------------------------------------------
def parse_size(text: str, whole: int | None = None) -> int:
    """'0.4GiB', '1GiB', '512MiB', '2GB', a byte count, or '0.25x' (a fraction of `whole`)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "x":
        if whole is None:
            raise ValueError("a fraction needs the model's size")
        return int(value * whole)
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    if unit not in units:
        raise ValueError(f"unknown unit in {text!r}")
    return int(value * units[unit])


def fmt_gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.3f}"


def run_child(script: str, argv: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> list[dict]:
    """Run `python script argv...` in its own process; its rows, or one error row."""
    cmd = [sys.executable, script] + argv
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=max(timeout_s, 1), env=env)
        output, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
        rc = "timeout"
    elapsed = time.perf_counter() - t0
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(" ".join(cmd) + "\n" + output[-200_000:])
    rows = [json.loads(line[len(ROW_TAG):]) for line in output.splitlines() if line.startswith(ROW_TAG)]
    if not rows:
        tail = "\n".join(output.splitlines()[-15:])
        rows = [{"error": f"child exited {rc} without a result after {elapsed:.0f} s; log {log_path}",
                 "log_tail": tail}]
    for r in rows:
        r["process_s"] = round(elapsed, 2)
    return rows


def child_device(name: str, hint: str = "pass --small --device cpu for a dry run"):
    """The child's torch.device `name`, refusing CUDA where this process has none (`hint`: the way out)."""
    import torch

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"CUDA is not available in this process; {hint}")
    return dev


def fresh_workdir(workdir: str) -> tuple[Path, Path]:
    """(workdir, its logs folder), made if missing, without the logs and reference outputs of an earlier run."""
    workdir = Path(workdir)
    logs = workdir / "logs"
    workdir.mkdir(parents=True, exist_ok=True)
    for old in list(logs.glob("*.log")) + list(workdir.glob("ref_*.pt")):
        old.unlink()
    return workdir, logs


def copy_logs(log_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(log_dir.glob("*.log")):
        text = p.read_text(errors="replace")
        (dest / p.name).write_text(text[-50_000:])


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in r) + " |")
    return "\n".join(lines)


def free_bytes(path: str) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def out_dir() -> Path | None:
    out = os.environ.get("OUT")
    return Path(out) if out else None


def save_result(result: dict, name: str, logs: Path) -> None:
    """`result` to $OUT/<name>.json and the children's logs to $OUT/<name>_logs; nothing without $OUT."""
    out = out_dir()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
        copy_logs(logs, out / f"{name}_logs")


def progress(t0: float, msg: str) -> None:
    """One line of a parent's progress: seconds since `t0`, then `msg`."""
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
