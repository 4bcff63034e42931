"""Build moe_gen layers from other libraries' MoE blocks (weights copied, outputs equal).

Shape legend: E experts, D model width, H expert hidden width, X = 2H (gate and up rows).

``from_hf_moe(block)`` recognises the sparse MoE blocks that transformers ships and returns an
equivalent ``MoE`` (token router, SwiGLU experts without biases, dropless):

- ``MixtralSparseMoeBlock``: softmax over the experts, top-k renormalised.
- ``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock``: softmax, top-k renormalised only when
  ``norm_topk_prob`` (``RouterConfig(normalize=False)`` otherwise: the weights stay the softmax
  over all E experts).
- ``Qwen2MoeSparseMoeBlock``: the same, plus a shared expert whose output each token scales by
  ``sigmoid(x · w)`` (``ExpertsConfig(shared_gate=True)``).
- ``DeepseekV3MoE``: sigmoid affinities (``score="sigmoid"``); experts chosen by affinity plus
  ``e_score_correction_bias`` (``selection_bias``) within the ``topk_group`` best of ``n_group``
  groups (``expert_groups``, ``topk_groups``); weights renormalised when ``norm_topk_prob`` and
  multiplied by ``routed_scaling_factor`` (``weight_scale``); its ``n_shared_experts`` shared
  experts, one MLP of their summed width, become the shared expert.

Expert weights come either stacked (transformers 5: ``gate_up_proj [E, X, D]`` with the gate rows
first, ``down_proj [E, D, H]``) or as a ModuleList of per-expert MLPs (older releases: ``w1, w3,
w2`` for Mixtral, ``gate_proj, up_proj, down_proj`` for the others). In eval mode the layer and the
block give the same outputs in fp32. A bf16 block computes its router logits in bf16, while
moe_gen's router always scores in fp32 (so that near-ties do not flip with the batch): there a
token whose top-k experts are within bf16 rounding of each other may route otherwise (measured: 1
token in 1,024 of a bf16 Mixtral block, its output then differing by O(1)). In training, Mixtral's
``router_jitter_noise`` scales the hidden states seen by both router and experts, while moe_gen's
jitter only perturbs the router input, so noisy training steps are not bit-comparable;
DeepSeek-V3's correction bias is imported as a fixed selection bias (transformers does not update
it either).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moe_gen.config import ExpertsConfig, MoEConfig, RouterConfig
from moe_gen.moe import MoE

__all__ = ["from_hf_moe", "moe_from_mixtral"]

_ACTIVATION_NAMES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu",
                     "GELU": "gelu", "ReLU": "relu", "NewGELUActivation": "gelu_tanh",
                     "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}

# Per-expert MLP attribute names (gate, up, down) of the ModuleList layouts.
_MLP_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


@dataclasses.dataclass
class _Routing:
    """What a block's family says beyond its expert weights."""

    top_k: int
    router: RouterConfig
    shared: nn.Module | None = None  # an MLP with gate_proj / up_proj / down_proj
    shared_gate: nn.Linear | None = None  # [1, D]: sigmoid(x·w) scales the shared expert
    selection_bias: torch.Tensor | None = None  # [E], added to the scores to choose experts only


def _setting(block: nn.Module, *names: str):
    """A routing setting, from the block's router (transformers 5) or the block (older releases);
    ``names`` are its spellings across releases."""
    for owner in (getattr(block, "gate", None), block):
        for name in names:
            if owner is not None and hasattr(owner, name):
                return getattr(owner, name)
    raise ValueError(f"{type(block).__name__} has no {' or '.join(names)} on the block or its gate")


def _softmax_routing(block: nn.Module) -> _Routing:
    """Softmax over the experts, top-k, renormalised when ``norm_topk_prob`` (Qwen3-MoE, OLMoE)."""
    normalize = bool(_setting(block, "norm_topk_prob"))
    return _Routing(int(_setting(block, "top_k")), RouterConfig(strategy="token", normalize=normalize))


