"""From instruction and data to batches with tags: plans, encoding, collation, presets, errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from moe_gen import MODALITIES, TASKS
from moe_gen.registry import METRICS
from moe_gen.routing.tags import MODALITIES as TAG_MODALITIES
from moe_gen.routing.tags import ROLES
from moe_gen.tasks import (
    IGNORE_INDEX,
    Task,
    TaskDataError,
    TaskPlan,
    Tokenizer,
    collate,
    load_preset,
    metrics,
    pack_rows,
    preset_info,
)
from moe_gen.tasks.modalities.box import dequantize_box

INPUT, TARGET, PROMPT = (ROLES.index(r) for r in ("input", "target", "prompt"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def task_ids():
    return {name: i for i, name in enumerate(TASKS.list())}


def test_presets_cover_enough_tasks_and_modalities():
    names = TASKS.list()
    assert len(names) >= 16
    modalities = set()
    for name in names:
        info = preset_info(name)
        template = Task(name, info.instruction, []).instruction.templates[0]
        modalities |= {s.modality for s in template.encoder + template.decoder if not s.is_literal}
        assert info.metrics and info.source
    assert len(modalities) >= 7, modalities


@pytest.mark.parametrize("name", TASKS.list())
def test_every_preset_encodes_and_collates_real_samples(name, tok, task_ids):
    task = load_preset(name, "train", limit=4)
    assert len(task) == 4
    samples = list(task.samples(tok))
    assert len(samples) == 4 and task.skipped == 0
    batch = collate(samples, tok, task_ids)
    enc, dec = batch.encoder, batch.decoder
    B, S = enc.tokens.shape
    L = dec.tokens.shape[1]
    assert B == 4 and dec.padding_mask.shape == (4, L) and batch.labels.shape == (4, L)
    # every valid encoder position is either a token or a feature row, exactly once
    filled = enc.is_token.clone().reshape(-1)
    for rows_index in enc.index.values():
        assert not filled[rows_index].any()
        filled[rows_index] = True
    assert torch.equal(filled.view(B, S), ~enc.padding_mask)
    for adaptor, rows in enc.rows.items():
        assert rows.shape[0] == enc.index[adaptor].shape[0] == enc.positions[adaptor].shape[0]
        assert torch.isfinite(rows).all()
    # tags: task, bidirectional encoder, causal decoder, roles
    assert (enc.tags.task[~enc.padding_mask] == task_ids[name]).all()
    assert not enc.tags.causal[~enc.padding_mask].any()
    assert dec.tags.causal[~dec.padding_mask].all()
    assert set(enc.tags.role[~enc.padding_mask].tolist()) <= {INPUT, PROMPT}
    assert INPUT in enc.tags.role[~enc.padding_mask].tolist()
    # loss: token labels only at valid target positions; frames for continuous targets
    scored = batch.labels != IGNORE_INDEX
    assert not scored[dec.padding_mask].any()
    assert (dec.tags.role[scored] == TARGET).all()
    frames = sum(int(v.shape[0]) for v in batch.frame_targets.values())
    assert scored.any() or frames > 0
    # the task-modalities multi-hot holds the modality of every position of the sample
    valid = ~enc.padding_mask
    own = torch.nn.functional.one_hot(enc.tags.modality[valid], len(TAG_MODALITIES)).bool()
    assert (enc.tags.task_modalities[valid] | ~own).all()
    assert sum(batch.tokens_per_modality.values()) == int(valid.sum() + (~dec.padding_mask).sum())


def test_grounding_example_by_hand(tok):
    task = Task("ground", '[IMAGE:img] which region does the text " [TEXT:cap] " describe? -> [BOX:box]',
                [{"img": np.zeros((100, 200, 3), dtype=np.uint8), "cap": "a dog", "box": [50, 25, 150, 75]}])
    sample = task.plan(tok).encode(task.data[0], 0)
    batch = collate([sample], tok, {"ground": 3})
    enc, dec = batch.encoder, batch.decoder
    prompt_a = tok.encode('which region does the text "')
    caption = tok.encode("a dog")
    prompt_b = tok.encode('" describe?')
    n_img = 16  # 32x32 image, 8x8 patches
    assert enc.tokens.shape == (1, n_img + len(prompt_a) + len(caption) + len(prompt_b))
    assert not enc.is_token[0, :n_img].any() and enc.is_token[0, n_img:].all()
    assert enc.tokens[0, n_img:].tolist() == prompt_a + caption + prompt_b
    modality = enc.tags.modality[0].tolist()
    assert modality == [TAG_MODALITIES.index("IMAGE")] * n_img + [0] * (len(prompt_a) + len(caption) + len(prompt_b))
    roles = enc.tags.role[0].tolist()
    assert roles == ([INPUT] * n_img + [PROMPT] * len(prompt_a) + [INPUT] * len(caption)
                     + [PROMPT] * len(prompt_b))
    assert (enc.tags.task == 3).all() and not enc.tags.causal.any()
    used = enc.tags.task_modalities[0, 0]
    assert {TAG_MODALITIES[i] for i in used.nonzero().squeeze(1).tolist()} == {"IMAGE", "TEXT", "BOX"}
    # decoder: BOS then the 4 box tokens; labels are the 4 tokens and EOS
    bins = [tok.bin_id(k) for k in (250, 250, 749, 749)]  # 50/200·999, 25/100·999, ...
    assert dec.tokens[0].tolist() == [tok.bos_id] + bins
    assert batch.labels[0].tolist() == bins + [tok.eos_id]
    assert dec.tags.modality[0].tolist() == [TAG_MODALITIES.index("BOX")] * 5
    assert dec.tags.role[0].tolist() == [TARGET] * 5 and dec.tags.causal.all()
    back = dequantize_box([tok.bin_index(b) for b in bins], 200, 100)
    assert np.allclose(back, [50, 25, 150, 75], atol=0.2)
    assert task.plan(tok).decode_specs()[0].kind == "box"


def test_without_box_targets_a_sample_keeps_the_size_of_its_first_image(tok):
    """``Sample.meta["image_size"]`` is the first image's (width, height) where no box target
    says which image boxes map back to, and absent without images."""
    wide, tall = np.zeros((8, 24, 3), dtype=np.uint8), np.zeros((20, 12, 3), dtype=np.uint8)
    two = Task("two", "[IMAGE:a] [IMAGE:b] same? -> [TEXT:y]", [{"a": wide, "b": tall, "y": "no"},
                                                                 {"a": tall, "b": wide, "y": "no"}])
    assert two.encode(0, tok, training=False).meta["image_size"] == (24, 8)
    assert two.encode(1, tok, training=False).meta["image_size"] == (12, 20)
    assert "image_size" not in Task("t", "[TEXT:x] -> [TEXT:y]", [{"x": "a", "y": "b"}]).encode(0, tok).meta


def test_closed_set_trie_and_forced_prefix(tok):
    rows = [{"sentence": "great film", "label": "positive"}, {"sentence": "dull", "label": "negative"}]
    instruction = ('is the sentiment of text " [TEXT:sentence] " positive or negative? -> is the sentiment '
                   'of text " [TEXT:sentence,no_loss] " positive or negative? [TEXT:label,closed_set]')
    task = Task("sst", instruction, rows)
    plan = task.plan(tok)
    spec = plan.decode_specs()[0]
    assert spec.kind == "closed_set" and spec.labels == ("negative", "positive")
    first = tok.encode("positive")[0]
    assert first in spec.trie
    sample = plan.encode(rows[0], 0)
    batch = collate([sample], tok, {"sst": 0})
    scored = (batch.labels[0] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
    # only the label and EOS carry loss; the copied sentence and literal text are prompt
    assert batch.labels[0, scored].tolist() == tok.encode("positive") + [tok.eos_id]
    assert set(batch.decoder.tags.role[0, : scored[0]].tolist()) == {PROMPT}
    # the loss of closed-set positions is a softmax over what the trie allows there
    assert batch.allowed_index.numel() == len(scored)
    first_options = set(batch.allowed_tokens[0][batch.allowed_tokens[0] >= 0].tolist())
    assert first_options == {tok.encode("positive")[0], tok.encode("negative")[0]}
    assert batch.allowed_tokens[-1].tolist()[:1] == [tok.eos_id]
    with pytest.raises(TaskDataError, match="label 'neutral' is not in the closed set"):
        plan.encode({"sentence": "ok", "label": "neutral"}, 5)


def test_repetition_expands_per_item(tok):
    task = load_preset("digit_detection", "train", limit=3)
    row = task.data[0]
    sample = task.plan(tok).encode(row, 0)
    boxes = [c for c in sample.decoder if c.modality == "BOX"]
    assert len(boxes) == len(row["boxes"]) and all(len(c) == 4 for c in boxes)
    bad = dict(row, labels=row["labels"] + ["extra"])
    with pytest.raises(TaskDataError, match="repetition group 0 have different lengths"):
        task.plan(tok).encode(bad, 7)


def test_bad_data_names_task_column_and_row(tok, tmp_path):
    task = Task("cap", "[IMAGE:img] what does the image describe? -> [TEXT:cap]",
                [{"img": np.zeros((8, 8, 3), np.uint8), "cap": "x"}, {"image": 1, "cap": "y"},
                 {"img": "a caption, not an image", "cap": "z"}])
    with pytest.raises(TaskDataError, match=r"task 'cap', row 1: missing column 'img' \(the row has 'image', 'cap'\)"):
        task.encode(1, tok)
    with pytest.raises(TaskDataError, match="task 'cap', column 'img', row 2: an IMAGE slot got text"):
        task.encode(2, tok)
    with pytest.raises(TaskDataError, match="task 'swap', column 'cap', row 0: a TEXT slot needs text, got ndarray"):
        Task("swap", "[TEXT:cap,mask_ratio=0.2] -> [TEXT:cap]", [{"cap": np.zeros(3)}]).encode(0, tok)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    skipping = Task("cap", "[IMAGE:img] -> [TEXT:cap]",
                    [{"img": str(corrupt), "cap": "a"}, {"img": np.zeros((8, 8)), "cap": "b"}], on_error="skip")
    samples = list(skipping.samples(tok))
    assert len(samples) == 1 and skipping.skipped == 1 and "cannot decode the image" in skipping.errors[0]


def test_positional_rows_give_one_value_per_slot_without_a_column(tok):
    plan = TaskPlan("pos", "[TEXT] what? -> [TEXT]", tok)
    assert plan.encode(("a b", "c"), 3).lengths() == plan.encode(["a b", "c"], 3).lengths()
    for row in [("a b", "c", "extra"), ["a b", "c", "x", "y"]]:  # were silently dropped
        with pytest.raises(TaskDataError, match=rf"task 'pos', row 3: the instruction takes 2 values by position, "
                                                rf"the row gives {len(row)}"):
            plan.encode(row, 3)
    with pytest.raises(TaskDataError, match=r"task 'pos', row 3: no value for slot \[TEXT\] \(position 1; the "
                                            r"instruction takes 2 values by position, the row gives 1\)"):
        plan.encode(("a b",), 3)
    # at inference the target may be left off, but a row still holds no more than the template takes
    assert plan.encode(("a b",), 3, inference=True).lengths() == plan.encode(("a b", "c"), 3, inference=True).lengths()
    with pytest.raises(TaskDataError, match="the instruction takes 2 values by position, the row gives 3"):
        plan.encode(("a b", "c", "x"), 3, inference=True)
    with pytest.raises(TaskDataError, match="rows must be dicts by column, got tuple"):
        TaskPlan("col", "[TEXT:a] -> [TEXT:b]", tok).encode(("x", "y"), 1)


def test_unknown_preprocessor_or_adaptor_is_a_planning_error(tok):
    with pytest.raises(ValueError, match="unknown preprocessor 'image_dalle'; known: "):
        TaskPlan("t", "[IMAGE:img,preprocess=image_dalle] -> [TEXT:c]", tok)
    with pytest.raises(ValueError, match="unknown adaptor 'image_resnet'"):
        TaskPlan("t", "[IMAGE:img,adaptor=image_resnet] -> [TEXT:c]", tok)


def test_jsonl_rows_with_paths_bytes_and_arrays(tok, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "a.png")
    import base64
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(buffer, format="PNG")
    lines = [{"img": "a.png", "cap": "from a path"},
             {"img": {"base64": base64.b64encode(buffer.getvalue()).decode()}, "cap": "from bytes"},
             {"img": np.ones((4, 4)).tolist(), "cap": "from a nested list"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    task = Task("cap", "[IMAGE:img] -> [TEXT:cap]", str(path))
    samples = [task.encode(i, tok) for i in range(3)]
    assert all(s.encoder[0].rows.shape == (16, 192) for s in samples)


def test_packing_keeps_samples_apart_and_cuts_padding(tok):
    task = load_preset("doc_topic", "train", limit=12)
    samples = list(task.samples(tok))
    ids = {"doc_topic": 0}
    padded = collate(samples, tok, ids)
    packed = collate(samples, tok, ids, pack=True, max_length=max(max(s.lengths()) for s in samples) * 2)
    assert packed.encoder.tokens.shape[0] < len(samples)
    assert packed.padding_fraction < padded.padding_fraction
    assert sorted(packed.tasks) == sorted(padded.tasks)
    # every packed sample's positions carry its own sample id, contiguous within the row
    for b in range(packed.encoder.tokens.shape[0]):
        valid = ~packed.encoder.padding_mask[b]
        ids_b = packed.encoder.tags.sample[b][valid].tolist()
        assert ids_b == sorted(ids_b)
    # same token multiset overall
    assert sorted(padded.encoder.tokens[~padded.encoder.padding_mask].tolist()) == sorted(
        packed.encoder.tokens[~packed.encoder.padding_mask].tolist())
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [1, 2]]
    # attention stays within each packed sample and never reaches padding
    enc = packed.encoder
    mask = enc.attention_mask()
    same = enc.tags.sample.unsqueeze(2) == enc.tags.sample.unsqueeze(1)
    assert not (mask & ~same).any() and not mask[enc.padding_mask].any()
    valid = ~enc.padding_mask
    assert mask[valid].any(-1).all()  # every real position sees at least itself
    cross = packed.decoder.cross_attention_mask(enc)
    assert not (cross & ~(packed.decoder.tags.sample.unsqueeze(2) == enc.tags.sample.unsqueeze(1))).any()
    causal = packed.decoder.attention_mask(causal=True)
    assert not causal.triu(1).any()


def test_continuous_targets_have_stop_flags(tok):
    task = load_preset("text_to_speech", "train", limit=2)
    batch = collate(list(task.samples(tok)), tok, {"text_to_speech": 0})
    stop = batch.frame_stop["audio_tgt_fbank"]
    assert stop.sum() == 2 and stop[-1] == 1
    assert batch.frame_targets["audio_tgt_fbank"].shape[1] == 320
    assert (batch.labels == IGNORE_INDEX).all()


def test_encoding_is_deterministic_per_seed(tok):
    task = load_preset("text_infilling", "train", limit=3)
    a = [s.encoder[1].tokens for s in task.samples(tok, seed=1)]
    b = [s.encoder[1].tokens for s in task.samples(tok, seed=1)]
    c = [s.encoder[1].tokens for s in task.samples(tok, seed=2)]
    assert a == b and a != c


def test_motion_is_normalised_with_task_statistics(tok):
    task = load_preset("motion_classification", "train", limit=40)
    stats = task.motion_statistics()
    assert stats["mean"].shape == (43,)
    rows = torch.cat([s.encoder[0].rows for s in task.samples(tok)]).view(-1, 43)
    assert abs(float(rows.mean())) < 0.2 and 0.5 < float(rows.std()) < 1.5


def test_held_out_motion_is_normalised_with_the_training_statistics(tok):
    """The statistics travel with ``fit_statistics`` (saved with a model): a held-out task encoded
    with them equals encoding its frames by the training mean and std, not by its own."""
    import numpy as np

    train = load_preset("motion_classification", "train", limit=40)
    test = load_preset("motion_classification", "test", limit=10)
    saved = train.fit_statistics()["motion_normalisation"]
    mean, std = (np.asarray(saved[k], np.float32) for k in ("mean", "std"))
    np.testing.assert_allclose(mean, train.motion_statistics()["mean"])
    own, trained = test.encode(0, tok, training=False), test.encode(0, tok, training=False,
                                                                       statistics=train.fit_statistics())
    frames = np.asarray(test.data[0]["motion"], np.float32)
    expected = torch.from_numpy((frames - mean) / np.maximum(std, 1e-5)).flatten()
    torch.testing.assert_close(trained.encoder[0].rows.flatten(), expected.to(trained.encoder[0].rows.dtype))
    assert not torch.allclose(own.encoder[0].rows, trained.encoder[0].rows)


def test_modality_registry_has_all_builtins():
    assert set(MODALITIES.list()) >= {"TEXT", "IMAGE", "AUDIO", "VIDEO", "MOTION", "BOX", "STRUCT", "PHONE",
                                       "CATEGORY"}


def test_closed_set_followed_by_text_and_in_repetition_groups(tok):
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.objectives import GenerativeObjective

    rows = [{"x": "hello", "label": "cat", "y": "some text"}]
    task = Task("two", "[TEXT:x] -> [TEXT:label,closed_set] [TEXT:y]", rows)
    batch = collate([task.encode(0, tok)], tok, {"two": 0})
    n_label = len(tok.encode("cat"))
    assert batch.allowed_index.tolist() == list(range(n_label))  # only the label's own positions
    model = GeneralistModel.build(flavour("debug"), [task], tok)
    assert torch.isfinite(GenerativeObjective(model)(batch)["token_loss"])
    group = Task("multi", "[TEXT:x] -> ( [TEXT:labels,closed_set] )*",
                 [{"x": "two animals", "labels": ["cat", "dog"]}, {"x": "one", "labels": ["bird"]}])
    assert group.closed_sets() == {"labels": ["bird", "cat", "dog"]}
    batch = collate([group.encode(0, tok)], tok, {"multi": 0})
    assert len(set(batch.allowed_index.tolist())) == batch.allowed_index.numel()  # no position twice
    model = GeneralistModel.build(flavour("debug"), [group], tok)
    assert torch.isfinite(GenerativeObjective(model)(batch)["token_loss"])


def test_statistics_read_rows_spread_over_the_data_not_the_first_ones():
    """Data ordered by clip or class: statistics fitted on a subset of the rows read them evenly
    spread, so no group of rows at the end is left out (the motion preset's walking and turning
    clips came after its first 256 windows)."""
    rows = [{"x": np.full((4, 3), 0.0 if i < 6 else 10.0), "y": "a"} for i in range(12)]
    task = Task("ordered", "[MOTION:x] -> [TEXT:y]", rows)
    np.testing.assert_allclose(task.motion_statistics(max_rows=4)["mean"], [5.0, 5.0, 5.0])
    np.testing.assert_allclose(task.motion_statistics()["mean"], [5.0, 5.0, 5.0])  # every row
    assert [i for i, _ in task._readable_rows(5)] == [0, 2, 4, 7, 9]


def test_doc_paragraphs_are_distinct_and_their_split_holds_no_training_text():
    """pydoc's broad topics repeat their sub-topics' paragraphs: each distinct paragraph is one row
    under one topic, no held-out paragraph is a training one, and every held-out topic is trained."""
    from moe_gen.tasks.sources.text import load_doc_paragraphs

    train, test = load_doc_paragraphs("train"), load_doc_paragraphs("test")
    texts = [r["text"] for r in train + test]
    assert len(texts) == len(set(texts)) and len(test) > 100
    assert {r["topic"] for r in test} <= {r["topic"] for r in train}
    assert load_doc_paragraphs("all") == sorted(train + test, key=lambda r: int(r["id"].split("/")[1]))



def test_doc_paragraphs_are_prose_under_their_most_specific_topic():
    """Paragraphs of 12-60 words that are not code or grammar; one in both "compound" and "while"
    is a "while" paragraph; ``limit`` keeps the first rows; a split other than train, test or all is
    an error (it read as train)."""
    import sys

    from moe_gen.tasks.sources.text import load_doc_paragraphs

    every = load_doc_paragraphs("all")
    for row in every:
        assert 12 <= len(row["text"].split()) <= 60 and "::=" not in row["text"], row
        assert not row["text"].startswith((">>>", "::")), row
    if sys.version_info[:2] == (3, 11):  # pydoc's topics follow the interpreter
        assert len(every) == 996 and "(996)" in preset_info("doc_topic").source
    topic = {r["text"]: r["topic"] for r in every}
    assert topic['The "while" statement is used for repeated execution as long as an expression is true:'] == "while"
    assert load_doc_paragraphs("train", limit=5) == load_doc_paragraphs("train")[:5]
    with pytest.raises(ValueError, match="unknown split 'dev'; known: train, test, all"):
        load_doc_paragraphs("dev")


def test_iris_tables_split_every_fifth_flower_and_describe_it():
    from moe_gen.tasks.sources.text import load_iris_tables

    train, test = load_iris_tables("train"), load_iris_tables("test")
    assert len(train) == 120 and [r["id"] for r in test] == [f"iris/{i}" for i in range(0, 150, 5)]
    assert test[0] == {"table": {"sepal length": 5.1, "sepal width": 3.5, "petal length": 1.4, "petal width": 0.2},
                       "species": "setosa", "longer": "sepal width", "id": "iris/0",
                       "description": "an iris setosa flower with petals 1.4 cm long and 0.2 cm wide"}
    assert (test[10]["id"], test[10]["longer"], test[10]["description"]) == (
        "iris/50", "petal length", "an iris versicolor flower with petals 4.7 cm long and 1.4 cm wide")
    with pytest.raises(ValueError, match="unknown split 'dev'; known: train, test, all"):
        load_iris_tables("dev")

def test_an_input_that_copies_the_answer_is_corrupted_at_inference_too(tok):
    """text_infilling reads its answer column through ``mask_ratio``: masking only in training left
    the whole answer in the inference input (copying it scored BLEU 100). Now the inference input is
    masked too, the same way for a row every time."""
    task = load_preset("text_infilling", "test", limit=6)
    plan = task.plan(tok)
    for index, row in enumerate(task.data):
        answer = tok.encode(row["text"])
        first = plan.encode(row, index, training=False, inference=True)
        again = plan.encode(row, index, training=False, inference=True)
        tokens = [t for chunk in first.encoder if chunk.tokens is not None for t in chunk.tokens]
        assert tokens == [t for chunk in again.encoder if chunk.tokens is not None for t in chunk.tokens]
        sentinels = {tok.sentinel_id(k) for k in range(tok.num_sentinels)}
        assert sentinels & set(tokens) and not _contains(tokens, answer), index


def _contains(tokens: list[int], part: list[int]) -> bool:
    return any(tokens[i:i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


@pytest.mark.parametrize("instruction, message", [
    ("[TEXT:text] repeat it -> [TEXT:text]", "reads 'text', a column the task predicts"),
    ("[IMAGE:image,region=box] where is it? -> [BOX:box]", "crops its image by 'box', a column the task predicts"),
    # attributes the slot's preprocessor does not apply hide nothing
    ("[STRUCT:table,noise_ratio=0.5] -> [STRUCT:table]", "noise_ratio acts on the text of a table: "
                                                         "preprocess=struct_text only"),
    ("[STRUCT:table,mask_ratio=0] -> [STRUCT:table]", "corrupt it \\(mask_ratio=...\\)"),
    ("[PHONE:text,mask_ratio=0.5] -> [PHONE:text]", "hold the answer; read another column"),
    # preprocessors that write a value as the same tokens (CATEGORY is TEXT with a label set)
    ("[CATEGORY:label] which digit? -> [TEXT:label]", "reads 'label', a column the task predicts"),
    ("[PHONE:text] -> [PHONE:text,preprocess=text_phone]", "reads 'text', a column the task predicts"),
    # a given decoder slot is handed to decoding as its prefix
    ("[TEXT:q] -> [TEXT:text,no_loss] then [TEXT:text]", "reads 'text', a column the task predicts"),
])
def test_an_input_that_would_hold_the_answer_is_refused(tok, instruction, message):
    with pytest.raises(ValueError, match=message):
        Task("leaky", instruction, []).plan(tok)
    with pytest.raises(ValueError, match="reads 'label', a column the task predicts"):
        Task("leaky", "[TEXT:label] which digit? -> [CATEGORY:label]", [{"label": "seven"}]).plan(tok)


@pytest.mark.parametrize("instruction", [
    '" [TEXT:text] " -> " [TEXT:text,no_loss] " has [TEXT:n] words',  # a given (no_loss) slot is no answer
    "[TEXT:text] -> [PHONE:text]",  # conversions: the column read one way, predicted another
    "[PHONE:text] -> [TEXT:text]",
    "[STRUCT:table] -> [TEXT:table,preprocess=struct_text]",
    "[STRUCT:table,mask_ratio=0.5] -> [STRUCT:table]",
])
def test_conversions_and_corrupted_copies_of_a_column_are_accepted(tok, instruction):
    Task("ok", instruction, []).plan(tok)


def test_a_corrupted_target_is_clean_outside_training(tok):
    """``noise_ratio`` on a target corrupts the teacher-forced answer in training only; outside it
    (evaluation, analysis) the answer is the row's own, whatever the sample predicts."""
    rows = [{"src": "a b c d e f g h", "text": "one two three four five six seven eight nine ten"}]
    plan = Task("noisy", "[TEXT:src] -> [TEXT:text,noise_ratio=0.5]", rows).plan(tok)
    clean = [t for c in plan.encode(rows[0], 0, training=False).decoder if c.tokens for t in c.tokens]
    assert clean[:len(tok.encode(rows[0]["text"]))] == tok.encode(rows[0]["text"])


