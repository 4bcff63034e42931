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



def test_loss_counts_under_the_sample_average_count_the_packed_samples(setup):
    """What the sample average divides by (``loss_counts``, which the trainer combines micro-batches
    with) is the number of samples with scored tokens, also when a packed row holds several."""
    tok, model, samples = setup
    packed = collate(samples, tok, model.task_ids, pack=True, max_length=400)
    assert packed.labels.shape[0] < len(samples)
    scored = int((packed.labels != -100).sum())
    assert GenerativeObjective(model, loss_average="sample").loss_counts(packed)[0] == len(samples)
    assert GenerativeObjective(model, loss_average="token").loss_counts(packed)[0] == scored


def test_task_weights_combine_with_the_sample_average(setup):
    tok, model, samples = setup
    batch = collate(samples, tok, model.task_ids)
    own = torch.stack([_loss(model, collate([s], tok, model.task_ids), "token") for s in samples])
    weights = torch.tensor([3.0 if s.task == "doc_topic" else 1.0 for s in samples])
    objective = GenerativeObjective(model, task_weights={"doc_topic": 3.0}, loss_average="sample")
    with torch.no_grad():
        loss = objective(batch)["loss"]
    # the weights scale the sum, not the count: a weighted task's loss grows whatever else the batch holds
    torch.testing.assert_close(loss, (own * weights).sum() / len(samples), rtol=1e-5, atol=1e-6)


def test_a_task_weight_scales_its_loss_even_in_a_batch_of_that_task_alone(setup):
    """The weighted mean divided by the weights' sum cancelled a weight in one-task batches
    (``batch_tasks="single"``) and for a task alone in its objective's group."""
    tok, model, samples = setup
    alone = collate([s for s in samples if s.task == "doc_topic"], tok, model.task_ids)
    mixed = collate(samples, tok, model.task_ids)
    scored = mixed.labels != -100
    for average in ("token", "sample"):
        plain = _loss(model, alone, average)
        weighted = GenerativeObjective(model, task_weights={"doc_topic": 3.0}, loss_average=average)
        with torch.no_grad():
            torch.testing.assert_close(weighted(alone)["loss"], 3 * plain, rtol=1e-5, atol=1e-6)
            # token average over a mixed batch: doc_topic's tokens three times, the count unweighted
            if average == "token":
                parts = weighted(mixed)  # task_loss/<task>: that task's mean token cross-entropy
                tokens = {s.task: 0 for s in samples}
                for row, sample in enumerate(samples):
                    tokens[sample.task] += int(scored[row].sum())
                expected = sum((3.0 if t == "doc_topic" else 1.0) * parts[f"task_loss/{t}"] * n
                               for t, n in tokens.items()) / scored.sum()
                torch.testing.assert_close(parts["token_loss"], expected, rtol=1e-5, atol=1e-6)


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


def test_label_smoothing_spreads_over_the_classes_a_row_allows():
    """A row with every logit finite smooths as ``F.cross_entropy`` does; a closed-set row (−inf on
    the tokens it does not allow) as the cross-entropy over its allowed tokens alone would."""
    from moe_gen.objectives import smoothed_cross_entropy

    logits = torch.randn(6, 11, dtype=torch.float64)
    labels = torch.tensor([0, 3, 5, 7, 2, 10])
    torch.testing.assert_close(smoothed_cross_entropy(logits, labels, 0.1),
                               torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none"))
    allowed = [[0, 1, 4], [3], [5, 6, 9, 10], [7, 8], [2, 4, 6, 8], [10, 0]]
    closed = torch.full_like(logits, float("-inf"))
    for row, keep in enumerate(allowed):
        closed[row, keep] = logits[row, keep]
    got = smoothed_cross_entropy(closed, labels, 0.1)
    for row, keep in enumerate(allowed):
        label = torch.tensor([keep.index(int(labels[row]))])
        want = torch.nn.functional.cross_entropy(logits[row, keep].unsqueeze(0), label, label_smoothing=0.1)
        torch.testing.assert_close(got[row], want)


def test_closed_set_loss_with_label_smoothing_is_on_the_allowed_tokens_scale(setup):
    """Smoothing over the whole vocabulary put mass on tokens a closed-set answer cannot hold (a
    token loss near 1,000 with a finite fill, and a gradient pushing every allowed logit down)."""
    tok, model, samples = setup
    closed = [s for s in samples if s.task == "digit_classification"]
    batch = collate(closed, tok, model.task_ids)
    assert batch.allowed_index.numel()
    losses = {}
    for smoothing in (0.0, 0.1):
        model.config.label_smoothing = smoothing
        with torch.no_grad():
            losses[smoothing] = float(GenerativeObjective(model)(batch)["token_loss"])
    model.config.label_smoothing = 0.0
    # the untrained model is near uniform over each row's allowed tokens, where the smoothed term
    # (mean −log p over them) is close to the label's own −log p
    assert abs(losses[0.1] - losses[0.0]) < 0.5, losses


def test_the_objective_smooths_by_the_models_label_smoothing_unless_told_otherwise(setup):
    """``label_smoothing=None`` (training) reads ``ModelConfig.label_smoothing``: the token loss is
    ``F.cross_entropy(label_smoothing=ε)`` over the scored positions of a batch with no closed set;
    a given value, 0 included, overrides it."""
    tok, model, samples = setup
    batch = collate([s for s in samples if s.task == "visual_grounding"], tok, model.task_ids)
    assert not batch.allowed_index.numel()  # (a closed set would restrict the softmax: no plain F.cross_entropy)
    scored = batch.labels != -100
    model.config.label_smoothing = 0.1
    try:
        with torch.no_grad():
            logits = model(batch).logits.float()[scored]
            own = GenerativeObjective(model)(batch)["token_loss"]
            plain = GenerativeObjective(model, label_smoothing=0.0)(batch)["token_loss"]
    finally:
        model.config.label_smoothing = 0.0
    labels = batch.labels[scored]
    torch.testing.assert_close(own, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(logits, labels),
                               rtol=1e-5, atol=1e-6)
    assert abs(float(own - plain)) > 1e-3
