"""Masked-objective, interop and FSDP defects found by an audit (2026-12-05, seventh session); each
test failed before its fix (the FSDP one is in test_distributed_runs.py)."""

from __future__ import annotations

import pytest
import torch

from moe_gen import from_hf_moe
from moe_gen.model import GeneralistModel, flavour
from moe_gen.objectives import MaskedObjective
from moe_gen.tasks import Tokenizer, load_preset
from moe_gen.trainer import TrainConfig


def test_an_alpha_of_none_inside_a_mapping_is_refused():
    """It passed the check, then training failed in float(None)."""
    with pytest.raises(ValueError, match=r"masked_alpha\['TEXT'\] must be a finite number >= 0, got None"):
        TrainConfig(masked_alpha={"TEXT": None})
    with pytest.raises(ValueError, match=r"masked_target_alpha\['IMAGE'\] must be a finite number >= 0, got None"):
        TrainConfig(masked_target_alpha={"IMAGE": None})
    TrainConfig(masked_target_alpha=None)  # the whole field: it follows masked_alpha


def test_the_masked_objective_checks_its_budgets_and_alphas():
    """Built from Python, a target budget of 0 trained on nothing without a word."""
    tasks = [load_preset("digit_masked_modeling", "train", limit=2)]
    model = GeneralistModel.build(flavour("debug", predict_all_features=True), tasks, Tokenizer.default())
    for settings, field in (({"target_budget": 0}, "masked_target_budget >= 1"),
                            ({"input_budget": -3}, "masked_input_budget must be >= 0"),
                            ({"alpha": -1.0}, "masked_alpha must be a finite number >= 0")):
        with pytest.raises(ValueError, match=field):
            MaskedObjective(model, **settings)


def test_an_activation_override_also_covers_the_shared_expert():
    """With a shared expert the block's own activation was named anyway, so gelu_fast (which
    moe_gen cannot name) failed with "pass activation=" when it had been passed."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    block = Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(
        hidden_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False, hidden_act="gelu_fast"))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    block.eval()
    x = torch.randn(2, 5, 32)
    expected = block(x)
    expected = expected[0] if isinstance(expected, tuple) else expected  # (older transformers add router logits)
    torch.testing.assert_close(from_hf_moe(block, activation="gelu_tanh")(x).output, expected, atol=1e-5, rtol=1e-4)


# ---- a second objectives audit (2026-12-05, ninth session) ------------------------------------------

def test_a_masked_frame_target_stops_only_at_the_signals_end():
    """Every masked target chunk got stop = 1 on its last picked row, though rows picked from the
    middle of the audio do not end it (the stop head learned to stop at random rows)."""
    import random

    from moe_gen.masking import _streams, mask_sample
    from moe_gen.tasks import collate

    tok = Tokenizer.default()
    task = load_preset("text_to_speech", "train", limit=2)
    sample = next(iter(task.samples(tok)))
    last = len(_streams(sample)["AUDIO"]) - 1
    stops_at_end = 0
    for seed in range(8):
        masked = mask_sample(sample, input_budget=4, target_budget=6, alpha=1.0, rng=random.Random(seed))
        batch = collate([masked], tok, {task.name: 0}, pass_name="masked")
        rows = [p for c in masked.decoder if c.rows is not None for p in c.position_ids]
        for stop in batch.frame_stop.values():
            flagged = [row for row, flag in zip(rows, stop.tolist()) if flag == 1.0]
            assert flagged == ([last] if last in rows else []), seed
            stops_at_end += bool(flagged)
    assert 0 < stops_at_end < 8  # both cases were drawn


def test_a_caption_is_its_own_positive_wherever_its_template_starts_it():
    from moe_gen.objectives import _same_rows

    tokens = torch.tensor([[5, 6, 3, 0, 0], [0, 0, 5, 6, 3], [7, 8, 9, 3, 0]])  # rows 0 and 1: one caption
    scored = tokens != 0
    assert _same_rows(tokens, scored).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
