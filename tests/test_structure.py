"""The package's shape: subpackages import (or launch) each other in one direction, modules
of one subpackage import each other without cycles, functions stay short, no module edits
sys.path, and the README's configuration table is the generated one."""

import ast
import itertools
import os

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


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _is_str(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def launched(tree):
    """Modules of the package this code starts as a process: the string after a `"-m"` item
    in a list, tuple or call, e.g. `[sys.executable, "-m", "megatron_danube.cli.convert"]`.
    Launching a module depends on it as much as importing it does."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            items = node.elts
        elif isinstance(node, ast.Call):
            items = node.args
        else:
            continue
        for flag, target in itertools.pairwise(items):
            if _is_str(flag) and flag.value == "-m" and _is_str(target):
                if target.value.startswith("megatron_danube."):
                    yield target.value


def subpackage_graph(sources=None):
    """subpackage -> the subpackages it imports (anywhere in a module) or launches.
    `sources`: {module: source}; default, the package's own."""
    if sources is None:
        sources = {module: open(path).read() for module, path in _modules()}
    graph = {}
    for module, source in sources.items():
        src = _unit(module)
        tree = ast.parse(source)
        for target in itertools.chain(_imports(tree), launched(tree)):
            if target.startswith("megatron_danube.") and _unit(target) != src:
                graph.setdefault(src, set()).add(_unit(target))
    return graph


def _runs_on_import(tree):
    """The import statements a module runs when imported: not those inside functions (they
    run when called), nor those under `if TYPE_CHECKING:` (they never run)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            stack.extend(ast.iter_child_nodes(node))


def _imported_modules(node, module: str, is_package: bool, known):
    """The modules among `known` that one import statement in `module` loads: `from a import
    b` loads module a.b where b is a module, else a; relative imports resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        package = parts[: len(parts) - node.level + int(is_package)]
        base = ".".join(package + ([base] if base else []))
    found = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return [name for name in found if name in known]


def module_graph(sources=None):
    """module -> the modules of its own subpackage it imports when imported (module-level
    imports only). `sources`: {module: (source, is_package)}; default, the package's own."""
    if sources is None:
        sources = {m: (open(p).read(), p.endswith("__init__.py")) for m, p in _modules()}
    graph = {}
    for module, (source, is_package) in sources.items():
        for node in _runs_on_import(ast.parse(source)):
            for target in _imported_modules(node, module, is_package, sources):
                if target != module and _unit(target) == _unit(module):
                    graph.setdefault(module, set()).add(target)
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


# The layering the package promises: what each lower subpackage never imports nor launches.
# Models and runtime never reach training or the tools; training never reaches the tools
# (evaluation is a tool: the commands hand the trainer its task-evaluation hook).
FORBIDDEN = {
    "config": {"training", "convert", "cli", "eval"},
    "models": {"runtime", "training", "convert", "cli", "eval"},
    "runtime": {"training", "convert", "cli", "eval"},
    "data": {"training", "convert", "cli", "eval"},
    "training": {"convert", "cli", "eval"},
    "convert": {"eval"},
    "commands": {"cli", "eval", "training", "convert"},
}


def layering_violations(graph):
    """{lower subpackage: the higher ones it reaches}."""
    found = {low: graph.get(low, set()) & high for low, high in FORBIDDEN.items()}
    return {low: high for low, high in found.items() if high}


def test_no_import_cycle_between_subpackages():
    graph = subpackage_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert not layering_violations(graph), f"a lower layer reaches up: {layering_violations(graph)}"


def test_cycle_detector_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_layering_counts_a_launched_module_as_an_import():
    job = (
        "import subprocess, sys\n"
        "def convert(hf_dir):\n"
        "    cmd = [sys.executable, '-m', 'megatron_danube.cli.convert', '--load', hf_dir]\n"
        "    subprocess.run(cmd, check=True)\n"
    )
    graph = subpackage_graph({"megatron_danube.training.jobs.sft": job})
    assert layering_violations(graph) == {"training": {"cli"}}
    help_text = "'run python -m megatron_danube.cli.convert first'"  # a hint launches nothing
    assert subpackage_graph({"megatron_danube.training.x": help_text}) == {}


def test_no_module_level_import_cycle_within_a_subpackage():
    cycle = find_cycle(module_graph())
    assert cycle is None, f"module-level import cycle: {' -> '.join(cycle or [])}"


def test_module_cycle_detector_finds_a_module_level_cycle():
    pkg = "megatron_danube.data.pkg"

    def graph(a_source, b_source):
        return module_graph(
            {pkg: ("", True), f"{pkg}.a": (a_source, False), f"{pkg}.b": (b_source, False)}
        )

    a = f"from {pkg} import b\n"  # `b` is a module: the edge is to it, not to the package
    assert find_cycle(graph(a, f"import {pkg}.a\n")) is not None
    assert find_cycle(graph(a, "from . import a\n")) is not None
    assert find_cycle(graph(a, f"class B:\n    from {pkg}.a import x\n")) is not None
    assert find_cycle(graph(a, f"def f():\n    from {pkg} import a\n")) is None
    assert find_cycle(graph(a, f"if TYPE_CHECKING:\n    from {pkg} import a\n")) is None
    assert find_cycle(graph(a, "import megatron_danube.models.a\n")) is None  # other subpackage


def test_no_function_over_100_lines():
    long = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert not long, long


def test_the_package_build_ships_every_module():
    """setuptools' package finder, on pyproject's own settings, finds every module's
    package: a directory without `__init__.py` imports from a checkout (as a namespace
    package) but is missing from a built wheel."""
    import tomllib

    from setuptools import find_packages

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        found = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(where=REPO, include=found["include"]))
    missing = sorted(
        {m.rsplit(".", 1)[0] for m, path in _modules() if not path.endswith("__init__.py")}
        - shipped
    )
    assert not missing, f"packages without __init__.py (left out of a wheel): {missing}"


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


def config_sections():
    """Every dataclass of `config.sections` that a RunConfig holds, at any depth, RunConfig
    included: the sections the configuration reference documents."""
    import dataclasses
    import typing

    from megatron_danube.config import sections

    found, todo = [], [sections.RunConfig]
    while todo:
        cls = todo.pop()
        if cls in found or getattr(cls, "__module__", None) != sections.__name__:
            continue
        found.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            # Optional[X], List[X], Dict[str, X]: the section is X, however deep.
            todo += [t for t in _types_in(hints[f.name]) if dataclasses.is_dataclass(t)]
    return found


def _types_in(hint):
    yield hint
    for arg in getattr(hint, "__args__", ()):
        yield from _types_in(arg)


def test_config_sections_are_found_at_any_depth():
    from megatron_danube.config import sections

    found = config_sections()
    assert {sections.RunConfig, sections.StageSection, sections.ParallelLayout} <= set(found)
    assert {c.__module__ for c in found} == {sections.__name__}  # megatron's own are its own


def test_every_config_field_has_a_docstring():
    import dataclasses

    from megatron_danube.config.reference import field_docs

    missing = {}
    for cls in config_sections():
        own = cls.__annotations__  # the fields this class declares (OptimSection: its overrides)
        names = [f.name for f in dataclasses.fields(cls) if f.name in own]
        missing[cls.__name__] = [n for n in names if n not in field_docs(cls)]
    missing = {name: fields for name, fields in missing.items() if fields}
    assert not missing, f"fields without a docstring under them: {missing}"
