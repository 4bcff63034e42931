"""Model-internals defects found by an audit (2026-12-05, seventh session); each test failed
before its fix."""

from __future__ import annotations

import pytest
import torch

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.tasks import Task, Tokenizer, collate, load_preset


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _build(tasks, tok, **settings):
    torch.manual_seed(0)
    moe = settings.pop("moe", {})
    moe.setdefault("router", RouterConfig(strategy="token"))
    return GeneralistModel.build(flavour("debug", moe=moe, **settings), tasks, tok)


def test_a_sample_without_inputs_reads_nothing_of_the_rows_it_shares(tok):
    """Its cross-attention queries had no key and attended to every key of the row: other samples'
    inputs when packed, padding otherwise (logits moved by up to 0.97)."""
    lm = Task("lm", "-> [TEXT:text]", [{"text": "the cat sat on the mat"}])
    echo = Task("echo", "[TEXT:src] -> [TEXT:dst]", [{"src": "one two three four five six seven", "dst": "x"},
                                                     {"src": "completely different words here", "dst": "y"}])
    model = _build([lm, echo], tok).eval()
    sample = list(lm.samples(tok, training=False))[0]
    others = list(echo.samples(tok, training=False))

    def lm_logits(samples, **kw):
        batch = collate(samples, tok, model.task_ids, **kw)
        with torch.no_grad():
            logits = model(batch).logits
        keep = (batch.decoder.tags.task[0] == model.task_ids["lm"]) & ~batch.decoder.padding_mask[0]
        return logits[0, keep]

    alone = lm_logits([sample])
    torch.testing.assert_close(lm_logits([sample, others[0]]), alone)
    torch.testing.assert_close(lm_logits([sample, others[0]], pack=True, max_length=64), alone)
    torch.testing.assert_close(lm_logits([sample, others[1]], pack=True, max_length=64), alone)


@pytest.mark.parametrize("layout, limit", [("encoder-decoder", 24), ("decoder-only", 32)])
def test_decoding_past_the_position_table_is_refused(tok, layout, limit):
    task = load_preset("digit_captioning", "train", limit=2)
    model = _build([task], tok, max_positions=limit, layout=layout).eval()
    with pytest.raises(ValueError, match=f"past the learned position table \\(ModelConfig.max_positions={limit}\\)"):
        model.infer(task, task.data[:1], max_new_tokens=30, min_length=30)
    model.infer(task, task.data[:1], max_new_tokens=4)  # within the table


def test_decoding_exactly_to_the_end_of_the_position_table_is_allowed(tok):
    """The learned table has positions 0 .. max_positions - 1: an answer whose last fed token sits at
    max_positions - 1 decodes, one token more is refused (it would read the last row again)."""
    task = load_preset("digit_captioning", "train", limit=2)
    limit = 24
    model = _build([task], tok, max_positions=limit).eval()
    sample = model.plan(task).encode(task.data[0], 0, training=False, inference=True, template=0)
    first = sum(len(c) for c in sample.decoder) + 1  # the decoder position of the first generated token fed back
    fits = limit - first + 1  # tokens fed at positions first .. limit - 1, and the answer's EOS, never fed
    answer = model.infer(task, task.data[:1], max_new_tokens=fits, min_length=fits)[0]
    assert len(answer.tokens) == fits
    with pytest.raises(ValueError, match=f"past the learned position table \\(ModelConfig.max_positions={limit}\\)"):
        model.infer(task, task.data[:1], max_new_tokens=fits + 1, min_length=fits + 1)


def test_the_dense_twin_matches_what_it_can_and_refuses_what_it_cannot():
    dense = flavour("debug", moe={"every": 0}, ffn_hidden=512)
    assert dense.dense_twin() == dense  # already dense: unchanged (it was shrunk to 128)
    shared = flavour("debug", moe={"experts": {"kind": "mlp", "shared_expert": True, "shared_hidden": 48}})
    assert shared.dense_twin().ffn_hidden == 2 * 64 + 48
    with pytest.raises(ValueError, match="ffn_hidden=256 differs from the MoE blocks' active width 128"):
        flavour("debug", moe={"every": 2}, ffn_hidden=256).dense_twin()


def test_added_tasks_get_frame_heads_when_every_feature_is_predicted(tok):
    model = _build([load_preset("doc_topic", "train", limit=2)], tok, predict_all_features=True)
    assert list(model.frame_heads) == []
    model.add_tasks([load_preset("digit_classification", "train", limit=2)])
    assert list(model.frame_heads) == ["image_patch"]


def test_model_shapes_that_cannot_run_or_see_their_input_are_refused():
    with pytest.raises(ValueError, match="decoder_layers must be >= 1"):
        flavour("debug", decoder_layers=0)
    for base in (0.0, -10000.0, float("nan")):
        with pytest.raises(ValueError, match="rotary_base must be a finite number > 0"):
            flavour("debug", positions="rotary", rotary_base=base)
    with pytest.raises(ValueError, match=r"linear experts as FFNs.*\{'ffn_hidden': 128\}"):
        flavour("debug", moe={"every": 2, "experts": "linear"})
    with pytest.raises(ValueError, match=r"\{'moe.expert_hidden': 32\}"):
        flavour("debug", moe={"experts": "linear", "expert_hidden": 32})
    flavour("debug", encoder_layers=0)  # an encoder is optional


