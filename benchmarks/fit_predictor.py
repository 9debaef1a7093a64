"""How well op times can be predicted for a model never profiled: build several small transformers models
(random weights, fp32, CPU), stream each with every weight resident, profile each op's (step's) compute
time, then for each model fit `flashmem.predict.OpTimePredictor` on the OTHER models' profiles and predict
the held-out one; two wider models (other widths and token counts) are predicted by a predictor fitted on
all eight. Each model is profiled twice: the second profile's difference from the first is the
measurement's own noise, the floor under any predictor's error.

Reported per held-out model: the median absolute relative error per op and the relative error of the
whole forward (the sum of its ops). The full table is for the default predictor (log-linear on step
features: counted FLOPs, bytes and kernels of everything the profiled step runs); a second compares it with
op features alone (the module's own FLOPs and weight + activation bytes) and with the additive form.
Prints markdown tables last; writes $OUT/fit_predictor.json when $OUT is set.

    PYTHONPATH=src python benchmarks/fit_predictor.py

About a minute on 2 CPU cores. Timings are the device's (here the CPU's); a predictor fitted here
predicts this machine only. torch runs on one thread (`--threads 1`, the default): on the shared 2-core
machine this was written on, an op split over two threads waits for the slower one, and a (128 x 512) @
(512 x 2048) matmul took 0.9 ms or 8 ms (medians of 200) from one second to the next on two threads, 1.71 to
1.78 ms on one.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import flashmem
from flashmem.predict import OpTimePredictor, op_features, profile_op_seconds

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TOKENS = 128
CALLS = 5  # profiled calls per model (--calls): each op's time is the median


def _seeded(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


def _ids(vocab: int, n: int = TOKENS, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def build(name: str):
    """(model, args, kwargs) for one of MODELS."""
    import transformers as T

    if name == "gpt2":
        cfg = T.GPT2Config(n_embd=512, n_layer=6, n_head=8, vocab_size=50257, n_positions=1024)
        return _seeded(T.GPT2LMHeadModel, cfg), (_ids(50257),), {"use_cache": False}
    if name == "llama":
        cfg = T.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)
        return _seeded(T.LlamaForCausalLM, cfg), (_ids(32000),), {"use_cache": False}
    if name == "gpt-neo":
        cfg = T.GPTNeoConfig(hidden_size=512, num_layers=6, num_heads=8, vocab_size=50257,
                             max_position_embeddings=1024, attention_types=[[["global", "local"], 3]],
                             window_size=64)
        return _seeded(T.GPTNeoForCausalLM, cfg), (_ids(50257),), {"use_cache": False}
    if name == "bert":
        cfg = T.BertConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048)
        return _seeded(T.BertModel, cfg), (_ids(30522),), {}
    if name == "vit":
        cfg = T.ViTConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                          image_size=224, patch_size=16)
        pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        return _seeded(T.ViTModel, cfg), (pixels,), {}
    if name == "t5":
        cfg = T.T5Config(d_model=512, d_ff=2048, d_kv=64, num_layers=4, num_decoder_layers=4, num_heads=8,
                         vocab_size=32128)
        return (_seeded(T.T5ForConditionalGeneration, cfg), (_ids(32128),),
                {"decoder_input_ids": _ids(32128, 32, seed=2), "use_cache": False})
    if name == "whisper":
        cfg = T.WhisperConfig(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                              decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
                              num_mel_bins=80, max_source_positions=375, vocab_size=51865)
        feats = torch.randn(1, 80, 750, generator=torch.Generator().manual_seed(1))
        return (_seeded(T.WhisperForConditionalGeneration, cfg), (feats,),
                {"decoder_input_ids": _ids(51865, 32, seed=2), "use_cache": False})
    if name == "gpt2-768x256":  # wider, longer input: outside every base model's range
        cfg = T.GPT2Config(n_embd=768, n_layer=4, n_head=12, vocab_size=50257, n_positions=1024)
        return _seeded(T.GPT2LMHeadModel, cfg), (_ids(50257, 256),), {"use_cache": False}
    if name == "llama-1024x32":  # wider, shorter input
        cfg = T.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024)
        return _seeded(T.LlamaForCausalLM, cfg), (_ids(32000, 32),), {"use_cache": False}
    if name == "resnet":
        cfg = T.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                             layer_type="basic")
        pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        return _seeded(T.ResNetModel, cfg), (pixels,), {}
    raise ValueError(name)


MODELS = ("gpt2", "llama", "gpt-neo", "bert", "vit", "t5", "whisper", "resnet")  # each held out from the others
WIDER = ("gpt2-768x256", "llama-1024x32")  # held out from all of MODELS: other widths and token counts


def profile_model(name: str, calls: int = CALLS) -> dict:
    model, args, kwargs = build(name)
    budget = int(C.tensor_bytes_where(model, lambda t: True) * 1.1) + 2**24  # all resident (mapped pages round up)
    with torch.no_grad():
        sm = flashmem.stream(model, budget, device="cpu", example_inputs=args, example_kwargs=kwargs)
    try:
        assert not sm.plan.loads, "expected every weight resident"
        features = op_features(sm.model, sm.program, args, kwargs)
        first = profile_op_seconds(sm, args, kwargs, calls=calls)
        second = profile_op_seconds(sm, args, kwargs, calls=calls)  # the measurement's own noise
    finally:
        sm.close()
    return {"model": name, "features": features, "seconds": first, "repeat_seconds": second}


def rel_errors(pred: list[float], meas: list[float]) -> list[float]:
    return [abs(p - m) / m for p, m in zip(pred, meas) if m > 0]


VARIANTS = (("step", "loglinear"), ("op", "loglinear"), ("step", "additive"), ("op", "additive"))
VARIANT_TEXT = {
    "step": "step features (counted FLOPs, bytes and kernels of everything the profiled step runs)",
    "op": "op features (the module's own FLOPs estimate, weight + activation bytes)",
    "loglinear": "log-linear (the default)",
    "additive": "additive (a + flops/F + bytes/B [+ kernels k], non-negative)",
}


def evaluate(profiles: list[dict], feature_set: str, form: str, extra: list[dict] = ()) -> list[dict]:
    """Each of `profiles` predicted by a predictor fitted on the others; each of `extra` by one fitted on all
    of `profiles`."""
    rows = []
    for held in list(profiles) + list(extra):
        train = [p for p in profiles if p is not held]
        predictor = OpTimePredictor(feature_set, form).fit([f for p in train for f in p["features"]],
                                                           [s for p in train for s in p["seconds"]])
        pred = predictor.predict(held["features"])
        meas = held["seconds"]
        fwd_m, fwd_p = sum(meas), sum(pred)
        by_family: dict[str, list[float]] = {}
        for f, p, m in zip(held["features"], pred, meas):
            if m > 0:
                by_family.setdefault(f.family, []).append(abs(p - m) / m)
        rows.append({
            "model": held["model"], "feature_set": feature_set, "form": form, "ops": len(meas),
            "measured_ms": fwd_m * 1e3, "predicted_ms": fwd_p * 1e3,
            "forward_error_pct": 100 * (fwd_p - fwd_m) / fwd_m,
            "median_op_error_pct": 100 * statistics.median(rel_errors(pred, meas)),
            "repeat_forward_diff_pct": 100 * (sum(held["repeat_seconds"]) - fwd_m) / fwd_m,
            "repeat_median_op_diff_pct": 100 * statistics.median(rel_errors(held["repeat_seconds"], meas)),
            "fitted_on": [p["model"] for p in train],
            "median_op_error_pct_by_family": {k: 100 * statistics.median(v) for k, v in by_family.items()},
            "predicted_s": pred,
        })
    return rows


def summary(rows: list[dict]) -> tuple[float, float]:
    """Median over the leave-one-out models of |forward error| and of the median per-op error."""
    base = [r for r in rows if r["model"] in MODELS]
    return (statistics.median(abs(r["forward_error_pct"]) for r in base),
            statistics.median(r["median_op_error_pct"] for r in base))


def table(rows: list[dict], title: str) -> str:
    lines = [f"**{title}**", "",
             "| model | ops | measured forward ms | predicted ms | forward error % | median per-op error % "
             "| repeat profile: forward diff % | repeat: median per-op diff % |",
             "|---|---|---|---|---|---|---|---|"]
    n_base = sum(r["model"] in MODELS for r in rows)
    fwd, per_op = summary(rows)
    for k, r in enumerate(rows):
        name = r["model"] if r["model"] in MODELS else f"{r['model']} (fitted on all {n_base})"
        lines.append(f"| {name} | {r['ops']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | "
                     f"{r['forward_error_pct']:+.1f} | {r['median_op_error_pct']:.1f} | "
                     f"{r['repeat_forward_diff_pct']:+.1f} | {r['repeat_median_op_diff_pct']:.1f} |")
        if k == n_base - 1:
            lines.append(f"| median over the {n_base} models above | | | | {fwd:.1f} (abs) | {per_op:.1f} | | |")
    return "\n".join(lines)


def variants_table(results: dict) -> str:
    wider = [r["model"] for r in next(iter(results.values())) if r["model"] not in MODELS]
    lines = ["**All variants** (leave-one-out medians over the base models; forward error % of the wider ones)", "",
             "| features | form | median abs forward error % | median per-op error % | "
             + " | ".join(f"{w} forward error %" for w in wider) + " |",
             "|---|---|---|---|" + "---|" * len(wider)]
    for key, rows in results.items():
        fs, form = key.split("/")
        fwd, per_op = summary(rows)
        cells = [f"{r['forward_error_pct']:+.1f}" for r in rows if r["model"] not in MODELS]
        lines.append(f"| {fs} | {form} | {fwd:.1f} | {per_op:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the docstring)")
    ap.add_argument("--calls", type=int, default=CALLS, help="profiled calls per model (median per op)")
    ap.add_argument("--models", default=",".join(MODELS + WIDER),
                    help="comma-separated subset of " + ",".join(MODELS + WIDER))
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)

    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    profiles, skipped = [], {}
    for name in opts.models.split(","):
        t0 = time.perf_counter()
        try:
            profiles.append(profile_model(name, opts.calls))
        except Exception as err:  # a model flashmem cannot stream is reported, not fatal
            skipped[name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            continue
        finally:
            gc.collect()
        p = profiles[-1]
        print(f"{name}: {len(p['seconds'])} ops, {sum(p['seconds']) * 1e3:.1f} ms of profiled compute "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    base = [p for p in profiles if p["model"] in MODELS]
    wider = [p for p in profiles if p["model"] not in MODELS]
    if len(base) < 3:
        raise SystemExit("leave-one-out needs at least 3 of the base models")
    results = {f"{fs}/{form}": evaluate(base, fs, form, wider) for fs, form in VARIANTS}
    print(f"torch threads: {torch.get_num_threads()}; tokens: {TOKENS}; {opts.calls} profiled calls per model "
          f"(median per op), each model profiled twice; total {time.perf_counter() - t_start:.0f} s")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print()
    print(table(results["step/loglinear"], f"Leave-one-model-out: {VARIANT_TEXT['loglinear']}, "
                                           f"{VARIANT_TEXT['step']}"))
    print()
    print(variants_table(results))
    print()
    default = results["step/loglinear"]
    fams = sorted({k for r in default for k in r["median_op_error_pct_by_family"]})
    print("**Median per-op error % by family** (step features, log-linear)")
    print()
    print("| model | " + " | ".join(fams) + " |")
    print("|---|" + "---|" * len(fams))
    for r in default:
        cells = [f"{r['median_op_error_pct_by_family'][f]:.0f}" if f in r["median_op_error_pct_by_family"] else ""
                 for f in fams]
        print(f"| {r['model']} | " + " | ".join(cells) + " |")
    out = os.environ.get("OUT")
    if out:
        doc = {
            "tokens": TOKENS, "calls": opts.calls, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "skipped": skipped, "variants": VARIANT_TEXT, "results": results,
            "profiles": [{"model": p["model"], "seconds": p["seconds"], "repeat_seconds": p["repeat_seconds"],
                          "features": [f.to_dict() for f in p["features"]]} for p in profiles],
            "predictor_fitted_on_base_models": json.loads(OpTimePredictor("step").fit(
                [f for p in base for f in p["features"]], [s for p in base for s in p["seconds"]]).to_json()),
        }
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "fit_predictor.json"), "w") as fh:
            json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main()
