"""The package's layering (docs/architecture.md, section 4): data flows one way, config -> modeling ->
processing -> hosts -> everything that uses them -> the command line, with no import circle; and the
command line answers `--help` without importing torch.

The import graph is read from the source with `ast` (module-level and function-level imports alike, so a
circle hidden in a function body counts too), not from the code under test.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "slowfast_vlm"

# A module may import modules of its own layer or below, never above.
LAYERS = (
    ("slowfast_vlm.transformers_compat", "slowfast_vlm.named_configs", "slowfast_vlm.config"),
    ("slowfast_vlm.modeling",),
    ("slowfast_vlm.processing",),
    ("slowfast_vlm.hosts",),
    ("",),  # everything not named: auto, inference, training, evaluation, serving, compute, convert, ...
    ("slowfast_vlm.cli", "slowfast_vlm.__init__"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer(module: str) -> int:
    if module == PACKAGE:
        module = f"{PACKAGE}.__init__"
    for index, prefixes in enumerate(LAYERS):
        if any(prefix and (module == prefix or module.startswith(prefix + ".")) for prefix in prefixes):
            return index
    return next(i for i, prefixes in enumerate(LAYERS) if prefixes == ("",))


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The package modules an `import from` statement loads (the module, or its submodules by name)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith(PACKAGE):
        return []
    found = []
    for alias in node.names:  # `from . import hosts` names a submodule
        candidate = f"{target}.{alias.name}"
        if (SRC / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
            SRC / Path(*candidate.split(".")) / "__init__.py"
        ).is_file():
            found.append(candidate)
        else:
            found.append(target)
    return found


def type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text())
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        edges: set[str] = set()
        for node in ast.walk(tree):
            if type_checking_only(node, parents):
                continue
            if isinstance(node, ast.ImportFrom):
                edges.update(resolve(module, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith(PACKAGE + "."))
        graph[module] = edges - {module}
    return graph


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph()
    assert "slowfast_vlm.modeling.slow_tokens" in graph and "slowfast_vlm.hosts.base" in graph
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert upward == []


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    state: dict[str, str] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(path[path.index(target) :] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


@pytest.mark.parametrize("argv", [["--help"], ["ask", "--help"], ["flops", "--help"], ["ask"]])
def test_the_command_line_answers_help_and_usage_errors_without_torch(argv):
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['slowfast-vlm', *{argv!r}]\n"
        "try:\n"
        "    runpy.run_module('slowfast_vlm.cli', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    print('exit', done.code)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "torch imported: False" in result.stdout, result.stdout + result.stderr
    assert ("exit 0" if "--help" in argv else "exit 2") in result.stdout


def test_the_argument_definitions_import_neither_numpy_nor_pyav():
    """`commands` (every subcommand's arguments, `synth`'s sizes included) loads only the standard library
    and the package's plain-constant modules: `--help` costs no numpy, PyAV or tqdm import."""
    probe = (
        "import sys\n"
        "import slowfast_vlm.commands\n"
        "print(sorted(m for m in ('numpy', 'av', 'tqdm', 'torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
