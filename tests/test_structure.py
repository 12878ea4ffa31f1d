"""The package's shape: subpackages import each other in one direction, functions stay short,
no module edits sys.path, and the README's configuration table is the generated one."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "megatron_danube")


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _unit(module: str) -> str:
    """megatron_danube.training.jobs.pretrain -> training; megatron_danube.errors -> errors."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def subpackage_graph():
    graph = {}
    for module, path in _modules():
        src = _unit(module)
        for target in _imports(path):
            if target.startswith("megatron_danube.") and _unit(target) != src:
                graph.setdefault(src, set()).add(_unit(target))
    return graph


def find_cycle(graph):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack + [node, nxt]
            if nxt not in state:
                found = visit(nxt, stack + [node])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_no_import_cycle_between_subpackages():
    graph = subpackage_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # the layering the package promises: models and runtime never import training or tools
    for low in ("config", "models", "runtime", "data"):
        assert not graph.get(low, set()) & {"training", "convert", "cli"}, (low, graph[low])
    assert "runtime" not in graph.get("models", set())


def test_cycle_detector_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_function_over_100_lines():
    long = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert not long, long


def test_no_sys_path_edits():
    offenders = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "build")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                if "sys.path.insert" in open(path).read() and name != "test_structure.py":
                    offenders.append(os.path.relpath(path, REPO))
    assert not offenders, offenders


def test_readme_configuration_table_is_the_generated_one():
    from megatron_danube.config.reference import END, START, markdown

    readme = open(os.path.join(REPO, "README.md")).read()
    assert START in readme and END in readme, "README lacks the configuration table markers"
    assert readme.count(START) == readme.count(END) == 1, "one table, one pair of markers"
    table = readme[readme.index(START) : readme.index(END) + len(END)]
    assert table == markdown(), "README's configuration table is stale: run danube-config-reference"


@pytest.mark.parametrize(
    "cls_name",
    ["RunConfig", "TrainSection", "OptimSection", "ModelSection", "ChatSection", "DpoSection"],
)
def test_every_config_field_has_a_docstring(cls_name):
    import dataclasses

    from megatron_danube.config import sections
    from megatron_danube.config.reference import field_docs

    cls = getattr(sections, cls_name)
    own = cls.__annotations__  # the fields this class declares (OptimSection: its overrides)
    missing = [f.name for f in dataclasses.fields(cls) if f.name in own]
    missing = [n for n in missing if n not in field_docs(cls)]
    assert not missing, missing
