"""Build moe_gen layers from other libraries' MoE blocks (weights copied, outputs equal).

``moe_from_mixtral(block)`` takes a transformers ``MixtralSparseMoeBlock`` (either the stacked
``gate_up_proj``/``down_proj`` layout of transformers 5, or the older ModuleList of ``w1/w2/w3``
experts) and returns an equivalent ``MoE``: token router, softmax top-k renormalised, SwiGLU
experts without biases. In eval mode the two give the same outputs. (In training, Mixtral's
``router_jitter_noise`` scales the hidden states seen by both router and experts; moe_gen's jitter
only perturbs the router input, so noisy training steps are not bit-comparable.)
"""

from __future__ import annotations

import torch
from torch import nn

from moe_gen.config import ExpertsConfig, MoEConfig, RouterConfig
from moe_gen.moe import MoE

__all__ = ["moe_from_mixtral"]

_ACTIVATION_NAMES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu",
                     "GELU": "gelu", "ReLU": "relu", "NewGELUActivation": "gelu_tanh",
                     "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}


def _activation_name(act: nn.Module) -> str:
    name = _ACTIVATION_NAMES.get(type(act).__name__)
    if name is None:
        raise ValueError(
            f"cannot map the block's activation {type(act).__name__} to a moe_gen activation; "
            f"pass activation= one of {sorted(set(_ACTIVATION_NAMES.values()))}"
        )
    return name


def moe_from_mixtral(
    block: nn.Module, *, backend: str = "torch", activation: str | None = None
) -> MoE:
    """A ``MoE`` with the same weights and routing as a Mixtral sparse MoE block.

    Args:
        block: ``transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock``.
        backend: moe_gen dispatch backend for the new layer.
        activation: override the activation name (detected from the block by default).

    Returns:
        A ``MoE`` in the block's dtype and device, in the block's train/eval mode.
    """
    experts = block.experts
    router_weight = block.gate.weight.detach()  # [E, D] in both layouts
    if hasattr(experts, "gate_up_proj"):  # transformers >= 5: stacked weights
        gate_up_EXD = experts.gate_up_proj.detach()  # [E, 2H, D], gate rows first
        down_EDH = experts.down_proj.detach()  # [E, D, H]
        act = experts.act_fn
    elif isinstance(experts, nn.ModuleList) and hasattr(experts[0], "w1"):
        gate_up_EXD = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts]).detach()
        down_EDH = torch.stack([e.w2.weight for e in experts]).detach()
        act = experts[0].act_fn
    else:
        raise ValueError(
            f"unrecognised Mixtral block layout: experts is {type(experts).__name__} without "
            "gate_up_proj or w1/w2/w3"
        )
    num_experts, d_model = router_weight.shape
    d_hidden = down_EDH.shape[2]
    config = MoEConfig(
        d_model=d_model,
        d_hidden=d_hidden,
        num_experts=num_experts,
        top_k=int(block.top_k),
        router=RouterConfig(strategy="token", gate="topk", normalize=True),
        experts=ExpertsConfig(kind="glu", activation=activation or _activation_name(act), bias=False),
        capacity_factor=None,
        backend=backend,
    )
    moe = MoE(config).to(device=router_weight.device, dtype=router_weight.dtype)
    with torch.no_grad():
        moe.router.weight.copy_(router_weight)
        moe.experts.w_in.copy_(gate_up_EXD.transpose(1, 2))  # [E, D, 2H] = [gate | up]
        moe.experts.w_out.copy_(down_EDH.transpose(1, 2))  # [E, H, D]
    moe.train(block.training)
    return moe