def _mixtral_routing(block: nn.Module) -> _Routing:
    return _Routing(int(_setting(block, "top_k")), RouterConfig(strategy="token", normalize=True))


def _qwen2_moe_routing(block: nn.Module) -> _Routing:
    routing = _softmax_routing(block)
    return dataclasses.replace(routing, shared=block.shared_expert, shared_gate=block.shared_expert_gate)


def _deepseek_v3_routing(block: nn.Module) -> _Routing:
    router = RouterConfig(
        strategy="token",
        score="sigmoid",
        normalize=bool(_setting(block, "norm_topk_prob")),
        weight_scale=float(_setting(block, "routed_scaling_factor")),
        expert_groups=int(_setting(block, "num_group", "n_group")),
        topk_groups=int(_setting(block, "topk_group")),
        selection_bias=True,
    )
    return _Routing(int(_setting(block, "top_k")), router, shared=block.shared_experts,
                    selection_bias=_setting(block, "e_score_correction_bias").detach())


_FAMILIES = {
    "MixtralSparseMoeBlock": _mixtral_routing,
    "Qwen2MoeSparseMoeBlock": _qwen2_moe_routing,
    "Qwen3MoeSparseMoeBlock": _softmax_routing,
    "OlmoeSparseMoeBlock": _softmax_routing,
    "DeepseekV3MoE": _deepseek_v3_routing,
}


def _activation_name(act: nn.Module) -> str:
    name = _ACTIVATION_NAMES.get(type(act).__name__)
    if name is None:
        raise ValueError(
            f"cannot map the block's activation {type(act).__name__} to a moe_gen activation; "
            f"pass activation= one of {sorted(set(_ACTIVATION_NAMES.values()))}"
        )
    return name


def _mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """One gated MLP: ``(gate_up_XD [2H, D] with the gate rows first, down_DH [D, H], activation)``."""
    names = next((n for n in _MLP_NAMES if all(hasattr(mlp, a) for a in n)), None)
    if names is None:
        raise ValueError(
            f"unrecognised expert MLP {type(mlp).__name__}: expected linear layers named "
            f"{' or '.join('/'.join(n) for n in _MLP_NAMES)}"
        )
    gate, up, down = (getattr(mlp, a) for a in names)
    if any(layer.bias is not None for layer in (gate, up, down)):
        raise ValueError(f"{type(mlp).__name__} has biases; moe_gen imports bias-free SwiGLU MLPs only")
    return torch.cat([gate.weight, up.weight]).detach(), down.weight.detach(), mlp.act_fn


def _expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """The routed experts: ``(gate_up_EXD [E, 2H, D] gate rows first, down_EDH [E, D, H],
    activation)`` from either layout."""
    if hasattr(experts, "gate_up_proj"):  # transformers >= 5: stacked weights
        # Flags that transformers' experts implementations set for other layouts.
        unsupported = [what for what, present in (
            ("expert biases", getattr(experts, "has_bias", False)),
            ("transposed weights", getattr(experts, "is_transposed", False)),
            ("interleaved gate/up rows", not getattr(experts, "is_concatenated", True)),
            ("a norm after each expert", getattr(experts, "has_post_expert_norm", False)),
        ) if present]
        if unsupported:
            raise ValueError(f"{type(experts).__name__} has {', '.join(unsupported)}, which moe_gen's "
                             "glu experts cannot hold")
        return experts.gate_up_proj.detach(), experts.down_proj.detach(), experts.act_fn
    if isinstance(experts, nn.ModuleList) and len(experts):
        per_expert = [_mlp_weights(mlp) for mlp in experts]
        gate_up_EXD = torch.stack([w[0] for w in per_expert])
        down_EDH = torch.stack([w[1] for w in per_expert])
        return gate_up_EXD, down_EDH, per_expert[0][2]
    raise ValueError(
        f"unrecognised experts layout {type(experts).__name__}: expected stacked gate_up_proj/down_proj "
        "or a ModuleList of per-expert MLPs"
    )


