"""The command-line tool, called in-process through flashmem.cli.main: `plan` writes or prints the plan's
JSON, `run` streams a folder and exits 0, and failures exit 2 with the error on stderr."""
from __future__ import annotations

import json
import re

import pytest
import torch

import flashmem
from flashmem.cli import main
from flashmem.units import parse_bytes

from conftest import hf_model, resident


def test_plan_writes_json(llama_folder, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(llama_folder), "--budget", "200KiB", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == 1 and doc["budget_bytes"] == 200 * 1024 and doc["device"] == "cpu"
    assert doc["arena_bytes"] + doc["fixed_bytes"] + doc["activation_bytes"] <= doc["budget_bytes"]
    assert doc["loads"] and doc["n_ops"] == len(doc["op_modules"])
    assert doc["op_modules"][0] == "model.embed_tokens" and doc["op_modules"][-1] == "lm_head"
    names = doc["weight_names"]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    for load in doc["loads"]:
        assert 0 <= load["start_step"] <= load["first_use"] <= load["last_use"] < doc["n_ops"]
        assert doc["resident_bytes"] <= load["offset_bytes"]
        assert load["offset_bytes"] + load["nbytes"] <= doc["arena_bytes"]
    printed = capsys.readouterr().out
    assert "wrote" in printed and str(out) in printed
    # the smallest budget this input plans in, and a plan at it
    least = int(re.search(r"smallest budget for this input: .+ \((\d+) bytes\)", printed).group(1))
    smallest = tmp_path / "smallest.json"
    assert main(["plan", str(llama_folder), "--budget", str(least), "--out", str(smallest)]) == 0
    assert json.loads(smallest.read_text())["budget_bytes"] == least < 200 * 1024


@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_plan_writes_a_picture_or_a_page(llama_folder, tmp_path, capsys, suffix):
    out = tmp_path / f"plan{suffix}"
    assert main(["plan", str(llama_folder), "--budget", "200KiB", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predicted" in printed and "measured" in printed and str(out) in printed
    least = re.search(r"smallest budget for this input: .+ \((\d+) bytes\)", printed).group(1)
    if suffix == ".png":
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert f"({least} bytes)" in page  # the smallest budget, as printed
    assert "model.embed_tokens" in page and "lm_head" in page  # the ops' modules by name


def test_plan_prints_json_without_out(llama_folder, capsys):
    assert main(["plan", str(llama_folder), "--budget", "1MiB", "--tokens", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["budget_bytes"] == 2**20 and doc["loads"] == []  # the whole model fits: all resident
    assert len(doc["residents"]) == len(doc["weight_names"])


def test_run_exits_zero_and_prints_the_right_token(llama_folder, capsys):
    assert main(["run", str(llama_folder), "--budget", "200KiB", "--tokens", "8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    match = re.search(r"argmax of the last position: (\d+)", out)
    assert match, out
    ref = resident(hf_model("llama"), torch.arange(8).unsqueeze(0))
    assert int(match.group(1)) == int(ref[0, -1].argmax())
    assert "peak" in out and "streamed" in out


def test_run_gpt2_folder(gpt2_folder, capsys):
    assert main(["run", str(gpt2_folder), "--budget", "300KB", "--tokens", "8"]) == 0
    assert "argmax" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["run", "{folder}", "--budget", "plenty", "--tokens", "8"], ["BadBudget", "512MiB"]),
    (["run", "{folder}", "--budget", "1KiB", "--tokens", "8"], ["BudgetTooSmall", "raise the budget to at least"]),
    (["plan", "{folder}", "--budget", "1KiB"], ["BudgetTooSmall", "model.embed_tokens"]),
    (["plan", "{missing}", "--budget", "1MiB"], ["BadModelFolder"]),
    (["run", "{folder}", "--budget", "1MiB", "--host-budget", "1MiB"], ["FlashmemError", "host_budget applies to CUDA"]),
])
def test_failures_exit_two_with_the_error(argv, words, llama_folder, tmp_path, capsys):
    argv = [a.format(folder=llama_folder, missing=tmp_path / "nothing-here") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashmem: ")
    for word in words:
        assert word in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_cuda_without_gpu_exits_two(llama_folder, capsys):
    assert main(["run", str(llama_folder), "--budget", "1MiB", "--device", "cuda"]) == 2
    assert "DeviceUnavailable" in capsys.readouterr().err


def test_usage_errors_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "plan" in capsys.readouterr().out


def test_queue_command_runs_a_spec_and_writes_the_plot(tmp_path, capsys):
    """`flashmem queue spec.json --out mem.png`: two models of different architectures, three rounds in
    random order, under one budget; the table, the totals and the plot."""
    import json

    from flashmem.cli import main

    spec = {"device": "cpu", "budget": "400KB", "dtype": "float32", "rounds": 3, "order": "random", "seed": 1,
            "models": [
                {"name": "llama", "transformers": "LlamaForCausalLM",
                 "config": {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2},
                 "inputs": {"input_ids": {"shape": [1, 12], "dtype": "int64", "high": 256}}},
                {"name": "vit", "transformers": "ViTModel",
                 "config": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 256, "image_size": 32, "patch_size": 8},
                 "inputs": {"pixel_values": {"shape": [1, 3, 32, 32]}}}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "mem.png"
    assert main(["queue", str(path), "--out", str(out), "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    assert "llama" in text and "vit" in text and "6 calls" in text
    runs = re.search(r"2 timed runs: ([\d.]+), ([\d.]+) s", text)
    total = re.search(r"total ([\d.]+) s for 6 calls \(the median run\)", text)
    assert runs and total, text  # of two runs, the median run is the slower one
    assert total.group(1) == max(runs.group(1), runs.group(2), key=float)
    streamed = re.search(r"([\d.]+)\s+(B|KiB|MiB)\s+streamed", text)
    assert streamed and float(streamed.group(1)) > 0, text  # the budget makes the models stream
    plan = re.search(r"plan: arena ([\d.]+ \w+) \((\d+) weights resident in ([\d.]+ \w+), a ring of ([\d.]+ \w+)\), "
                     r"activations ([\d.]+ \w+), (\d+) loads per sequence", re.sub(r"\s+", " ", text))
    assert plan, text
    arena, resident, ring, activations = (0 if plan.group(i) == "0 B" else parse_bytes(plan.group(i).replace(" ", ""))
                                          for i in (1, 3, 4, 5))
    assert int(plan.group(6)) > 0 and arena + activations <= 400_000
    assert abs(arena - resident - ring) <= 16  # each printed to two decimals of KiB
    assert out.exists() and out.stat().st_size > 1000


def test_queue_spec_errors_are_clear(tmp_path):
    from flashmem.queue import parse_spec

    with pytest.raises(flashmem.FlashmemError, match="budget"):
        parse_spec({"models": [{"name": "a", "transformers": "LlamaForCausalLM"}]})
    with pytest.raises(flashmem.FlashmemError, match="needs a \"name\" and one of"):
        parse_spec({"budget": "1GB", "models": [{"name": "a"}]})
    with pytest.raises(flashmem.FlashmemError, match="lacks"):
        parse_spec({"budget": "1GB", "order": ["b"], "models": [{"name": "a", "transformers": "X"}]})
    spec = parse_spec({"budget": "1GB", "host_budget": "2GiB", "models": [{"name": "a", "transformers": "X"}]})
    assert spec.budget_bytes == 10**9 and spec.host_budget_bytes == 2 * 2**30
    assert parse_spec({"budget": "1GB", "models": [{"name": "a", "transformers": "X"}]}).host_budget_bytes is None
    with pytest.raises(flashmem.BadBudget):
        parse_spec({"budget": "1GB", "host_budget": "lots", "models": [{"name": "a", "transformers": "X"}]})
    from flashmem.queue import run_queue

    with pytest.raises(flashmem.FlashmemError, match="repeats is 0; run the sequence at least once"):
        run_queue(spec, repeats=0)
    with pytest.raises(flashmem.FlashmemError, match="planner 'fast' is not"):
        parse_spec({"budget": "1GB", "planner": "fast", "models": [{"name": "a", "transformers": "X"}]})
    solver = parse_spec({"budget": "1GB", "planner": "solver", "models": [{"name": "a", "transformers": "X"}]})
    assert solver.planner == "solver" and spec.planner == "simple"
    with pytest.raises(flashmem.FlashmemError, match="needs the warm-up runs"):
        run_queue(solver, warmup=False)


def test_queue_with_the_solver_plans_the_sequence_and_stays_exact():
    """A spec's "planner": "solver": run_queue profiles the sequence after its first run and plans it with the
    solver; the timed runs use that plan, within the budget, with the outputs of the simple plan's run."""
    import torch.utils._pytree as pytree

    from flashmem.queue import parse_spec, run_queue

    raw = {"device": "cpu", "budget": "400KB", "dtype": "float32", "rounds": 2, "order": "random", "seed": 1,
           "models": [{"name": "llama", "transformers": "LlamaForCausalLM",
                       "config": {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                       "inputs": {"input_ids": {"shape": [1, 12], "dtype": "int64", "high": 256}}},
                      {"name": "vit", "transformers": "ViTModel",
                       "config": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "intermediate_size": 256, "image_size": 32, "patch_size": 8},
                       "inputs": {"pixel_values": {"shape": [1, 3, 32, 32]}}}]}
    simple = run_queue(parse_spec(raw))
    solved = run_queue(parse_spec(dict(raw, planner="solver")))
    assert simple.plan_summary["status"] == "simple"
    assert solved.plan_summary["status"] in ("optimal", "feasible", "fallback")
    assert solved.plan_summary["predicted_s"] > 0 and "note" in solved.plan_summary
    assert solved.peak_bytes <= solved.budget_bytes
    for a, b in zip(simple.results, solved.results):
        assert a.name == b.name and torch.equal(pytree.tree_leaves(a.output)[0], pytree.tree_leaves(b.output)[0])


def test_plan_with_split_bytes_names_the_blocks(llama_folder, tmp_path, capsys):
    # The small Llama's embedding table and LM head are 512 x 64 fp32, 128 KiB each: at 32 KiB the head
    # streams as 4 blocks of 128 rows and the table is read by rows (no weight of its own in the plan).
    out = tmp_path / "plan.json"
    assert main(["plan", str(llama_folder), "--budget", "120KiB", "--split-bytes", "32KiB", "--out", str(out)]) == 0
    names = json.loads(out.read_text())["weight_names"]
    assert [n for n in names if n.startswith("lm_head")] == [f"lm_head.parts.{k}.weight" for k in range(4)]
    assert not any(n.startswith("model.embed_tokens") for n in names)


def test_queue_spec_takes_split_bytes():
    from flashmem.queue import parse_spec

    base = {"budget": "1MB", "models": [{"name": "a", "transformers": "ViTModel"}]}
    assert parse_spec(base).split_bytes is None
    assert parse_spec(dict(base, split_bytes="64KiB")).split_bytes == 64 * 1024
    with pytest.raises(flashmem.BadBudget):
        parse_spec(dict(base, split_bytes="lots"))


def test_queue_spec_takes_cuda_graphs():
    from flashmem.queue import parse_spec

    base = {"budget": "1MB", "models": [{"name": "a", "transformers": "ViTModel"}]}
    assert parse_spec(base).cuda_graphs is False
    assert parse_spec(dict(base, cuda_graphs=True)).cuda_graphs is True
