"""The package's imports run one way (docs/ARCHITECTURE.md): no cycle, every module imports only from its own layer
or the layers below, nothing imports the orchestrator (`pipeline`) but `main`, and the system never imports the
MNIST world (`d2g_jax/world/`), which stands in for a user's model folder. Imports inside functions count too."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "d2g_jax")

# Layers, bottom to top (docs/ARCHITECTURE.md). A module may import modules of its own layer or below.
LAYERS = (
    ("files", "console", "sharding"),  # leaves
    ("models",),
    ("losses", "sampling", "workdir"),
    ("data",),
    ("train",),
    ("export", "generate"),
    ("eval",),
    ("serve",),  # the demo server (uses generate; imported by the pipeline's serve mode)
    ("validate",),
    ("pipeline",),
    ("main",),
    ("world",),  # a stand-in for the user's files: it may use the system, the system never imports it
)


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") >= 1 else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of LAYERS; add it (and to docs/ARCHITECTURE.md).")


def modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """d2g_jax modules `name` imports anywhere in its file (module level and inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                out.add(t)
    return {t for t in out if t != "d2g_jax"}


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers_import_downwards_only(graph):
    bad = []
    for m, deps in sorted(graph.items()):
        if m == "d2g_jax":
            continue
        for d in sorted(deps):
            if layer_of(d) > layer_of(m):
                bad.append(f"{m} (layer {LAYERS[layer_of(m)]}) imports {d} (layer {LAYERS[layer_of(d)]})")
    assert not bad, "\n".join(bad)


def test_only_main_imports_the_pipeline_and_nothing_imports_main_or_the_world(graph):
    for m, deps in graph.items():
        if m != "d2g_jax.main":
            assert "d2g_jax.pipeline" not in deps, f"{m} imports d2g_jax.pipeline"
        assert "d2g_jax.main" not in deps, f"{m} imports d2g_jax.main"
        if not m.startswith("d2g_jax.world"):
            assert not any(d.startswith("d2g_jax.world") for d in deps), f"{m} imports the MNIST world"


def closure(graph, m):
    seen, todo = set(), [m]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


@pytest.mark.parametrize("step_module", ["d2g_jax.train.steps", "d2g_jax.train.stage2"])
def test_pure_steps_need_no_data_loop_or_checkpoint(graph, step_module):
    """The jitted steps are what `bench/` (and a GPU machine without grain/clu) imports: they must not reach the
    data readers, the trainer loop or Orbax checkpointing, even transitively."""
    reached = closure(graph, step_module)
    banned = {d for d in reached if d.startswith("d2g_jax.data")}
    banned |= reached & {"d2g_jax.train.trainer", "d2g_jax.train.stage2_trainer", "d2g_jax.train.checkpoint"}
    assert not banned, f"{step_module} reaches {sorted(banned)}"


def test_the_checker_sees_function_level_imports(tmp_path):
    """A planted `from d2g_jax import pipeline` inside a function of a lower module is found."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from d2g_jax import pipeline\n    from ..train import trainer\n")
    found = imports_of("d2g_jax.eval.m", str(f), {"d2g_jax.pipeline", "d2g_jax.train.trainer", "d2g_jax.train"})
    assert found == {"d2g_jax.pipeline", "d2g_jax.train", "d2g_jax.train.trainer"}
