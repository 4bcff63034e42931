"""Tag values that group_key cannot pack, or routers cannot read, are refused by TokenTags.validate
(audit 13): causal and task_modalities outside 0/1; a 0/1 integer causal routes as the bool one in
every router (the context router crashed on it); negative sample ids."""

import dataclasses

import pytest
import torch
from helpers import random_tags

from moe_gen import ROUTERS, MoE
from moe_gen.config import MoEConfig, RouterConfig
from moe_gen.routing.tags import TokenTags

VOCAB = dict(num_modalities=9, num_roles=3, num_passes=3, num_tasks=3)


def _moe(strategy: str) -> MoE:
    torch.manual_seed(0)
    return MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=8, top_k=2, router=RouterConfig(strategy=strategy))).eval()


@pytest.mark.parametrize("values", [[2, 0], [-1, 0], [0, 3]])
def test_causal_outside_0_1_is_refused(values):
    # causal=2 with role input would carry into the role bit of group_key: the tag group of
    # (role target, causal 0), whose tokens would then take the bad token's route
    tags = dataclasses.replace(TokenTags.constant(2), causal=torch.tensor(values))
    with pytest.raises(ValueError, match=r"tags\.causal values must lie in \[0, 2\)"):
        tags.validate((2,), **VOCAB)
    with pytest.raises(ValueError, match=r"tags\.causal"):
        _moe("attribute")(torch.randn(2, 8), tags=tags)
    # the same with another integer dtype than the other tags' (checked by itself)
    tags = dataclasses.replace(tags, causal=torch.tensor(values, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"tags\.causal values must lie in \[0, 2\)"):
        tags.validate((2,), **VOCAB)


def test_causal_0_1_integers_and_bools_pass():
    tags = random_tags((2, 5))
    tags.validate((2, 5), **VOCAB)
    for dtype in (torch.long, torch.int32):
        as_int = dataclasses.replace(tags, causal=tags.causal.to(dtype))
        as_int.validate((2, 5), **VOCAB)
        assert torch.equal(as_int.group_key(), tags.group_key())


@pytest.mark.parametrize("value,match", [
    (0.5, r"tags\.task_modalities must be a bool \(or 0/1 integer\) multi-hot, got torch\.float32"),
    (2, r"tags\.task_modalities must hold only 0 and 1 \(a multi-hot\), got values in \[0, 2\]"),
    (-1, r"tags\.task_modalities must hold only 0 and 1 \(a multi-hot\), got values in \[-1, 1\]"),
])
def test_task_modalities_outside_0_1_are_refused(value, match):
    # group_key packs each entry into one bit: 0.5 would read as 0 (the group of "TEXT not used")
    # while the attribute vector reads 0.5
    tm = torch.zeros(2, 9, dtype=torch.float32 if isinstance(value, float) else torch.long)
    tm[0, 0] = value
    tm[1, 1] = 1
    tags = dataclasses.replace(TokenTags.constant(2), task_modalities=tm)
    with pytest.raises(ValueError, match=match):
        tags.validate((2,), **VOCAB)
    with pytest.raises(ValueError, match=r"tags\.task_modalities"):
        _moe("attribute")(torch.randn(2, 8), tags=tags)


def test_task_modalities_as_0_1_integers_route_like_bools():
    tags = random_tags((2, 5))
    as_int = dataclasses.replace(tags, task_modalities=tags.task_modalities.long())
    as_int.validate((2, 5), **VOCAB)
    assert torch.equal(as_int.group_key(), tags.group_key())
    moe, x = _moe("attribute"), torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(moe(x, tags=as_int).output, moe(x, tags=tags).output)


def test_usual_tags_are_checked_in_one_reduction(monkeypatch):
    # long task/modality/role/pass/sample tags, bool causal and task_modalities: one aminmax over
    # the stacked long tags (validate runs every forward), no reduction of its own for any tag
    tags = dataclasses.replace(random_tags((2, 5)), sample=torch.zeros(2, 5, dtype=torch.long))
    calls = []
    real = torch.Tensor.aminmax

    def counted(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("validate reduced a tag by itself")

    monkeypatch.setattr(torch.Tensor, "aminmax", counted)
    monkeypatch.setattr(torch, "aminmax", refused)
    tags.validate((2, 5), **VOCAB)
    assert len(calls) == 1


@pytest.mark.parametrize("strategy", ROUTERS.list())
@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_integer_causal_routes_like_the_bool_one(strategy, dtype):
    # packed rows (two samples in row 0), padding and causal tokens, for the context router's
    # causal prefix; cached decoding (carry) too, as a decoder reads the tags step by step
    tags = dataclasses.replace(random_tags((2, 6)), sample=torch.tensor([[0, 0, 0, 1, 1, 1], [0] * 6]))
    as_int = dataclasses.replace(tags, causal=tags.causal.to(dtype))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    moe, x = _moe(strategy), torch.randn(2, 6, 8)
    with torch.no_grad():
        expected = moe(x, tags=tags, padding_mask=padding)
        got = moe(x, tags=as_int, padding_mask=padding)
        assert torch.equal(got.output, expected.output)
        assert torch.equal(got.routing.topk_ids, expected.routing.topk_ids)
        steps = {}
        for name, t in (("bool", tags), ("int", as_int)):
            carry: dict = {}
            steps[name] = [moe(x[:, i:i + 2], tags=t.select((slice(None), slice(i, i + 2))),
                               padding_mask=padding[:, i:i + 2], carry=carry).output for i in (0, 2, 4)]
        assert all(torch.equal(a, b) for a, b in zip(steps["int"], steps["bool"]))


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_negative_sample_is_refused(dtype):
    # row 1's sample -1 fell into row 0's last sample (segments are row·(max+1) + sample): the
    # context router pooled another example's tokens; all -1 crashed with a bare IndexError
    tags = random_tags((2, 3))
    for sample in ([[0, 0, 0], [-1, -1, -1]], [[-1] * 3] * 2, [[0, 1, 1], [0, -2, 0]]):
        bad = dataclasses.replace(tags, sample=torch.tensor(sample, dtype=dtype))
        with pytest.raises(ValueError, match=r"tags\.sample values must be >= 0, got \[-"):
            bad.validate((2, 3), **VOCAB)
        with pytest.raises(ValueError, match=r"tags\.sample values must be >= 0"):
            _moe("context")(torch.randn(2, 3, 8), tags=bad)
    dataclasses.replace(tags, sample=torch.tensor([[0, 0, 1], [0, 0, 0]], dtype=dtype)).validate((2, 3), **VOCAB)