def test_audio_targets_are_not_augmented_in_training(tok):
    """Speed perturbation and SpecAugment apply to audio inputs; a text-to-speech target stays the
    clip's own frames in training (the label the model regresses), as evaluation scores it."""
    task = load_preset("text_to_speech", "train", limit=3)
    plan = task.plan(tok)
    for index, row in enumerate(task.data):
        clean = plan.encode(row, index, training=False)
        for seed in range(4):
            trained = plan.encode(row, index, rng=random.Random(seed), training=True)
            assert len(trained.decoder) == len(clean.decoder)
            for a, b in zip(clean.decoder, trained.decoder):
                assert (a.rows is None) == (b.rows is None)
                if a.rows is not None:
                    torch.testing.assert_close(b.rows, a.rows, rtol=0, atol=0)
    spoken = load_preset("spoken_word_classification", "train", limit=1)
    row, splan = spoken.data[0], spoken.plan(tok)
    inputs = [splan.encode(row, 0, rng=random.Random(s), training=True).encoder for s in range(4)]
    features = [c.rows for enc in inputs for c in enc if c.rows is not None]
    assert any(f.shape != features[0].shape or not torch.equal(f, features[0]) for f in features[1:])


def test_task_modalities_tag_is_the_same_at_inference(tok):
    """Literal text after the first target is cut from the inference decoder; the task's modalities
    (a routing tag) still count it, as the training encoding does."""
    rows = [{"image": np.zeros((16, 16, 3), np.uint8), "box": [1, 2, 8, 9]}]
    plan = Task("where", "[IMAGE:image] -> [BOX:box] is where it is", rows).plan(tok)
    trained = plan.encode(rows[0], 0, training=True)
    assert trained.task_modalities == ("BOX", "IMAGE", "TEXT")
    assert plan.encode(rows[0], 0, training=False, inference=True).task_modalities == trained.task_modalities