# ---- the model-core audit (2026-12-06, twelfth session) ---------------------------------------------

def test_add_tasks_builds_new_heads_in_a_bf16_models_dtype(tok, tmp_path):
    """A bf16 model (as from_pretrained gives one saved in bf16) got fp32 frame and stop heads from
    add_tasks: the new speaking task's first forward failed on mixed dtypes."""
    from helpers import build

    from moe_gen.objectives import GenerativeObjective

    build([load_preset("digit_classification", "train", limit=3)], tok).to(torch.bfloat16).save_pretrained(
        str(tmp_path))
    model = GeneralistModel.from_pretrained(str(tmp_path))
    new = load_preset("text_to_speech", "train", limit=3)
    added = model.add_tasks([new])
    assert {p.dtype for n, p in model.named_parameters() if n.startswith(("frame_heads", "stop_heads", "adapters"))
            } == {torch.bfloat16}, added
    loss = GenerativeObjective(model)(collate([new.encode(0, tok)], tok, model.task_ids))["loss"]
    assert torch.isfinite(loss)
    assert model.infer(new, new.data[:1], max_frames=4)[0].frames.shape[0] >= 1


def test_a_small_bf16_model_with_an_image_tokenizer_loads_in_bf16(tok, tmp_path):
    """The image tokenizer, kept fp32 by design, outweighed the rest of a small bf16 model: the load
    took the model for fp32, set the weights back one by one and left the (unsaved) location basis
    fp32 beside a bf16 location embedding, so every forward of the loaded model failed."""
    from helpers import build

    tasks = [load_preset("text_to_image", "train", limit=2), load_preset("visual_grounding", "train", limit=2)]
    model = build(tasks, tok, d_model=16, num_heads=2, encoder_layers=1, decoder_layers=1, ffn_hidden=16,
                  location_frequencies=8).to(torch.bfloat16).eval()
    tokenizer_weights = sum(p.numel() for n, p in model.named_parameters() if n.startswith("image_tokenizers"))
    assert 2 * tokenizer_weights > sum(p.numel() for p in model.parameters())  # the case: the tokenizer outweighs
    model.save_pretrained(str(tmp_path))
    loaded = GeneralistModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.location_embedding.weight.dtype == loaded.token_embedding.weight.dtype == torch.bfloat16
    batch = collate([s for t in tasks for s in t.samples(tok)], tok, model.task_ids)
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    assert loaded.infer(tasks[1], tasks[1].data[:1])[0].box == model.infer(tasks[1], tasks[1].data[:1])[0].box


@pytest.mark.parametrize("decoder_only", [False, True])
def test_a_row_past_the_position_table_is_named_and_skippable_in_infer(tok, decoder_only):
    """One long row among short ones failed the whole infer call with an error naming neither task nor
    row, and on_error="skip" did not skip it: it is a TaskDataError of its row now."""
    from helpers import build

    from moe_gen.tasks import TaskDataError

    rows = [{"text": "a short note", "label": "a"}, {"text": "another short note", "label": "b"}]
    long_row = {"text": " ".join(["word"] * 200), "label": "a"}
    layout = {"layout": "decoder-only"} if decoder_only else {}
    strict = Task("notes", "[TEXT:text] topic? -> [TEXT:label,closed_set]", rows)
    model = build([strict], tok, max_positions=64, **layout).eval()
    short = [p.text for p in model.infer(strict, rows)]
    with pytest.raises(TaskDataError, match=r"task 'notes', row 1: a sample reaches position \d+, past the learned "
                                            r"position table \(ModelConfig.max_positions=64\)"):
        model.infer(strict, [rows[0], long_row, rows[1]])
    lenient = Task("notes", "[TEXT:text] topic? -> [TEXT:label,closed_set]", rows, on_error="skip")
    answers = model.infer(lenient, [rows[0], long_row, rows[1]])
    assert answers[1] is None and [answers[0].text, answers[2].text] == short and lenient.skipped == 1


@pytest.mark.parametrize("on_features", [True, False])
def test_frame_rows_count_against_the_position_table_only_where_they_read_it(tok, on_features):
    """With ``positions_on_features=False`` feature rows take no row of the learned position table
    (their adapter positions them), so a frame answer may run past ``max_positions``; with it, the
    same answer is refused where its rows would read past the table."""
    import math

    task = load_preset("text_to_speech", "train", limit=1)
    model = _build([task], tok, max_positions=24, positions_on_features=on_features).eval()
    head = model.stop_heads["audio_tgt_fbank"]
    with torch.no_grad():  # never stops: the answer runs to max_frames
        head.weight.zero_()
        head.bias.fill_(math.log(0.4 / 0.6))
    if on_features:
        with pytest.raises(ValueError, match=r"past the learned position table \(ModelConfig.max_positions=24\)"):
            model.infer(task, task.data[:1], max_frames=40)
    else:
        assert len(model.infer(task, task.data[:1], max_frames=40)[0].frames) == 40
