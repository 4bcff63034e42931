"""Statistics of routing: pure functions of a ``RoutingRecorder``'s tables (and of weights/gradients).

Shape legend: L layers, E experts, Tk tasks, M modalities, R roles, G groups of one kind (tasks,
modalities or roles), P parameters, N tasks compared.

Definitions (all logarithms base 2, so information is in bits):

- load: share of a layer's computed assignments that each expert took.
- imbalance: coefficient of variation (population std / mean) of a layer's per-expert counts, and
  max / mean. 0 and 1 for a perfectly balanced layer.
- utilisation: share of a layer's experts that take at least 1/(4E) of its assignments (a quarter
  of the balanced share); 1 when no expert sits (nearly) idle. A tag-routed layer that sees G tag
  groups (each sharing one route of K experts) reaches at most K·G/E.
- routing entropy: mean over valid tokens of H(p) = -Σ_e p_e log2 p_e of the router probabilities;
  at most log2 E (a uniform router), 0 for a one-hot router.
- drop rate: valid tokens with no computed assignment / valid tokens.
- mutual information I(E; G) between the expert of an assignment and the token's group (task or
  modality), from the joint count table n(e, g) of computed assignments:
  I = Σ p(e, g) log2 [p(e, g) / (p(e) p(g))], p = n / Σn. A token with k assignments counts k times.
- specialisation index S = I(E; G) / H(G), in [0, 1]: the share of the uncertainty about a token's
  group that knowing one of its experts removes. 1: every expert serves one group only; 0: experts
  are blind to the group. Defined as 0 when H(G) = 0 (a single group).
- route agreement between consecutive layers, from the count table n(e, e') of top-1 experts:
  ``consistency`` = Σ_e max_e' n(e, e') / Σn, the share of tokens that go on to the most common
  successor of their expert (1: routes are fixed paths; expert ids of different layers are
  unrelated, so agreement of ids means nothing); ``mutual_information`` I(e; e') in bits and
  ``normalised`` = I / H(e').
- expert similarity: cosine similarity of the flattened weights of every pair of experts of a layer.
- task affinity: average-linkage clustering of tasks by the Jensen-Shannon distance between their
  expert-usage distributions (per layer, concatenated).
- interference (REFERENCE.md §2): with g_i the gradient of task i's loss on a batch of task i,
  the first-order change of L_i after a unit step along -g_j / ‖g_j‖ is -g_i·g_j / ‖g_j‖; relative to
  a unit step along its own gradient (-‖g_i‖) it is I[i, j] = g_i·g_j / (‖g_i‖ ‖g_j‖): 1 on the
  diagonal, negative where j's update raises i's loss (interference), positive where it helps.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from moe_gen.analysis.recorder import RoutingTables, stack_of
from moe_gen.model.model import eval_mode

__all__ = [
    "GROUP_AXES", "expert_load", "group_counts", "group_load", "imbalance", "utilisation", "routing_entropy",
    "drop_rate", "json_ready",
    "entropy_bits", "mutual_information", "specialisation_index", "route_agreement", "cosine_similarity_matrix",
    "expert_similarity", "task_usage", "task_affinity", "task_gradients", "interference_matrix", "defined_off_diagonal",
    "shared_parameters", "summarize", "check_whole_model", "check_differentiable",
]

# Axis of each group kind in a [L, E, Tk, M, R] table.
GROUP_AXES = {"task": 2, "modality": 3, "role": 4}


def _axis(by: str) -> int:
    if by not in GROUP_AXES:
        raise ValueError(f"unknown group {by!r}; known: {', '.join(GROUP_AXES)}")
    return GROUP_AXES[by]


def _share(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x / x.sum(dim), with 0 where the sum is 0."""
    total = x.sum(dim=dim, keepdim=True)
    return torch.where(total > 0, x / total.clamp_min(1e-300), torch.zeros_like(x))


# ---- load, balance, entropy, drops ------------------------------------------------------------

def expert_load(counts_LETMR: torch.Tensor) -> torch.Tensor:
    """Share of each layer's computed assignments per expert. Returns ``[L, E]`` (rows sum to 1,
    or 0 for a layer that saw no token)."""
    return _share(counts_LETMR.sum(dim=(2, 3, 4)), dim=1)


