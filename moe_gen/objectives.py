"""Objectives wrap model + loss and return a dict with ``"loss"`` and its named parts.

Generative: token cross-entropy over scored positions (label smoothing optional), L1 on continuous
target rows plus a binary stop-flag loss, and the routing auxiliary losses of every MoE layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_gen.model.model import GeneralistModel
from moe_gen.registry import Registry
from moe_gen.tasks.batch import IGNORE_INDEX, Batch

__all__ = ["OBJECTIVES", "GenerativeObjective"]

OBJECTIVES: Registry = Registry("objective")


@OBJECTIVES.register("generative")
class GenerativeObjective:
    """Encoder-decoder generation loss.

    Args:
        model: the generalist model.
        frame_weight: weight of the L1 + stop loss of continuous targets.
    """

    def __init__(self, model: GeneralistModel, frame_weight: float = 1.0) -> None:
        self.model, self.frame_weight = model, frame_weight

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        parts: dict[str, torch.Tensor] = {}
        scored = batch.labels != IGNORE_INDEX
        zero = out.logits.sum() * 0.0
        logits = out.logits.float()
        if batch.allowed_index.numel():
            # Closed-set targets: a softmax over the tokens the label trie allows, as decoding uses.
            flat = logits.reshape(-1, logits.shape[-1])
            rows = flat[batch.allowed_index]
            keep = torch.zeros_like(rows, dtype=torch.bool)
            valid = batch.allowed_tokens >= 0
            keep[torch.arange(rows.shape[0]).unsqueeze(1).expand_as(valid)[valid], batch.allowed_tokens[valid]] = True
            # -inf removes the other tokens exactly; with label smoothing (which spreads mass over every
            # class) a large finite value keeps the loss finite, and masked logits carry no gradient.
            fill = float("-inf") if self.model.config.label_smoothing == 0 else -1e4
            flat = flat.index_put((batch.allowed_index,), rows.masked_fill(~keep, fill))
            logits = flat.view_as(logits)
        if scored.any():
            parts["token_loss"] = F.cross_entropy(logits[scored], batch.labels[scored],
                                                  label_smoothing=self.model.config.label_smoothing)
            parts["token_accuracy"] = (logits[scored].argmax(-1) == batch.labels[scored]).float().mean().detach()
        frame_terms = []
        for name, predicted in out.frames.items():
            target = batch.frame_targets[name]
            frame_terms.append(F.l1_loss(predicted.float(), target.float()))
            stop = F.binary_cross_entropy_with_logits(out.stop_logits[name].float(), batch.frame_stop[name])
            frame_terms.append(stop)
        if frame_terms:
            parts["frame_loss"] = torch.stack(frame_terms).sum()
        aux = sum(out.aux_losses.values(), zero)
        loss = parts.get("token_loss", zero) + self.frame_weight * parts.get("frame_loss", zero) + aux
        return {"loss": loss, **parts, "aux_loss": aux.detach() if torch.is_tensor(aux) else aux,
                **{f"aux/{k}": v.detach() for k, v in out.aux_losses.items()}}
