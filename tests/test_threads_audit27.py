"""A model shared by threads, twenty-seventh audit: mode and backend switches asked for while
another thread's ``infer`` runs, and training during it. Each test fails on the code before its
fix. A forward pre-hook holds the serving thread's call inside the model while the test acts."""

from __future__ import annotations

import threading

import pytest
import torch

from moe_gen.config import RouterConfig
from moe_gen.model import GeneralistModel, flavour
from moe_gen.moe import MoE, merged_in_place
from moe_gen.tasks import Tokenizer, load_preset


@pytest.fixture()
def served():
    """A tag-routed model and a task, and a way to hold one infer call in flight in another thread."""
    torch.manual_seed(0)
    task = load_preset("table_to_text", "train", limit=2)
    model = GeneralistModel.build(flavour("debug", moe={"router": RouterConfig(strategy="attribute")}),
                                  [task], Tokenizer.default())
    inside, release = threading.Event(), threading.Event()

    def hold(*args):
        if threading.current_thread().name == "server":
            inside.set()
            release.wait(timeout=60)

    handle = model.decoder.register_forward_pre_hook(hold)
    server = threading.Thread(target=lambda: model.infer(task, task.data, max_new_tokens=2), name="server")

    def start():
        server.start()
        assert inside.wait(timeout=60)

    def finish():
        release.set()
        server.join(timeout=60)
        assert not server.is_alive()
        handle.remove()

    yield model, task, start, finish
    release.set()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def test_eval_during_another_threads_infer_stays(served):
    model, _, start, finish = served
    model.train()
    start()
    model.eval()
    finish()  # (gave back training mode to every module)
    assert not any(m.training for m in model.modules())


def test_set_backend_during_another_threads_infer_takes_effect_when_it_ends(served):
    model, _, start, finish = served
    start()
    model.set_backend("einsum")
    finish()  # (gave the layers back the backend they had)
    assert model.config.moe.backend == "einsum"
    assert {type(m.backend).__name__ for m in _layers(model)} == {"EinsumDispatch"}
    with merged_in_place(model):
        model.set_backend("grouped")
        assert {type(m.backend).__name__ for m in _layers(model)} == {"MergedDispatch"}  # (merged for the block)
    assert {type(m.backend).__name__ for m in _layers(model)} == {"GroupedDispatch"}


def test_training_during_another_threads_infer_is_refused_naming_the_call(served):
    model, _, start, finish = served
    start()
    with pytest.raises(ValueError, match="an infer or evaluation call .* is running on this model, here or in "
                                         "another thread: it cannot train until that ends"):
        model.train()
    finish()
    assert model.train().training  # afterwards it can


def test_a_copy_during_which_another_threads_infer_starts_keeps_every_modules_mode(served):
    """The modes are read when the copy starts; a call that started while the submodules were being
    copied left them in eval mode in the copy (1 copy in 25 under a stress test)."""
    import copy

    model, _, start, finish = served
    model.train()
    model.decoder.blocks[0].eval()  # a submodule kept in eval mode inside a training model stays so
    expected = [m.training for m in model.modules()]

    class StartsTheCall:  # copied before the other submodules: the serving call starts mid-copy
        def __deepcopy__(self, memo):
            start()
            return self

    model.token_embedding.marker = StartsTheCall()
    clone = copy.deepcopy(model)
    finish()
    assert [m.training for m in clone.modules()] == expected == [m.training for m in model.modules()]
