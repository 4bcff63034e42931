"""What an audit of the benchmark scripts found (2026-12-05, eighth session), each pinned: they must
measure what their tables say (gradients in the training state, recomputation charged to
backward, the activations a forward keeps) and honour their options."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from helpers import load_script

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.fixture
def scripts_path(monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)  # the scripts import each other by module name


def test_work_inside_backward_counts_as_backward(monkeypatch, scripts_path):
    bench = load_script("bench_train", monkeypatch)
    timers = bench.Timers()
    attention = timers.wrap("attention", lambda: sum(range(200_000)))
    backward = timers.wrap("backward", lambda: attention())  # a checkpointed forward, recomputed in backward
    attention()
    backward()
    assert timers.total["backward"] > 0 and set(timers.total) == {"attention", "backward"}
    alone = timers.total["attention"]
    backward()
    assert timers.total["attention"] == alone  # the recomputation went to backward, not attention


def test_the_training_state_counts_a_gradient_per_trainable_parameter(monkeypatch, scripts_path, tmp_path):
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset
    from moe_gen.trainer import TrainConfig, Trainer

    bench = load_script("bench_train", monkeypatch)
    tasks = [load_preset("table_species", "train", limit=8)]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), tasks, Tokenizer.default())
    trainer = Trainer(model, tasks, TrainConfig(steps=1, batch_size=4, progress=False, tensorboard=False),
                      output_dir=str(tmp_path))
    trainer.train_step(1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    adam = sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)
    assert bench._state_bytes(trainer) >= 2 * weights + adam  # counted weights + AdamW only: grads were None


def test_activations_are_what_the_forward_keeps(monkeypatch, scripts_path):
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.objectives import GenerativeObjective
    from moe_gen.tasks import Tokenizer, collate, load_preset

    bench = load_script("bench_checkpointing", monkeypatch)
    tok = Tokenizer.default()
    tasks = [load_preset(n, "train", limit=2) for n in ("digit_classification", "table_species")]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), tasks, tok).train()
    batch = collate([s for t in tasks for s in t.samples(tok)], tok, model.task_ids)
    plain = bench._kept_for_backward(model, GenerativeObjective(model), batch)
    model.set_activation_checkpointing(True)
    recomputed = bench._kept_for_backward(model, GenerativeObjective(model), batch)
    assert 0 < recomputed < plain


def test_quick_leaves_the_options_given_on_the_command_line(monkeypatch, scripts_path):
    bench = load_script("bench_moe_layer", monkeypatch)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "layer.json")
        bench.main(["--quick", "--runs", "1", "--tokens", "32", "--experts", "2", "--topk", "1", "--impls", "dense",
                    "--no-memory", "--no-gpu", "--out", out])
        result = json.load(open(out))
    assert result["settings"]["runs"] == 1 and {r["tokens"] for r in result["rows"]} == {32}


def test_the_analysis_benchmark_reads_a_saved_models_own_tasks(monkeypatch, scripts_path, tmp_path):
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, load_preset

    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug"), [load_preset("table_species", "train", limit=8)],
                                  Tokenizer.default())
    model.save_pretrained(str(tmp_path / "model"))
    bench = load_script("bench_analysis", monkeypatch)
    out = tmp_path / "analysis.json"
    assert bench.main(["--model", str(tmp_path / "model"), "--rows", "2", "--repeats", "1", "--workloads",
                       "forward", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"] == ["table_species"]  # the defaults include tasks it lacks