def test_frame_errors_count_missing_and_extra_frames():
    """An answer that stops after one exact frame scored L1 0 on its overlap; frames it lacks or
    adds now count against the zero frame."""
    from moe_gen.tasks.metrics import l1, mse

    reference = np.array([[1.0, -1.0], [2.0, 0.0], [0.0, 4.0]])
    assert l1([reference], [reference]) == 0.0
    assert l1([reference[:1]], [reference]) == pytest.approx((0 + 2 + 4) / 6)  # two frames missing
    longer = np.vstack([reference, [[3.0, 3.0]]])
    assert l1([longer], [reference]) == pytest.approx(6 / 6)  # one frame too many: per reference value
    # frames near the mean added at the end do not dilute the error (divided by the longer answer,
    # 61 extra zero frames took a 1.33 error to 0.06)
    assert l1([np.zeros((64, 2))], [reference]) == pytest.approx(8 / 6)
    assert mse([reference[:2]], [reference]) == pytest.approx(16 / 6)
    assert l1([np.zeros((0, 2))], [reference]) == pytest.approx(8 / 6)  # nothing generated
    with pytest.raises(ValueError, match="reference frames"):
        l1([np.zeros((3, 5))], [reference])


def test_frame_errors_leave_nan_reference_values_out():
    """NaN marks a reference value that is no target (the padding of a last row of stacked frames)."""
    from moe_gen.tasks.metrics import l1, mse

    reference = np.array([[1.0, 2.0], [3.0, np.nan]])
    assert l1([np.array([[1.0, 2.0], [3.0, 7.0]])], [reference]) == 0.0
    assert l1([np.array([[0.0, 2.0], [3.0, 7.0]])], [reference]) == pytest.approx(1 / 3)  # 3 target values
    assert mse([np.array([[1.0, 2.0]])], [reference]) == pytest.approx(9 / 3)  # the missing frame's 3 only


