"""One small decorator registry, reused for every pluggable part of moe_gen.

Routers, gates, expert kinds and dispatch backends register here by name; later parts of the
package (modalities, tasks, objectives, metrics) use the same class.

    @BACKENDS.register("torch")
    class TorchDispatch: ...

    BACKENDS.get("torch")       # -> TorchDispatch
    BACKENDS.get("tourch")      # ValueError: unknown dispatch backend 'tourch'; known: eager, ...
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")

__all__ = [
    "Registry", "ROUTERS", "GATES", "EXPERTS", "BACKENDS", "MODALITIES", "PREPROCESSORS", "ADAPTERS",
    "TASKS", "METRICS", "OBJECTIVES", "did_you_mean",
]


def did_you_mean(names: Iterable[object], known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name to any of ``names`` (difflib), or ''."""
    known = list(known)
    guesses = [match for name in names if isinstance(name, str)
               for match in difflib.get_close_matches(name, known, n=1, cutoff=0.75)]
    return f" (did you mean {', '.join(repr(g) for g in dict.fromkeys(guesses))}?)" if guesses else ""


class Registry(Generic[T]):
    """A name → object mapping filled by a decorator.

    Args:
        kind: what the entries are, used in error messages ("router strategy", "dispatch backend").
        builtins: the module that registers the built-in entries, imported on the first lookup (the
            task layer's registries fill when ``moe_gen.tasks`` loads, which ``import moe_gen``
            leaves for later; without it ``moe_gen.TASKS.list()`` was empty).
    """

    def __init__(self, kind: str, builtins: str | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._builtins = builtins

    def _load_builtins(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None  # once (and not again while it imports)
            importlib.import_module(module)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; duplicate names are rejected, built-in
        ones too (they load first: a metric named ``accuracy`` registered before ``moe_gen.tasks``
        loaded made the built-in's registration fail, and with it every import of the tasks)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        self._load_builtins()

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); "
                    "pick another name"
                )
            self._entries[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> None:
        """Removes an entry (for tests and for users replacing a part)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        """Returns the entry for ``name``; unknown names are answered with the known ones."""
        self._load_builtins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}{did_you_mean([name], self.list())}; "
                f"known: {', '.join(self.list()) or '(none)'}"
            ) from None

    def list(self) -> list[str]:
        """The registered names, sorted."""
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"


# Router input strategies: how a router turns hidden states and/or tags into its input z.
ROUTERS: Registry = Registry("router strategy")
# Gates: how router logits become expert assignments (top-k, expert choice, balanced, hash).
GATES: Registry = Registry("gate")
# Expert kinds with stacked weights (mlp, glu, linear).
EXPERTS: Registry = Registry("expert kind")
# Dispatch backends: how tokens reach their experts and come back.
BACKENDS: Registry = Registry("dispatch backend")
# Modalities (TEXT, IMAGE, ...): their defaults and which attributes their slots accept.
MODALITIES: Registry = Registry("modality", builtins="moe_gen.tasks")
# Preprocessors: raw slot value -> token ids or feature rows (chosen by `preprocess=` or default).
PREPROCESSORS: Registry = Registry("preprocessor", builtins="moe_gen.tasks")
# Adapters: feature rows -> embeddings of width D (chosen by `adaptor=` or default).
ADAPTERS: Registry = Registry("adapter", builtins="moe_gen.tasks")
# Built-in tasks (presets) and metrics.
TASKS: Registry = Registry("task", builtins="moe_gen.tasks")
METRICS: Registry = Registry("metric", builtins="moe_gen.tasks")
# Training objectives (generative, contrastive, masked, parallel): a Task names one and checks it
# here; the first lookup imports ``moe_gen.objectives`` (which fills it, and imports the model code),
# so ``moe_gen.tasks`` itself does not import it at load time (no import cycle).
OBJECTIVES: Registry = Registry("objective", builtins="moe_gen.objectives")
