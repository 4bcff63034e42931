"""Per-token routing tags: the contract between instructions and routers.

Shape legend: ``...`` is the token layout of the input (``[T]`` or ``[B, S]``), M the number of
modalities, A the attribute-vector width.

Every token carries its task, its modality, its role in the sample (input, target, literal
prompt), the set of modalities its task uses, whether it is causally masked, and the pass
(generative, contrastive, masked) that produced it. Tag-based routers read these instead of, or
next to, the hidden state. Later issues fill tags from instructions; here they are built by hand.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Sequence, Union

import torch

__all__ = ["MODALITIES", "ROLES", "PASSES", "TokenTags", "modality_index", "attribute_dim"]

# Built-in vocabularies; the index in each tuple is the tag value.
MODALITIES: tuple[str, ...] = (
    "TEXT", "IMAGE", "AUDIO", "VIDEO", "MOTION", "BOX", "STRUCT", "PHONE", "CATEGORY",
)
ROLES: tuple[str, ...] = ("input", "target", "prompt")
PASSES: tuple[str, ...] = ("generative", "contrastive", "masked")


def _lookup(kind: str, names: Sequence[str], value: Union[str, int]) -> int:
    if isinstance(value, int):
        return value
    try:
        return list(names).index(value)
    except ValueError:
        raise ValueError(f"unknown {kind} {value!r}; known: {', '.join(names)}") from None


def modality_index(name: Union[str, int]) -> int:
    """Index of a built-in modality name (``"IMAGE"`` → 1); ints pass through."""
    return _lookup("modality", MODALITIES, name)


def attribute_dim(num_modalities: int, num_roles: int, num_passes: int) -> int:
    """Width A of the attribute vector built by ``TokenTags.attribute_vector``."""
    return 2 * num_modalities + num_roles + 1 + num_passes


_DERIVED: dict[int, dict] = {}  # id(tags) → values derived from them (see TokenTags._memo)


@dataclasses.dataclass(frozen=True)
class TokenTags:
    """Tag tensors shaped like the tokens they describe.

    Attributes:
        task: long ``[...]``, index in the model's task vocabulary.
        modality: long ``[...]``, index in the modality vocabulary (``MODALITIES`` by default).
        role: long ``[...]``, index in ``ROLES`` (input, target, prompt).
        task_modalities: bool ``[..., M]``, multi-hot over the modalities the task uses.
        causal: bool ``[...]``, True where the token is causally masked (decoder side).
        pass_id: long ``[...]``, index in ``PASSES`` (generative, contrastive, masked).
        sample: optional long ``[...]``: which sample a token belongs to, for routers that pool a
            sequence summary (``context``) when several samples are packed into one row.
    """

    task: torch.Tensor
    modality: torch.Tensor
    role: torch.Tensor
    task_modalities: torch.Tensor
    causal: torch.Tensor
    pass_id: torch.Tensor
    sample: torch.Tensor | None = None

    @classmethod
    def constant(
        cls,
        shape: Union[int, Sequence[int], torch.Size],
        *,
        task: int = 0,
        modality: Union[str, int] = "TEXT",
        role: Union[str, int] = "input",
        task_modalities: Sequence[Union[str, int]] | None = None,
        causal: bool = False,
        pass_: Union[str, int] = "generative",
        num_modalities: int = len(MODALITIES),
        device: torch.device | None = None,
    ) -> "TokenTags":
        """Tags with the same value for every token of ``shape`` (build by hand, then ``cat``).

        ``task_modalities`` defaults to just the token's own modality.
        """
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        mod = modality_index(modality)
        used = [mod] if task_modalities is None else [modality_index(m) for m in task_modalities]
        multi_hot = torch.zeros(num_modalities, dtype=torch.bool, device=device)
        for index in used:
            if not 0 <= index < num_modalities:
                raise ValueError(f"task modality index {index} is outside [0, {num_modalities})")
            multi_hot[index] = True

        def full(value: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        return cls(
            task=full(task),
            modality=full(mod),
            role=full(_lookup("role", ROLES, role)),
            task_modalities=multi_hot.expand(*shape, num_modalities).clone(),
            causal=full(int(causal), torch.bool),
            pass_id=full(_lookup("pass", PASSES, pass_)),
        )

    @classmethod
    def cat(cls, parts: Sequence["TokenTags"], dim: int = 0) -> "TokenTags":
        """Concatenates tags along a token dimension (``sample`` kept only if all parts have it)."""
        if not parts:
            raise ValueError("TokenTags.cat needs at least one part")
        fields = {}
        for field in dataclasses.fields(cls):
            values = [getattr(p, field.name) for p in parts]
            if field.name == "sample" and any(v is None for v in values):
                fields[field.name] = None
            else:
                fields[field.name] = torch.cat(values, dim=dim)
        return cls(**fields)

    @property
    def shape(self) -> torch.Size:
        """The token layout (``[T]`` or ``[B, S]``)."""
        return self.task.shape

    def _map(self, fn) -> "TokenTags":
        """Applies ``fn`` to every per-token tensor; ``task_modalities`` keeps its last dim."""
        return TokenTags(
            task=fn(self.task),
            modality=fn(self.modality),
            role=fn(self.role),
            task_modalities=fn(self.task_modalities),
            causal=fn(self.causal),
            pass_id=fn(self.pass_id),
            sample=None if self.sample is None else fn(self.sample),
        )

    def _memo(self, key, compute):
        """Derived values computed once per tags object: every MoE layer of a forward pass gets
        the same tags, so flattening, validation and tag grouping run once, not once per layer.
        Tags are treated as immutable once used (``dataclasses.replace`` makes a fresh object)."""
        memo = _DERIVED.get(id(self))
        if memo is None:
            # kept beside the object (not in its __dict__, which users rebuild tags from) and
            # dropped when the object is collected
            memo = _DERIVED[id(self)] = {}
            weakref.finalize(self, _DERIVED.pop, id(self), None)
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def derived(self, name: str, compute, tensor: torch.Tensor | None = None):
        """``compute()``, once per tags object (and per ``tensor`` object when given, e.g. the
        padding mask that goes with these tags): the MoE layers of one forward pass share such
        values. ``compute`` must depend on nothing but the tags and ``tensor``. The tensor is
        held as long as the memo, so its id cannot be reused by another object meanwhile."""
        if tensor is None:
            return self._memo(("derived", name), compute)
        return self._memo(("derived", name, id(tensor)), lambda: (tensor, compute()))[1]

    def flatten(self) -> "TokenTags":
        """Tags for ``[T]`` tokens (token dims merged, ``task_modalities`` stays ``[T, M]``)."""
        n = self.task.numel()
        return self._memo("flat", lambda: self._map(lambda t: t.reshape(n, *t.shape[self.task.dim():])))

    def groups(self) -> tuple[torch.Tensor, torch.Tensor, "TokenTags"]:
        """Tag groups of flattened tags ``[T]``: ``group_T`` (long, group of each token, groups
        numbered in key order), ``first_G`` (long, first token of each group) and the tags of
        those first tokens ``[G]``."""
        return self.group_ids(), *self._memo("group rows", self._group_rows)

    def group_ids(self) -> torch.Tensor:
        """``group_T`` of ``groups()`` alone (what a router that reuses cached routes needs)."""
        return self._memo("groups", self._group_ids)[0]

    def group_keys(self) -> tuple[int, ...]:
        """The ``group_key`` of each tag group of ``groups()``, in group order, as Python ints: a
        hashable name for this set of groups (routers cache inference routes by it)."""
        return self._memo("groups", self._group_ids)[1]

    def _group_ids(self):
        if self.task.dim() != 1:
            raise ValueError(f"groups() needs flattened tags [T], got shape {tuple(self.shape)}")
        keys_G, group_T = torch.unique(self.group_key(), return_inverse=True)
        return group_T, tuple(keys_G.tolist())

    def _group_rows(self):
        group_T = self.group_ids()
        T = group_T.shape[0]
        token_T = torch.arange(T, device=group_T.device)
        first_G = torch.full((len(self.group_keys()),), T, device=group_T.device)
        first_G = first_G.scatter_reduce(0, group_T, token_T, "amin")
        return first_G, self.select(first_G)

    def select(self, index: torch.Tensor) -> "TokenTags":
        """Tags of a subset of tokens: ``index`` is what indexes each tag tensor (a bool mask or
        long ids over flattened tokens, or a tuple such as ``(rows, columns)`` over ``[B, S]``)."""
        return self._map(lambda t: t[index])

    def to(self, device: Union[str, torch.device]) -> "TokenTags":
        return self._map(lambda t: t.to(device))

    def validate(
        self,
        shape: Sequence[int],
        *,
        num_modalities: int,
        num_roles: int,
        num_passes: int,
        num_tasks: int,
    ) -> None:
        """Raises ``ValueError`` naming the tag at fault: shape, dtype or out-of-range value."""
        shape = tuple(shape)
        key = ("validated", shape, num_modalities, num_roles, num_passes, num_tasks)
        if _DERIVED.get(id(self), {}).get(key):
            return
        self._validate(shape, num_modalities=num_modalities, num_roles=num_roles, num_passes=num_passes,
                       num_tasks=num_tasks)
        self._memo(key, lambda: True)

    def _validate(self, shape, *, num_modalities, num_roles, num_passes, num_tasks) -> None:
        limits = {
            "task": num_tasks, "modality": num_modalities, "role": num_roles, "pass_id": num_passes,
        }
        for name in ("task", "modality", "role", "causal", "pass_id", "sample"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"tags.{name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"tags.{name} has shape {tuple(t.shape)} but the tokens are {shape}"
                )
            if t.is_floating_point() or t.is_complex():
                raise ValueError(f"tags.{name} must be an integer or bool tensor, got {t.dtype}")
            if name in limits and t.numel():
                lo, hi = (int(v) for v in torch.aminmax(t.long() if t.dtype == torch.bool else t))
                if lo < 0 or hi >= limits[name]:
                    raise ValueError(
                        f"tags.{name} values must lie in [0, {limits[name]}), got [{lo}, {hi}]"
                    )
        tm = self.task_modalities
        if not isinstance(tm, torch.Tensor) or tuple(tm.shape) != shape + (num_modalities,):
            got = tuple(tm.shape) if isinstance(tm, torch.Tensor) else type(tm).__name__
            raise ValueError(
                f"tags.task_modalities must have shape {shape + (num_modalities,)} "
                f"(tokens x num_modalities), got {got}"
            )

    def group_key(self) -> torch.Tensor:
        """One long id per distinct combination of (task, modality, role, causal, pass,
        task_modalities): tokens with equal keys are one tag group and share every
        content-independent route. ``[...]`` long."""
        M = self.task_modalities.shape[-1]
        if M > 40:
            raise ValueError(f"group_key supports at most 40 modalities, got {M}")
        bits = torch.arange(M, device=self.task.device)
        modality_bits = (self.task_modalities.long() << bits).sum(-1)
        key = self.task.long()
        for part, size in ((self.modality, 1 << 8), (self.role, 1 << 4), (self.causal, 2),
                           (self.pass_id, 1 << 4)):
            key = key * size + part.long()
        return (key << M) | modality_bits

    def attribute_vector(self, num_modalities: int, num_roles: int, num_passes: int) -> torch.Tensor:
        """The multi-hot attribute vector of Uni-Perceiver-MoE, generalised.

        Layout (width ``attribute_dim(M, R, P)``): modalities the task uses (M bits), the token's
        modality (M, one-hot), its role (R, one-hot), causal (1 bit), pass (P, one-hot). New tasks
        are new combinations of known bits, which is what lets attribute routing generalise.

        Returns:
            float32 ``[..., A]``.
        """
        one_hot = torch.nn.functional.one_hot
        return self._memo(("attributes", num_modalities, num_roles, num_passes), lambda: torch.cat(
            [
                self.task_modalities.float(),
                one_hot(self.modality, num_modalities).float(),
                one_hot(self.role, num_roles).float(),
                self.causal.float().unsqueeze(-1),
                one_hot(self.pass_id, num_passes).float(),
            ],
            dim=-1,
        ))