@pytest.mark.parametrize("name", sorted(metrics.TEXT_METRICS | metrics.ANSWER_METRICS | metrics.VALUE_METRICS))
def test_every_built_in_metric_refuses_unpaired_or_no_references(name):
    metric = METRICS.get(name)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metric(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="at least one reference"):
        metric([], [])


@pytest.mark.parametrize("instruction", [
    "[VIDEO:video] [TEXT:question] -> [TEXT:answer,is_label]",
    "[AUDIO:wav,n_frames_per_step=2] -> [TEXT:t]",
    "[MOTION:m,soft_trim=0.5,window,anchor_frame=3] -> [TEXT:t]",
])
def test_attributes_parsed_for_ofasys_but_not_applied_are_warned_about(tok, instruction):
    """They were parsed and range-checked, then silently ignored."""
    with pytest.warns(UserWarning, match="which moe_gen parses \\(OFASys instructions use it\\) but does not apply"):
        Task("ofasys", instruction, []).plan(tok)


def test_text_masked_whole_is_refused_when_the_task_is_planned(tok):
    """mask_ratio=1 parsed (the range is [0, 1]), then every row failed in span masking."""
    with pytest.raises(ValueError, match=r"slot \[TEXT:text,mask_ratio=1.0\]: mask_ratio must be below 1 on text"):
        Task("all_masked", "[TEXT:text,mask_ratio=1.0] -> [TEXT:text]", [{"text": "a b c"}]).plan(tok)
    Task("most_masked", "[TEXT:text,mask_ratio=0.9] -> [TEXT:text]", [{"text": "a b c"}]).plan(tok)


