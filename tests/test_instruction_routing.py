"""The ``instruction`` routing strategy: the attribute vector plus the hashed prompt words of the
token's task. Tasks over the same modalities that ask different things take different routes;
the words come from the tasks' instructions, are saved with the model and follow ``add_tasks``."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from helpers import flavour_with, random_tags

from moe_gen import MoE, MoEConfig, TokenTags
from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel
from moe_gen.moe import merge_for_inference
from moe_gen.routing.inputs import InstructionInput, word_table
from moe_gen.tasks import Task, Tokenizer, collate, load_preset
from moe_gen.tasks.instruction import Instruction

D = 16
SUCCESSOR = "[IMAGE:image] which digit comes after this one? -> [TEXT:label,closed_set]"


def test_prompt_words_are_the_literal_words_of_every_template():
    instruction = Instruction.parse("[IMAGE:img] What does the image describe? -> a handwritten [TEXT:caption] "
                                    "||| [IMAGE:img] caption it: -> [TEXT:caption]")
    assert instruction.prompt_words() == ("a", "caption", "describe", "does", "handwritten", "image", "it", "the",
                                          "what")
    assert Instruction.parse("[IMAGE:img] -> [TEXT:caption]").prompt_words() == ()
    # words are runs of letters and digits: '_' and other punctuation split them, case is folded
    assert Instruction.parse("Is_it 2nd-hand? [IMAGE:img] -> [TEXT:y]").prompt_words() == ("2nd", "hand", "is", "it")


def test_word_table_sets_the_crc32_bucket_of_each_word():
    table = word_table([("which", "after"), (), ("which",)], num_tasks=4, buckets=7)
    assert table.shape == (4, 7)
    for t, words in enumerate([("which", "after"), (), ("which",), ()]):
        expected = torch.zeros(7)
        for word in words:
            expected[zlib.crc32(word.encode()) % 7] = 1.0
        assert torch.equal(table[t], expected)


def _router_input(task_words):
    torch.manual_seed(0)
    return InstructionInput(D, RouterConfig(strategy="instruction", num_tasks=4, task_words=task_words))


def test_tasks_with_the_same_tags_but_other_words_get_other_router_inputs():
    words = (("what", "digit", "is", "this"), ("which", "digit", "comes", "after", "this", "one"),
             ("what", "digit", "is", "this"))
    router_input = _router_input(words)
    x = torch.randn(2, D)
    z = [router_input(x, TokenTags.constant(2, task=t, modality="IMAGE"), None, None) for t in range(3)]
    assert not torch.allclose(z[0], z[1])  # only the words tell tasks 0 and 1 apart
    torch.testing.assert_close(z[0], z[2])  # same words, same tags: same input
    torch.testing.assert_close(z[0][0], z[0][1])  # content-independent
    # a task id with no words reads the attribute bits alone
    alone = router_input(x, TokenTags.constant(2, task=3, modality="IMAGE"), None, None)
    assert torch.isfinite(alone).all() and not torch.allclose(alone, z[0])
    router_input.set_task_words(words + (("which", "digit"),))
    assert not torch.allclose(router_input(x, TokenTags.constant(2, task=3, modality="IMAGE"), None, None), alone)


def test_router_config_checks_its_words():
    with pytest.raises(ValueError, match="word_buckets"):
        RouterConfig(strategy="instruction", word_buckets=0)
    with pytest.raises(ValueError, match="task_words lists 3 tasks but num_tasks is 2"):
        RouterConfig(strategy="instruction", num_tasks=2, task_words=(("a",), ("b",), ("c",)))
    with pytest.raises(ValueError, match="a sequence of strings"):
        RouterConfig(strategy="instruction", task_words=("what", "digit"))  # one task's words, not a list of tasks
    # lists (as a loaded config holds them) become tuples
    assert RouterConfig(task_words=[["a", "b"]]).task_words == (("a", "b"),)


def test_instruction_routes_are_one_per_tag_group():
    words = (("what",), ("which", "after"), ("count",))
    moe = MoE(MoEConfig(d_model=D, d_hidden=12, num_experts=4, top_k=2,
                        router=RouterConfig(strategy="instruction", task_words=words))).train()
    x, tags = torch.randn(3, 20, D), random_tags((3, 20))
    routing = moe(x, tags=tags).routing
    key = tags.group_key().reshape(-1)
    assert len(torch.unique(key)) > 3
    for g in torch.unique(key):
        members = (key == g).nonzero().squeeze(1)
        assert torch.equal(routing.topk_ids[members], routing.topk_ids[members[:1]].expand(len(members), -1))
    # the routes read each task's own words: the router's logits are the router input of the task's
    # words times the gate, and another task's words give other logits
    router = moe.router
    with torch.no_grad():
        z = router.input(x.reshape(-1, D), tags.flatten(), None, None)
        torch.testing.assert_close(routing.logits, z.float() @ router.weight.float().t(), atol=1e-5, rtol=1e-5)
        other = dataclasses.replace(tags.flatten(), task=(tags.flatten().task + 1) % len(words))
        assert not torch.allclose(router.input(x.reshape(-1, D), other, None, None), z)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_model_keeps_its_tasks_words_through_add_tasks_save_and_merge(tok, tmp_path):
    digits = load_preset("digit_classification", "train", limit=4)
    successor = Task("digit_successor", SUCCESSOR, [dict(r, label="one") for r in digits.data])
    torch.manual_seed(0)
    model = GeneralistModel.build(flavour_with("debug", router={"strategy": "instruction"}), [digits], tok)
    router = model.config.moe.router
    assert router.task_words == (digits.instruction.prompt_words(),)
    inputs = [m for m in model.modules() if isinstance(m, InstructionInput)]
    assert inputs and all(torch.equal(m.words_TkW[0], word_table(router.task_words, 1, 64)[0]) for m in inputs)

    model.add_tasks([successor])
    router = model.config.moe.router
    assert router.task_words == (digits.instruction.prompt_words(), ("after", "comes", "digit", "one", "this",
                                                                       "which"))
    expected = word_table(router.task_words, router.num_tasks, router.word_buckets)
    assert all(torch.equal(m.words_TkW, expected) for m in inputs)

    model.eval()
    batch = collate([s for t in (digits, successor) for s in t.samples(tok)], tok, model.task_ids)
    with torch.no_grad():
        logits = model(batch).logits
    model.save_pretrained(str(tmp_path / "m"))
    loaded = GeneralistModel.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.config.moe.router.task_words == router.task_words
    assert all(torch.equal(m.words_TkW, expected) for m in loaded.modules() if isinstance(m, InstructionInput))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, logits)
        torch.testing.assert_close(merge_for_inference(model)(batch).logits, logits, atol=1e-5, rtol=1e-5)


def test_upcycled_instruction_layers_read_the_models_task_words(tok):
    from moe_gen.pretrained.upcycle import upcycle

    digits = load_preset("digit_classification", "train", limit=4)
    successor = Task("digit_successor", SUCCESSOR, [dict(r, label="one") for r in digits.data])
    torch.manual_seed(0)
    dense = GeneralistModel.build(flavour_with("debug", router={"strategy": "instruction"}).dense_twin(),
                                  [digits, successor], tok)
    words = dense.config.moe.router.task_words
    assert words[1] == ("after", "comes", "digit", "one", "this", "which")
    # a RouterConfig of its own (as the quality benchmark passes) still reads the model's words
    model, summary = upcycle(dense, num_experts=4, top_k=2, router=RouterConfig(strategy="instruction"),
                             layers="all", seed=0)
    assert summary.router.task_words == words
    inputs = [m for m in model.modules() if isinstance(m, InstructionInput)]
    expected = word_table(words, summary.router.num_tasks, summary.router.word_buckets)
    assert inputs and all(torch.equal(m.words_TkW, expected) for m in inputs)