def group_counts(counts_LETMR: torch.Tensor, by: str) -> torch.Tensor:
    """Assignments by layer, group and expert ``[L, G, E]`` (``by``: task, modality or role)."""
    axis = _axis(by)
    others = tuple(a for a in (2, 3, 4) if a != axis)
    return counts_LETMR.sum(dim=others).transpose(1, 2)


def group_load(counts_LETMR: torch.Tensor, by: str) -> torch.Tensor:
    """For each layer and group, the share of the group's assignments each expert took ``[L, G, E]``."""
    return _share(group_counts(counts_LETMR, by), dim=2)


def imbalance(counts_LE: torch.Tensor, num_experts: Optional[Sequence[int]] = None) -> dict[str, torch.Tensor]:
    """Load imbalance per layer from assignment counts (or shares) ``[L, E]``.

    Args:
        num_experts: experts of each layer, when some layers have fewer columns in use.

    Returns:
        ``{"cv": [L], "max_over_mean": [L]}``; 0 for layers without tokens.
    """
    cv, ratio = [], []
    for layer, row in enumerate(counts_LE):
        row = row[: num_experts[layer]] if num_experts is not None else row
        mean = row.mean()
        if mean <= 0:
            cv.append(0.0)
            ratio.append(0.0)
            continue
        cv.append(float(row.std(unbiased=False) / mean))
        ratio.append(float(row.max() / mean))
    return {"cv": torch.tensor(cv, dtype=torch.float64), "max_over_mean": torch.tensor(ratio, dtype=torch.float64)}


def utilisation(counts_LE: torch.Tensor, num_experts: Optional[Sequence[int]] = None,
                floor: float = 0.25) -> torch.Tensor:
    """Share of each layer's experts that take at least ``floor / E`` of the layer's assignments.

    Args:
        counts_LE: assignment counts (or shares) per layer and expert.
        num_experts: experts of each layer, when some layers have fewer columns in use.
        floor: the threshold as a fraction of the balanced share 1/E (default a quarter).

    Returns:
        float64 ``[L]`` in [0, 1]; 0 for layers without tokens.
    """
    out = []
    for layer, row in enumerate(counts_LE):
        row = (row[: num_experts[layer]] if num_experts is not None else row).double()
        total = row.sum()
        E = row.numel()
        out.append(float((row >= floor * total / E).double().mean()) if total > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def routing_entropy(entropy_LTMR: torch.Tensor, tokens_LTMR: torch.Tensor, by: Optional[str] = None) -> torch.Tensor:
    """Mean per-token entropy of the router probabilities, in bits.

    Returns:
        ``[L]`` per layer, or ``[L, G]`` per layer and group when ``by`` is given (0 where no token).
    """
    if by is None:
        ent, tok = entropy_LTMR.sum(dim=(1, 2, 3)), tokens_LTMR.sum(dim=(1, 2, 3))
    else:
        axis = _axis(by) - 1  # these tables have no expert axis
        others = tuple(a for a in (1, 2, 3) if a != axis)
        ent, tok = entropy_LTMR.sum(dim=others), tokens_LTMR.sum(dim=others)
    return torch.where(tok > 0, ent / tok.clamp_min(1.0), torch.zeros_like(ent)) / math.log(2)


def drop_rate(dropped_LTMR: torch.Tensor, tokens_LTMR: torch.Tensor, by: Optional[str] = None) -> torch.Tensor:
    """Share of valid tokens with no computed assignment: ``[L]`` or ``[L, G]`` with ``by``."""
    if by is None:
        drop, tok = dropped_LTMR.sum(dim=(1, 2, 3)), tokens_LTMR.sum(dim=(1, 2, 3))
    else:
        axis = _axis(by) - 1
        others = tuple(a for a in (1, 2, 3) if a != axis)
        drop, tok = dropped_LTMR.sum(dim=others), tokens_LTMR.sum(dim=others)
    return torch.where(tok > 0, drop / tok.clamp_min(1.0), torch.zeros_like(drop))


# ---- information ------------------------------------------------------------------------------

def entropy_bits(counts: torch.Tensor) -> float:
    """Entropy in bits of the distribution proportional to ``counts`` (any shape; 0 if empty)."""
    p = counts.double().flatten()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    return float(-torch.special.xlogy(p, p).sum() / math.log(2))


def mutual_information(joint_XY: torch.Tensor) -> float:
    """Mutual information in bits between the row and column variables of a count table ``[X, Y]``."""
    joint = joint_XY.double()
    total = joint.sum()
    if total <= 0:
        return 0.0
    # I = H(X) + H(Y) - H(X, Y): exact for count tables and free of 0·log 0 cases.
    value = entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint)
    return max(value, 0.0)


