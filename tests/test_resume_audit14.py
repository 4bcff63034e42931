"""A checkpoint records its tokenizer, and a run resumed with another is refused (audit 14); the
test failed before its fix."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import flavour_with

from moe_gen.model import GeneralistModel
from moe_gen.tasks import Task, Tokenizer
from moe_gen.tasks.tokenizer import default_corpus
from moe_gen.trainer import TrainConfig, Trainer

ROWS = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(8)]
SIZES = {"vocab_size": 2000, "num_bins": 16, "num_sentinels": 4}


def _run(tok, tmp_path, resume: bool = False) -> Trainer:
    task = Task("qa", "[TEXT:q] -> [TEXT:a]", ROWS)
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug"), [task], tok)
    config = TrainConfig(progress=False, tensorboard=False, batch_size=4, log_every=1, warmup_steps=1,
                         num_threads=1, steps=3)
    return Trainer(model, [task], config, output_dir=str(tmp_path), resume=resume)


def test_a_run_resumed_with_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    """The weights loaded under other texts' ids without a word (the CLI's Tokenizer.default() is
    trained on the running Python's pydoc topics, which change between releases)."""
    corpus = default_corpus()
    first = Tokenizer.train(corpus, **SIZES)
    other = Tokenizer.train(corpus[: len(corpus) * 9 // 10], **SIZES)
    assert first.vocab_size == other.vocab_size and first.encode("hello world") != other.encode("hello world")
    with _run(first, tmp_path) as run:
        run.train_step(1)
        run.step = 1
        path = run.save_checkpoint()
    with pytest.raises(ValueError, match=f"checkpoint {path} was trained with another tokenizer than this run's"):
        _run(other, tmp_path, resume=True)
    with _run(Tokenizer.train(corpus, **SIZES), tmp_path, resume=True) as resumed:  # the same one, trained again
        assert resumed.step == 1
    # a checkpoint written before tokenizers were recorded resumes as it did
    state_file = os.path.join(path, "trainer.json")
    with open(state_file) as f:
        state = json.load(f)
    del state["tokenizer"]
    with open(state_file, "w") as f:
        json.dump(state, f)
    with _run(other, tmp_path, resume=True) as resumed:
        assert resumed.step == 1