def _routing(block: nn.Module) -> _Routing:
    """The routing of ``block``, read by the first family among its classes (subclasses included)."""
    family = next((_FAMILIES[c.__name__] for c in type(block).__mro__ if c.__name__ in _FAMILIES), None)
    if family is None:
        raise ValueError(
            f"from_hf_moe does not know {type(block).__name__}; supported transformers blocks: "
            f"{', '.join(_FAMILIES)}"
        )
    return family(block)


def _shared_expert_weights(
    block: nn.Module, routing: _Routing, act: nn.Module
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(gate_up_XD [2H', D] gate rows first, down_DH [D, H'])`` of the block's shared expert, or None
    without one; raises if its activation differs from the routed experts' ``act``."""
    if routing.shared is None:
        return None
    shared_gate_up_XD, shared_down_DH, shared_act = _mlp_weights(routing.shared)
    same = type(shared_act) is type(act)  # (an activation moe_gen cannot name may be given by from_hf_moe's caller)
    if not same:
        try:
            same = _activation_name(shared_act) == _activation_name(act)
        except ValueError:
            same = False
    if not same:
        raise ValueError(
            f"{type(block).__name__}'s shared expert uses {type(shared_act).__name__} and its routed "
            f"experts {type(act).__name__}; moe_gen gives both one activation"
        )
    return shared_gate_up_XD, shared_down_DH


def from_hf_moe(block: nn.Module, *, backend: str = "torch", activation: str | None = None) -> MoE:
    """A ``MoE`` with the same weights and routing as a transformers sparse MoE block.

    Args:
        block: one of the blocks listed in the module docstring (or a subclass).
        backend: moe_gen dispatch backend for the new layer.
        activation: override the activation name (detected from the block by default).

    Returns:
        A ``MoE`` in the experts' dtype and the block's device, in the block's train/eval mode.

    Raises:
        ValueError: for other blocks (naming the supported ones), and for layouts or activations
            that moe_gen's experts cannot hold.
    """
    routing = _routing(block)
    gate_up_EXD, down_EDH, act = _expert_weights(block.experts)
    router_weight_ED = block.gate.weight.detach()
    num_experts, d_model = router_weight_ED.shape
    activation = activation or _activation_name(act)
    shared = _shared_expert_weights(block, routing, act)
    shared_hidden = None if shared is None else shared[1].shape[1]
    config = MoEConfig(
        d_model=d_model,
        d_hidden=down_EDH.shape[2],
        num_experts=num_experts,
        top_k=routing.top_k,
        router=routing.router,
        experts=ExpertsConfig(kind="glu", activation=activation, bias=False,
                              shared_expert=routing.shared is not None, shared_hidden=shared_hidden,
                              shared_gate=routing.shared_gate is not None),
        capacity_factor=None,
        backend=backend,
    )
    moe = MoE(config).to(device=down_EDH.device, dtype=down_EDH.dtype)
    moe.router.to(dtype=router_weight_ED.dtype)  # transformers keeps some gates in fp32 beside bf16 experts
    with torch.no_grad():
        moe.router.weight.copy_(router_weight_ED)
        moe.experts.w_in.copy_(gate_up_EXD.transpose(1, 2))  # [E, D, 2H] = [gate | up]
        moe.experts.w_out.copy_(down_EDH.transpose(1, 2))  # [E, H, D]
        if shared is not None:
            shared_gate_up_XD, shared_down_DH = shared
            moe.shared.fc_in.weight.copy_(shared_gate_up_XD)  # [2H', D], gate rows first
            moe.shared.fc_out.weight.copy_(shared_down_DH)
        if routing.shared_gate is not None:
            moe.shared_gate.weight.copy_(routing.shared_gate.weight)
        if routing.selection_bias is not None:
            moe.router.balance_bias.copy_(routing.selection_bias)
    moe.train(block.training)
    return moe


def moe_from_mixtral(block: nn.Module, *, backend: str = "torch", activation: str | None = None) -> MoE:
    """``from_hf_moe`` under its first name, for a ``MixtralSparseMoeBlock``."""
    return from_hf_moe(block, backend=backend, activation=activation)