# ---- mutation-testing audit (r17): collate on hand-made samples ----------------------------------------------

def _hand_sample(enc: list[int], dec: list, index: int = 0):
    """A sample of one TEXT input chunk of tokens ``enc`` and the decoder chunks ``dec`` (``Chunk``s, or
    token lists: scored TEXT targets)."""
    from moe_gen.tasks.sample import Chunk, Sample

    chunks = [c if isinstance(c, Chunk) else Chunk("TEXT", TARGET, True, tokens=list(c)) for c in dec]
    return Sample("hand", index, encoder=[Chunk("TEXT", INPUT, False, tokens=list(enc))], decoder=chunks,
                  task_modalities=("TEXT", "AUDIO"))


def test_padding_fraction_and_masks_of_a_padded_batch_by_hand(tok):
    """Encoder lengths 3 and 1, decoder lengths 2 and 4: 2 + 2 of the 6 + 8 positions pad. Padding
    queries see nothing, in self- and in cross-attention, as ``Side.attention_mask`` documents."""
    batch = collate([_hand_sample([11, 12, 13], [[21, 22]]), _hand_sample([14], [[23, 24, 25, 26]], 1)],
                    tok, {"hand": 0})
    assert batch.padding_fraction == pytest.approx(4 / 14)
    assert batch.decoder.tokens.tolist() == [[tok.bos_id, 21, tok.pad_id, tok.pad_id], [tok.bos_id, 23, 24, 25]]
    assert batch.labels.tolist() == [[21, 22, IGNORE_INDEX, IGNORE_INDEX], [23, 24, 25, 26]]
    cross = batch.decoder.cross_attention_mask(batch.encoder)
    assert cross.int().tolist() == [[[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]],
                                    [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]]]
    causal = batch.decoder.attention_mask(causal=True)
    assert causal[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert causal[1].int().tolist() == torch.ones(4, 4, dtype=torch.int).tril().tolist()


def test_packing_measures_a_sample_by_its_longer_side(tok):
    """Samples of 1 encoder and 5 decoder positions take 5 of a packed row's 6 places: each gets a
    row of its own (packed by the shorter side, the three decoders shared a row of 15)."""
    samples = [_hand_sample([11], [[21, 22, 23, 24, 25]], i) for i in range(3)]
    batch = collate(samples, tok, {"hand": 0}, pack=True, max_length=6)
    assert batch.decoder.tokens.shape == (3, 5) and batch.encoder.tokens.shape == (3, 1)
    assert not batch.decoder.tags.sample.any()


def test_packed_position_ids_restart_in_each_sample(tok):
    """A packed row whose first sample gives its positions (a masked sample's) and whose second does not:
    the second one's positions count from 0 in its own sample, not on from the first's."""
    from moe_gen.tasks.sample import Chunk

    given = _hand_sample([11], [Chunk("TEXT", TARGET, True, tokens=[21, 22], position_ids=[4, 7])])
    plain = _hand_sample([12], [[23, 24, 25]], 1)
    batch = collate([given, plain], tok, {"hand": 0}, pack=True, max_length=5)
    assert batch.decoder.tags.sample.tolist() == [[0, 0, 1, 1, 1]]
    assert batch.decoder.position_ids.tolist() == [[4, 7, 0, 1, 2]]
    assert batch.encoder.position_ids is None


def test_frame_targets_mark_the_padded_values_at_the_end_of_the_last_row(tok):
    """An AUDIO target of 3 rows of 4 values, the last 3 of which pad: those 3 are no target, the stop
    flag is on the last row, and the rows sit after the text target's 2 decoder positions."""
    from moe_gen.tasks.sample import Chunk

    rows = torch.arange(12.0).reshape(3, 4)
    audio = Chunk("AUDIO", TARGET, True, rows=rows, positions=torch.zeros(3, 3, dtype=torch.long), adaptor="audio",
                  padded_values=3, ends=True)
    batch = collate([_hand_sample([11], [[21, 22]]), _hand_sample([12], [[23, 24], audio], 1)], tok, {"hand": 0})
    L = batch.decoder.tokens.shape[1]
    assert L == 5
    assert torch.equal(batch.frame_targets["audio"], rows)
    assert batch.frame_index["audio"].tolist() == [L + 2, L + 3, L + 4]
    assert batch.frame_stop["audio"].tolist() == [0.0, 0.0, 1.0]
    assert batch.frame_valid["audio"].int().tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_allowed_tokens_are_given_at_scored_closed_set_positions_only(tok):
    """A given (no-loss) closed-set chunk, then a scored one: only the scored position gets its
    allowed tokens, and its label is one of them."""
    from moe_gen.tasks.sample import Chunk

    given = Chunk("TEXT", PROMPT, False, tokens=[20, 21], allowed=[[20, 30], [21]])
    scored = Chunk("TEXT", TARGET, True, tokens=[22], allowed=[[22, 23]])
    batch = collate([_hand_sample([11], [given, scored])], tok, {"hand": 0})
    assert batch.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 22]]
    assert batch.allowed_index.tolist() == [2]
    assert batch.allowed_tokens.tolist() == [[22, 23]]
