"""Structure checks of the MoE path: call hops to the expert matmul, function length, import cycles,
module-level mutable state.

Usage:
    python scripts/check_structure.py                  # all checks, table on stdout
    python scripts/check_structure.py --json out.json  # and the figures as JSON
    python scripts/check_structure.py --router task --backend merged

What it measures:
    hops        one forward of a debug-flavour ``GeneralistModel`` (attribute routing, torch
                backend by default) on a mixed batch is traced with ``sys.setprofile``. The call
                stack at the first expert matmul (``StackedExperts.forward_sorted`` or
                ``forward_merged_*``) is the path; a hop is a step of that stack from one moe_gen
                module (file) into another. Every other call across modules before the matmul (a
                side trip) is listed too. A re-entry is a call into a module that an earlier call
                entered from a different module: control coming back into a module by another way
                than the one that first led there (distinct (caller, callee, function) triples).
    functions   the longest function or method in ``moe_gen/`` (lines from ``def`` to its end).
    imports     cycles among moe_gen modules, from their module-level imports (``if
                TYPE_CHECKING`` blocks included).
    state       module-level names bound to a mutable container (dict, list, set literal or
                constructor) that some function of the module mutates (item assignment,
                ``.append``/``.update``/``.pop``/``.setdefault``/``.clear``/``.add``) — caches
                kept outside any object. Registries (``Registry`` instances) are not counted.

Exit status 0 always: this reports; ``tests/test_structure.py`` holds the limits.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Optional

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moe_gen")
ROOT = os.path.normpath(ROOT)
MAX_HOPS, MAX_LINES = 8, 60  # issue 15: hops from GeneralistModel.forward to the expert matmul; lines a function
MATMUL_FUNCTIONS = ("forward_sorted", "forward_merged_groups", "forward_merged_sets", "forward_padded",
                    "forward_expert")
MUTATORS = {"append", "update", "pop", "setdefault", "clear", "add", "extend", "insert", "popitem"}


def _module_of(filename: str) -> Optional[str]:
    path = os.path.normpath(os.path.abspath(filename))
    if not path.startswith(ROOT + os.sep):
        return None
    return os.path.relpath(path, os.path.dirname(ROOT)).replace(os.sep, "/")


def _model_and_batch(router: str, backend: str):
    import torch

    from moe_gen.config import RouterConfig
    from moe_gen.model import GeneralistModel, flavour
    from moe_gen.tasks import Tokenizer, collate, load_preset

    torch.manual_seed(0)
    tasks = [load_preset(name, "train", limit=4) for name in ("digit_classification", "doc_topic", "table_species")]
    tokenizer = Tokenizer.default()
    config = flavour("debug", moe={"router": RouterConfig(strategy=router)})
    model = GeneralistModel.build(config, tasks, tokenizer).eval()
    model.set_backend(backend)
    samples = [task.encode(i, tokenizer) for task in tasks for i in range(2)]
    return model, collate([s for s in samples if s is not None], tokenizer, model.task_ids)


def trace_hops(router: str = "attribute", backend: str = "torch") -> dict:
    """The call path from ``GeneralistModel.forward`` to the first expert matmul (see the module
    docstring): its modules, hops, side trips and re-entries."""
    import torch

    model, batch = _model_and_batch(router, backend)
    stack: list[tuple[str, str]] = []  # (module, function) of the moe_gen frames now open
    entries: list[tuple[str, str, str]] = []  # every call across modules: (caller module, callee module, function)
    found: dict = {}

    def profile(frame, event, arg):
        if found or event not in ("call", "return"):
            return
        module = _module_of(frame.f_code.co_filename)
        if module is None:
            return
        name = frame.f_code.co_qualname
        if event == "call":
            if not stack and not name.endswith("GeneralistModel.forward"):
                return
            if stack and stack[-1][0] != module:
                entries.append((stack[-1][0], module, name))
            stack.append((module, name))
            if frame.f_code.co_name in MATMUL_FUNCTIONS:
                found["path"] = list(stack)
        elif stack and stack[-1] == (module, name):
            stack.pop()

    sys.setprofile(profile)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        sys.setprofile(None)
    if not found:
        raise RuntimeError("no expert matmul was reached (is the model dense?)")
    return _summarise(found["path"], entries)


def _summarise(path: list[tuple[str, str]], entries: list[tuple[str, str, str]]) -> dict:
    """Hops of the path; side trips (calls across modules off the path); re-entries: calls into a
    module that an earlier call entered from a different module (control coming back into a module
    by another way than the one that first led there)."""
    hops = [f"{m0} → {m1} ({f1})" for (m0, _), (m1, f1) in zip(path, path[1:]) if m1 != m0]
    on_path = set(path)
    first_caller: dict[str, str] = {}
    trips, reentries = set(), []
    for caller, callee, function in entries:
        if (callee, function) not in on_path:
            trips.add(f"{caller} → {callee} ({function})")
        first = first_caller.setdefault(callee, caller)
        if first != caller:
            reentries.append(f"{caller} → {callee} ({function}); first entered from {first}")
    return {"path": [f"{m}:{f}" for m, f in path], "hops": hops, "num_hops": len(hops),
            "side_trips": sorted(trips), "reentries": sorted(set(reentries)), "num_reentries": len(set(reentries))}


def longest_functions(top: int = 5) -> list[tuple[int, str]]:
    """The ``top`` longest functions in moe_gen/ as (lines, "file:line name")."""
    found = []
    for path in _sources():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                found.append((lines, f"{_module_of(path)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)[:top]


def _sources() -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(ROOT) for f in files if f.endswith(".py"))


def _module_name(path: str) -> str:
    name = _module_of(path)[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def import_cycles() -> list[list[str]]:
    """Cycles among moe_gen modules through module-level imports (package ``__init__`` files, which
    only re-export, are left out: importing a submodule runs its package first in any case)."""
    modules = {_module_name(p): p for p in _sources()}
    packages = {m for m, p in modules.items() if p.endswith("__init__.py")}
    graph = {m: set() for m in modules if m not in packages}
    for name in graph:
        for node in ast.parse(open(modules[name]).read()).body:
            for imported in _imports(node):
                if imported in graph and imported != name:
                    graph[name].add(imported)
    return [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]


def _imports(node: ast.stmt) -> list[str]:
    body = node.body if isinstance(node, ast.If) else [node]
    out = []
    for n in body:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("moe_gen"):
            out += [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        elif isinstance(n, ast.Import):
            out += [a.name for a in n.names if a.name.startswith("moe_gen")]
    return out


def _strongly_connected(graph: dict[str, set]) -> list[list[str]]:
    """Tarjan's algorithm, iterative over an explicit stack of (node, neighbour iterator)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, neighbours = work[-1]
            for nxt in neighbours:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    out.append(component)
    return out


