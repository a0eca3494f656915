"""The code's layers are one-way (docs/architecture.md has the picture and the reasons).
Each module may import its own layer and the layers below it, never one above; layers
that share a level (training, evaluation) do not import each other; and no module
imports itself back through others (no cycles). Function-local imports count as much as
top-level ones: they run too.

    launch/                          9  how a person starts it
    rlhf/{dpo,kto,rm,sft,ppo,sample,evaluate}.py  8  entry points (+ rlhf/builtin_models.py, which
                                        the demo's entry points share)
    rlhf/online/                     7  the online-RL flow (its task is a training task)
    rlhf/train/  rlhf/evaluation/    6  the training loop, driver, tasks, export | the
                                        evaluation library
    rlhf/runlog/                     5  everything a run writes or prints
    cluster/                         4  how it runs on Ray: Ray Train, DeepSpeed, vLLM
    rlhf/data/                       3  reading, formats, pipelines, demo data and model
    rlhf/core/                       2  maths and RL interfaces (torch, no Ray/DeepSpeed/vLLM)
    rlhf/config/                     1  dataclasses and the loader (imports nothing of ours)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ("rlhf.dpo", "rlhf.kto", "rlhf.rm", "rlhf.sft", "rlhf.ppo", "rlhf.sample",
                "rlhf.evaluate", "rlhf.builtin_models")
LAYERS = [  # (name, level, module prefixes)
    ("config", 1, ("rlhf.config",)),
    ("core", 2, ("rlhf.core",)),
    ("data", 3, ("rlhf.data",)),
    ("cluster", 4, ("cluster",)),
    ("runlog", 5, ("rlhf.runlog",)),
    ("train", 6, ("rlhf.train",)),
    ("evaluation", 6, ("rlhf.evaluation",)),
    ("online", 7, ("rlhf.online",)),
    ("entry points", 8, ENTRY_POINTS),
    ("launch", 9, ("launch",)),
]
# what the two bottom layers may not pull in (tested in milliseconds)
HEAVY = ("ray", "deepspeed", "vllm")


def _layer(module: str) -> tuple[str, int] | None:
    for name, level, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name, level
    return None


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("rlhf", "cluster", "launch"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(our modules it imports, the top-level names of the others), anywhere in the file.
    `from pkg import name` counts as pkg.name where that is a module."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            (ours if name.split(".")[0] in ("rlhf", "cluster", "launch") else others).add(
                name if name.split(".")[0] in ("rlhf", "cluster", "launch")
                else name.split(".")[0])
    return ours, others


def test_every_module_has_a_layer_and_imports_run_one_way():
    modules = _modules()
    graph, wrong = {}, []
    for mod, path in sorted(modules.items()):
        if mod in ("rlhf", "cluster", "launch"):  # the packages' (empty) __init__
            continue
        here = _layer(mod)
        assert here, f"{mod} ({path.relative_to(ROOT)}) is in no layer: move it into one"
        ours, others = _imports(path, modules)
        graph[mod] = {m for m in ours if m != mod}
        for dep in graph[mod]:
            there = _layer(dep)
            assert there, f"{mod} imports {dep}, which is in no layer"
            if there[1] > here[1] or (there[1] == here[1] and there[0] != here[0]):
                wrong.append(f"{mod} ({here[0]}) imports {dep} ({there[0]})")
        if here[1] <= 2:
            wrong += [f"{mod} ({here[0]}) imports {o}" for o in sorted(others) if o in HEAVY]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)

    # no cycles, within layers included
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join(trail + [m])
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, trail + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_the_walk_sees_function_local_imports(tmp_path):
    """A lazy import inside a function is an import: the walk must see it."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from rlhf.ppo import main\n    import ray\n")
    ours, others = _imports(f, {"rlhf.ppo": f})
    assert ours == {"rlhf.ppo"} and others == {"ray"}
