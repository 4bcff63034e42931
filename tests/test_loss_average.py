"""TrainConfig.loss_average: token cross-entropy averaged per token (the default) or per sample, so a
one-token label weighs as much as a detection's dozens of box tokens."""

import pytest
import torch

from moe_gen.model import GeneralistModel, flavour
from moe_gen.objectives import GenerativeObjective
from moe_gen.tasks import Tokenizer, collate, load_preset
from moe_gen.trainer import TrainConfig

# answers of very different lengths: a closed-set label, a topic phrase, 4 location tokens, a table class
TASKS = ["digit_classification", "doc_topic", "visual_grounding", "table_species"]


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.default()
    tasks = [load_preset(n, "train", limit=3) for n in TASKS]
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour("debug").dense_twin(), tasks, tok).eval()
    samples = [s for t in tasks for s in t.samples(tok)]
    return tok, model, samples


def _loss(model, batch, average):
    with torch.no_grad():
        return GenerativeObjective(model, loss_average=average)(batch)["loss"]


def test_sample_average_is_the_mean_of_each_samples_own_loss(setup):
    tok, model, samples = setup
    batch = collate(samples, tok, model.task_ids)
    # a batch of one sample: its token mean is that sample's own loss
    own = torch.stack([_loss(model, collate([s], tok, model.task_ids), "token") for s in samples])
    scored = (batch.labels != -100).sum(1)
    assert len(set(scored.tolist())) > 2  # the answers differ in length, so the two averages differ
    torch.testing.assert_close(_loss(model, batch, "sample"), own.mean(), rtol=1e-5, atol=1e-6)
    by_tokens = (own * scored).sum() / scored.sum()
    torch.testing.assert_close(_loss(model, batch, "token"), by_tokens, rtol=1e-5, atol=1e-6)
    assert abs(float(own.mean() - by_tokens)) > 1e-3


def test_packed_rows_average_each_packed_sample_on_its_own(setup):
    tok, model, samples = setup
    plain = collate(samples, tok, model.task_ids)
    packed = collate(samples, tok, model.task_ids, pack=True, max_length=400)
    assert packed.labels.shape[0] < plain.labels.shape[0]  # some rows hold several samples
    torch.testing.assert_close(_loss(model, packed, "sample"), _loss(model, plain, "sample"), rtol=1e-4, atol=1e-5)


def test_task_weights_combine_with_the_sample_average(setup):
    tok, model, samples = setup
    batch = collate(samples, tok, model.task_ids)
    own = torch.stack([_loss(model, collate([s], tok, model.task_ids), "token") for s in samples])
    weights = torch.tensor([3.0 if s.task == "doc_topic" else 1.0 for s in samples])
    objective = GenerativeObjective(model, task_weights={"doc_topic": 3.0}, loss_average="sample")
    with torch.no_grad():
        loss = objective(batch)["loss"]
    torch.testing.assert_close(loss, (own * weights).sum() / weights.sum(), rtol=1e-5, atol=1e-6)


def test_unknown_loss_average_is_refused(setup):
    _, model, _ = setup
    with pytest.raises(ValueError, match="loss_average must be"):
        TrainConfig(loss_average="row")
    with pytest.raises(ValueError, match="loss_average must be one of token, sample; got 'row'"):
        GenerativeObjective(model, loss_average="row")


@pytest.mark.parametrize("name", ["generative", "masked", "contrastive"])
def test_every_objective_takes_loss_average_from_the_train_config(setup, name):
    from moe_gen.objectives import OBJECTIVES

    _, model, _ = setup
    objective = OBJECTIVES.get(name).from_train_config(model, TrainConfig(loss_average="sample"))
    generative = getattr(objective, "generative", objective)  # the contrastive objective wraps one
    assert generative.loss_average == "sample"


def test_bench_config_refuses_an_unknown_loss_average():
    from moe_gen.quality.runner import BenchConfig

    with pytest.raises(ValueError, match="BenchConfig.loss_average must be one of token, sample, got 'row'"):
        BenchConfig(loss_average="row")