def module_state() -> list[str]:
    """Module-level mutable containers that a function of the same module mutates."""
    found = []
    for path in _sources():
        tree = ast.parse(open(path).read())
        containers = {}
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) and node.value is not None else []
            value = getattr(node, "value", None)
            if _is_container(value):
                for t in targets:
                    if isinstance(t, ast.Name):
                        containers[t.id] = node.lineno
        for name, line in containers.items():
            if _mutated_in_functions(tree, name):
                found.append(f"{_module_of(path)}:{line} {name}")
    return found


def _is_container(value) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id in ("dict", "list", "set", "defaultdict", "OrderedDict"))


def _mutated_in_functions(tree: ast.Module, name: str) -> bool:
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == name
                    and isinstance(node.ctx, (ast.Store, ast.Del))):
                return True
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == name
                    and node.func.attr in MUTATORS):
                return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", default="attribute", help="routing strategy of the traced model")
    parser.add_argument("--backend", default="torch", help="dispatch backend of the traced model")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    hops = trace_hops(args.router, args.backend)
    print(f"call path GeneralistModel.forward → expert matmul ({args.router}, {args.backend}): "
          f"{hops['num_hops']} hops between modules, {hops['num_reentries']} re-entries")
    for hop in hops["hops"]:
        print(f"  hop        {hop}")
    for trip in hops["side_trips"]:
        print(f"  side trip  {trip}")
    for again in hops["reentries"]:
        print(f"  RE-ENTRY   {again}")
    longest = longest_functions()
    print("longest functions: " + ", ".join(f"{n} lines {where}" for n, where in longest))
    cycles = import_cycles()
    print(f"import cycles: {cycles or 'none'}")
    state = module_state()
    print(f"module-level mutable state: {state or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hops": hops, "longest_functions": longest, "import_cycles": cycles,
                       "module_state": state}, f, indent=1)
    broken = over_limits(hops, longest, cycles, state)
    if broken:  # (it printed and exited 0: a 66-line function went unnoticed until the test suite ran)
        sys.exit("LIMITS EXCEEDED: " + "; ".join(broken))


def over_limits(hops: dict, longest: list, cycles: list, state: list) -> list[str]:
    """The structure limits of issue 15 that these figures break (none: an empty list)."""
    broken = []
    if hops["num_hops"] > MAX_HOPS or hops["num_reentries"]:
        broken.append(f"{hops['num_hops']} hops (at most {MAX_HOPS}), {hops['num_reentries']} re-entries (none)")
    broken += [f"{where} has {n} lines (at most {MAX_LINES})" for n, where in longest if n > MAX_LINES]
    broken += [f"import cycle {' → '.join(cycle)}" for cycle in cycles]
    broken += [f"module-level mutable state {where}" for where in state]
    return broken


if __name__ == "__main__":
    main()