def specialisation_index(joint_EG: torch.Tensor) -> float:
    """I(E; G) / H(G) for a count table of experts × groups (0 when H(G) = 0). See the module doc."""
    h_group = entropy_bits(joint_EG.sum(0))
    return mutual_information(joint_EG) / h_group if h_group > 0 else 0.0


def route_agreement(pairs_EE: torch.Tensor) -> dict[str, float]:
    """Agreement of top-1 routes between two consecutive layers from their pair counts ``[E, E']``.

    Returns:
        ``consistency`` (share of tokens going on to their expert's most common successor),
        ``mutual_information`` (bits), ``normalised`` (I / H(e'); 0 when H(e') = 0), ``tokens``.
    """
    total = float(pairs_EE.sum())
    if total <= 0:
        return {"consistency": 0.0, "mutual_information": 0.0, "normalised": 0.0, "tokens": 0.0}
    mi = mutual_information(pairs_EE)
    h_next = entropy_bits(pairs_EE.sum(0))
    return {"consistency": float(pairs_EE.max(dim=1).values.sum()) / total, "mutual_information": mi,
            "normalised": mi / h_next if h_next > 0 else 0.0, "tokens": total}


# ---- weights ----------------------------------------------------------------------------------

def cosine_similarity_matrix(w_EP: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows ``[E, E]`` (a zero row has similarity 0)."""
    w = w_EP.detach().double()
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return unit @ unit.t()


def check_whole_model(model: nn.Module, caller: str) -> None:
    """Raises unless this process holds every weight of ``model``, as the weight and gradient
    statistics need: with experts spread over processes (``shard_experts``) a layer holds some of
    its experts only (``expert_similarity`` silently left such layers out), and FSDP's shards are
    ``DTensor`` parameters and gradients (PyTorch failed on them, mixed with plain tensors).

    Raises:
        ValueError: naming ``caller``, the kind of sharding (and the expert-parallel layers), and
            the whole model to pass instead.
    """
    from moe_gen.fsdp import is_sharded
    from moe_gen.moe import MoE

    split = sorted(name for name, m in model.named_modules() if isinstance(m, MoE) and m.expert_parallel is not None)
    if split:
        raise ValueError(f"{caller}: the model's experts are spread over processes (shard_experts; layers "
                         f"{', '.join(split[:3])}{', ...' if len(split) > 3 else ''}): this process holds some of "
                         "them only; analyse the whole model: save it (Trainer.save_model) and load it with "
                         "GeneralistModel.from_pretrained, or moe_gen.distributed.load_shards into an unsharded model")
    if is_sharded(model):
        raise ValueError(f"{caller}: the model's parameters are FSDP shards: this process holds a part of each; "
                         "analyse the whole model: trainer.trained_model() or moe_gen.fsdp.unsharded_copy(model), "
                         "called on every process")


def expert_similarity(model: nn.Module) -> dict[str, torch.Tensor]:
    """For every MoE layer of ``model``, the cosine similarity ``[E, E]`` of its experts' weights,
    each expert flattened to one vector over all its stacked parameters (leading dim E).

    Raises:
        ValueError: for a model sharded over processes (``check_whole_model``).
    """
    from moe_gen.moe import MoE

    check_whole_model(model, "expert_similarity")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            E = module.config.num_experts
            parts = [p.detach().reshape(E, -1) for p in module.experts.parameters() if p.dim() >= 1 and p.shape[0] == E]
            if parts:
                out[name] = cosine_similarity_matrix(torch.cat(parts, dim=1))
    return out


# ---- task affinity ----------------------------------------------------------------------------

def task_usage(counts_LETMR: torch.Tensor) -> torch.Tensor:
    """Each task's expert-usage distribution: per layer the share of its assignments per expert,
    concatenated over layers and divided by L, so a row sums to 1 ``[Tk, L·E]`` (0 rows for tasks
    without tokens)."""
    L, E, Tk = counts_LETMR.shape[:3]
    per_layer_TLE = group_load(counts_LETMR, "task").transpose(0, 1)  # [Tk, L, E]
    return per_layer_TLE.reshape(Tk, L * E) / max(L, 1)


def task_affinity(counts_LETMR: torch.Tensor, task_names: Sequence[str], method: str = "average") -> dict:
    """Hierarchical clustering of the tasks that have tokens, by their expert usage.

    Distances are Jensen-Shannon distances (base 2, in [0, 1]) between usage distributions
    (``task_usage``), clustered with ``scipy.cluster.hierarchy.linkage``.

    Returns:
        ``{"tasks": names [N], "distance": [N, N] ndarray, "linkage": [N-1, 4] ndarray or None}``
        (``None`` when fewer than two tasks have tokens).
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import jensenshannon, squareform

    usage_TX = task_usage(counts_LETMR).numpy()
    used = [t for t in range(usage_TX.shape[0]) if usage_TX[t].sum() > 0]
    names = [task_names[t] for t in used]
    N = len(used)
    distance = np.zeros((N, N))
    for a in range(N):
        for b in range(a + 1, N):
            d = jensenshannon(usage_TX[used[a]], usage_TX[used[b]], base=2)
            distance[a, b] = distance[b, a] = 0.0 if not np.isfinite(d) else d
    Z = linkage(squareform(distance, checks=False), method=method) if N >= 2 else None
    return {"tasks": names, "distance": distance, "linkage": Z}


# ---- interference -----------------------------------------------------------------------------

def shared_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters every task goes through: for a ``GeneralistModel`` the encoder and decoder
    stacks (attention, FFNs, experts, routers), without the per-modality adapters and heads whose
    gradients only their own tasks touch; for other modules every parameter. Whatever their
    ``requires_grad``: that flag says what a fine-tuning run trained (``trainable="experts"`` kept
    only the experts'), not which parameters the tasks share, so the same weights gave other
    interference after such a run, and none at all after ``trainable="adapters"``."""
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        return [(f"{side}.{n}", p) for side in ("encoder", "decoder")
                for n, p in getattr(model, side).named_parameters()]
    return list(model.named_parameters())


def _generative_task_loss(model: nn.Module, batch) -> torch.Tensor:
    """A task's own loss: token cross-entropy plus the continuous-target loss, without the routing
    auxiliary losses (they are not any task's loss)."""
    from moe_gen.objectives import GenerativeObjective

    out = GenerativeObjective(model)(batch)
    zero = out["loss"] * 0.0
    return out.get("token_loss", zero) + out.get("frame_loss", zero)


def task_gradients(model: nn.Module, batches: Mapping[str, object],
                   loss_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None,
                   params: Optional[Sequence[tuple[str, nn.Parameter]]] = None) -> dict[str, torch.Tensor]:
    """Flattened gradient ``[P]`` of each task's loss on its batch.

    Args:
        model: the model (put in eval mode meanwhile: no dropout, no router noise).
        batches: task name → batch of that task.
        loss_fn: ``(model, batch) -> scalar``; default the generative token + frame loss.
        params: ``(name, parameter)`` pairs to differentiate; default ``shared_parameters(model)``.

    Parameters that do not require gradients (frozen by a fine-tuning run's ``trainable``) are
    differentiated all the same: ``requires_grad`` is set for the call and put back after it.

    Raises:
        ValueError: for a model sharded over processes (``check_whole_model``) or with MoE layers
            frozen for inference (``check_differentiable``).
    """
    check_whole_model(model, "task_gradients")
    check_differentiable(model, "task_gradients")
    loss_fn = loss_fn or _generative_task_loss
    params = list(params if params is not None else shared_parameters(model))
    if not params:
        raise ValueError("the model has no parameters to take task gradients of")
    tensors = [p for _, p in params]
    frozen = [p for p in tensors if not p.requires_grad]
    grads = {}
    try:
        for p in frozen:
            p.requires_grad_(True)
        with eval_mode(model):
            for name, batch in batches.items():
                with torch.enable_grad():
                    loss = loss_fn(model, batch)
                    if not loss.requires_grad:
                        raise ValueError(f"task {name!r}: its loss does not depend on the chosen parameters")
                    parts = torch.autograd.grad(loss, tensors, allow_unused=True)
                grads[name] = torch.cat([(torch.zeros_like(p) if g is None else g).detach().reshape(-1).double()
                                         for g, p in zip(parts, tensors)])
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return grads


def check_differentiable(model: nn.Module, caller: str) -> None:
    """Raises unless gradients can be taken through every MoE layer of ``model``: a layer frozen for
    inference (``merge_for_inference``, ``MoE.freeze_for_inference``) runs on merged weights and
    routes it keeps, computed without autograd, so its experts and router would get no gradient.

    Raises:
        ValueError: naming ``caller``, the frozen layers, and what to do instead.
    """
    from moe_gen.moe import MoE

    frozen = [name for name, m in model.named_modules() if isinstance(m, MoE) and m.frozen]
    if frozen:
        raise ValueError(f"{caller}: MoE layers {', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''} are "
                         "frozen for inference (merge_for_inference): they run on merged weights kept without "
                         "gradients, so task gradients (interference) cannot be taken; analyse the model the copy "
                         "was merged from, or skip interference (interference_rows=0, --interference-rows 0)")


def interference_matrix(grads: Mapping[str, torch.Tensor]) -> dict:
    """The task interference matrix from per-task gradients (see the module doc).

    Args:
        grads: task name → flattened gradient ``[P]`` (``task_gradients``).

    Returns:
        ``{"tasks": names [N], "matrix": [N, N] I[i, j] = g_i·g_j / (‖g_i‖ ‖g_j‖), "dot": [N, N]
        g_i·g_j, "norms": [N] ‖g_i‖}``. A task whose gradient is zero (every row the one label the
        model knows, say) has no direction: its row and column are NaN, undefined, not a measured
        0 (``defined_off_diagonal`` leaves them out of means and minima).
    """
    names = list(grads)
    if not names:
        raise ValueError("interference needs the gradient of at least one task")
    g_NP = torch.stack([grads[n].double() for n in names])
    dot_NN = g_NP @ g_NP.t()
    norms_N = g_NP.norm(dim=1)
    denom = norms_N.unsqueeze(1) * norms_N.unsqueeze(0)
    matrix = torch.where(denom > 0, dot_NN / denom.clamp_min(1e-300), torch.full_like(dot_NN, math.nan))
    return {"tasks": names, "matrix": matrix, "dot": dot_NN, "norms": norms_N}


def defined_off_diagonal(matrix_NN: torch.Tensor) -> torch.Tensor:
    """The defined (not NaN) off-diagonal cosines of an interference matrix ``[K]``: the pairs of
    two different tasks that both have a gradient (empty with fewer than two such tasks)."""
    N = matrix_NN.shape[0]
    values = matrix_NN[~torch.eye(N, dtype=torch.bool)]
    return values[~values.isnan()]


# ---- summary ----------------------------------------------------------------------------------

def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def _group_statistics(tables: RoutingTables, by: str, names: list, active: list, stack_L: list) -> dict:
    """``summarize``'s statistics per group of one tag (``task``, ``modality`` or ``role``): load,
    tokens, mutual information, specialisation (per layer, means over active layers and per
    stack), entropy and drop rate."""
    counts, L = tables.counts_LETMR, tables.counts_LETMR.shape[0]
    stacks = list(dict.fromkeys(stack_L))
    g_counts = group_counts(counts, by)  # [L, G, E]
    g_load = group_load(counts, by)
    g_tokens = tables.tokens_LTMR.sum(dim=tuple(a for a in (1, 2, 3) if a != _axis(by) - 1))  # [L, G]
    used = [g for g in range(g_counts.shape[1]) if g_tokens[:, g].sum() > 0]
    mi = [mutual_information(g_counts[layer].t()) for layer in range(L)]
    spec = [specialisation_index(g_counts[layer].t()) for layer in range(L)]
    ent_g = routing_entropy(tables.entropy_LTMR, tables.tokens_LTMR, by)
    drop_g = drop_rate(tables.dropped_LTMR, tables.tokens_LTMR, by)
    return {
        f"load_by_{by}": {names[g]: g_load[:, g].tolist() for g in used},
        f"tokens_by_{by}": {names[g]: g_tokens[:, g].tolist() for g in used},
        f"mi_{by}_bits": mi,
        f"specialisation_{by}": spec,
        f"mean_mi_{by}_bits": _mean(mi[layer] for layer in active),
        f"mean_specialisation_{by}": _mean(spec[layer] for layer in active),
        f"mean_mi_{by}_bits_by_stack": {st: _mean(mi[layer] for layer in active if stack_L[layer] == st)
                                        for st in stacks},
        f"mean_specialisation_{by}_by_stack": {st: _mean(spec[layer] for layer in active if stack_L[layer] == st)
                                               for st in stacks},
        f"entropy_bits_by_{by}": {names[g]: ent_g[:, g].tolist() for g in used},
        f"drop_rate_by_{by}": {names[g]: drop_g[:, g].tolist() for g in used},
    }


def _agreement_statistics(tables: RoutingTables) -> dict:
    """Route agreement between the recorded layer pairs, and its means over pairs that saw tokens."""
    agreement = [dict(route_agreement(tables.pairs_PEE[i]), layers=[tables.layer_names[a], tables.layer_names[b]])
                 for i, (a, b) in enumerate(tables.pair_layers)]
    seen = [a for a in agreement if a["tokens"] > 0]
    return {"route_agreement": agreement, "mean_route_consistency": _mean(a["consistency"] for a in seen),
            "mean_route_nmi": _mean(a["normalised"] for a in seen)}


def summarize(tables: RoutingTables) -> dict:
    """Every routing statistic of the tables, as plain numbers and lists (JSON).

    Per-layer values are lists in layer order; ``mean_*`` average over the layers that saw tokens
    (``*_by_stack``: over the layers of each stack, e.g. ``encoder.blocks``).
    Mutual information and specialisation are per layer, from each layer's expert × group table.
    """
    counts = tables.counts_LETMR
    L = counts.shape[0]
    tokens_L = tables.tokens_LTMR.sum(dim=(1, 2, 3))
    active = [layer for layer in range(L) if tokens_L[layer] > 0]
    if L and not active:
        warnings.warn("the routing tables saw no token: the recorder's model did not run while it recorded (a "
                      "trainer evaluates trainer.trained_model(), the weight average or an unsharded copy, not "
                      "the model it trains); every statistic below is empty", stacklevel=2)
    load_LE = expert_load(counts)
    balance = imbalance(counts.sum(dim=(2, 3, 4)), tables.num_experts)
    used_L = utilisation(counts.sum(dim=(2, 3, 4)), tables.num_experts)
    entropy_L = routing_entropy(tables.entropy_LTMR, tables.tokens_LTMR)
    drops_L = drop_rate(tables.dropped_LTMR, tables.tokens_LTMR)
    names = {"task": tables.task_names, "modality": tables.modality_names, "role": tables.role_names}
    # Stacks (encoder, decoder): their layers see different tokens (inputs vs targets), so the
    # means per stack are reported beside the mean over all layers.
    stack_L = [stack_of(name)[0] for name in tables.layer_names]
    out: dict = {
        "layers": tables.layer_names,
        "num_experts": tables.num_experts,
        "tokens": [float(t) for t in tokens_L],
        "assignments": [float(c) for c in counts.sum(dim=(1, 2, 3, 4))],
        "load": load_LE.tolist(),
        "cv": balance["cv"].tolist(),
        "max_over_mean": balance["max_over_mean"].tolist(),
        "utilisation": used_L.tolist(),
        "entropy_bits": entropy_L.tolist(),
        "max_entropy_bits": [math.log2(e) for e in tables.num_experts],
        "drop_rate": drops_L.tolist(),
        "dropped_assignments": tables.dropped_assignments_L.tolist(),
    }
    for by in ("task", "modality", "role"):
        out.update(_group_statistics(tables, by, names[by], active, stack_L))
    out.update(_agreement_statistics(tables))
    out["mean_cv"] = _mean(out["cv"][layer] for layer in active)
    out["mean_max_over_mean"] = _mean(out["max_over_mean"][layer] for layer in active)
    out["mean_utilisation"] = _mean(out["utilisation"][layer] for layer in active)
    out["mean_entropy_bits"] = _mean(out["entropy_bits"][layer] for layer in active)
    total_tokens = float(tokens_L.sum())
    out["overall_drop_rate"] = float(tables.dropped_LTMR.sum()) / total_tokens if total_tokens else 0.0
    return out


def json_ready(value):
    """``value`` as JSON can hold it: tensors and arrays as lists, non-finite numbers as null (JSON
    has no NaN or Infinity), at any depth."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return json_ready(value.tolist())
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
