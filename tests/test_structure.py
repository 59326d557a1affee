"""The shape of the code base: public API, entry points, thin tools, layering, citations.

These are the rules of docs/design.md#rooms and #import-layering, checked by reading the source
(``ast``), so that they hold for whoever changes the code next.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from paths import ROOT

import cabs_streaming

PACKAGE = ROOT / "cabs_streaming"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
#: The tool script in ``tools/`` that is the same command as each entry point.
TOOLS = {
    "cabs-convert": "convert_to_mds.py",
    "cabs-tag": "tag_concepts.py",
    "cabs-report": "concept_report.py",
    "cabs-count-concepts": "count_concepts.py",
    "cabs-bench-selection": "bench_selection.py",
    "cabs-bench-pipeline": "bench_pipeline.py",
    "cabs-bench-tagging": "bench_tagging.py",
}

#: Layers of docs/design.md#import-layering: a unit imports only units of lower layers.
LAYERS = {
    "choices": 0,
    "concepts": 0,
    "_internals": 0,
    "selection": 0,
    "decode": 0,
    "metrics": 0,
    "runlog": 0,
    "dataset": 1,
    "tagging": 1,
    "config": 1,
    "storage": 1,
    "algorithm": 2,
    "model": 2,
    "report": 2,
    "runs": 2,
    "converter": 2,
    "callbacks": 3,
    "evaluation": 3,
    "cli": 3,
    "bench": 3,
    "train": 4,
    "benchmark": 5,
}
#: Whole modules whose functions must stay short (docs/design.md#the-converter).
SHORT_FUNCTIONS = ("converter", "cli", "algorithm.py")
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, anywhere in it (functions and TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cabs_streaming"):
            module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                exists = (ROOT / (candidate.replace(".", "/") + ".py")).is_file() or (
                    ROOT / candidate.replace(".", "/") / "__init__.py"
                ).is_file()
                found.add(candidate if exists else module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cabs_streaming")}
    return found


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path) - {_module_name(path)}
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "__init__.py"  # the lazy public API names everything, imports none
    }


def _unit(module: str) -> str:
    return module.split(".")[1]


# ------------------------------------------------------------------------------- public API


def test_the_public_api_resolves_every_name_it_lists() -> None:
    assert cabs_streaming.__all__ == sorted(cabs_streaming._EXPORTS)
    for name in cabs_streaming.__all__:
        value = getattr(cabs_streaming, name)
        assert getattr(value, "__name__", name) == name or name == "POLICIES", name
    from cabs_streaming import ConceptAwareBatchSampling, ConceptStreamingDataset, convert, select

    assert convert.__module__ == "cabs_streaming.converter.api"
    assert (ConceptStreamingDataset.__module__, ConceptAwareBatchSampling.__module__) == (
        "cabs_streaming.dataset",
        "cabs_streaming.algorithm",
    )
    assert callable(select)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        cabs_streaming.Nope  # noqa: B018


def test_the_readme_shows_the_public_api() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Public API") :]
    section = section[: section.index("\n## ", 1)]
    for name in cabs_streaming.__all__:
        assert f"`{name}`" in section, name


def test_importing_the_package_and_the_recipe_checks_loads_no_heavy_stack() -> None:
    """``import cabs_streaming`` and ``cabs_streaming.config`` stay cheap (design: fail early)."""
    code = (
        "import sys, cabs_streaming, cabs_streaming.config, cabs_streaming.cli.convert\n"
        "print(sorted({'torch', 'composer', 'open_clip', 'streaming'} & set(sys.modules)))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert run.stdout.strip() == "[]", run.stdout


# ----------------------------------------------------------------------- scripts and tools


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_entry_point_has_its_thin_tool_script(script: str) -> None:
    module, function = SCRIPTS[script].split(":")
    tool = (ROOT / "tools" / TOOLS[script]).read_text(encoding="utf-8")
    assert f"from {module} import {function}" in tool
    code = [line for line in tool.splitlines() if line and not line.startswith(("#", " "))]
    assert len(tool.splitlines()) <= 25 and len(code) <= 8, TOOLS[script]


@pytest.mark.parametrize(
    "script", ["cabs-convert", "cabs-tag", "cabs-report", "cabs-count-concepts"]
)
def test_an_entry_point_and_its_tool_print_the_same_help(script: str) -> None:
    module, function = SCRIPTS[script].split(":")
    via_entry = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from {module} import {function}; sys.exit({function}())",
            "--help",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    via_tool = subprocess.run(
        [sys.executable, str(ROOT / "tools" / TOOLS[script]), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert via_entry == via_tool and f"usage: {script}" in via_entry


def test_nothing_edits_sys_path() -> None:
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tools").glob("*.py"), ROOT / "train.py"]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=", text), path


# ---------------------------------------------------------------------------------- layering


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            cycle = path[path.index(module) :] + [module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if state.get(module) == 2 or module not in graph:
            return
        state[module] = 1
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_imports_point_down_the_layers() -> None:
    units = {_unit(m) for m in _graph()}
    assert units == set(LAYERS), "give every new module a layer in LAYERS"
    for module, deps in _graph().items():
        for dep in deps:
            if _unit(dep) != _unit(module):
                assert LAYERS[_unit(dep)] < LAYERS[_unit(module)], f"{module} imports {dep}"


def test_the_selection_engine_imports_neither_torch_nor_composer() -> None:
    for path in (PACKAGE / "selection").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        roots = {
            (node.module or "").split(".")[0]
            if isinstance(node, ast.ImportFrom)
            else alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert not roots & {"torch", "composer", "streaming", "open_clip"}, path


def test_functions_of_the_converter_algorithm_and_commands_stay_short() -> None:
    paths: list[Path] = []
    for name in SHORT_FUNCTIONS:
        target = PACKAGE / name
        paths += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                length = node.end_lineno - body[0].lineno + 1 if body else 0
                assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}"


# --------------------------------------------------------------------------------- citations


def test_every_citation_of_the_design_points_inside_the_repository() -> None:
    """Code cites docs/*.md by path; every cited anchor exists; nothing cites a file outside."""
    anchors = {
        doc.name: {
            re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", doc.read_text(encoding="utf-8"), re.M)
        }
        | set(re.findall(r'<a id="([\w-]+)"', doc.read_text(encoding="utf-8")))
        for doc in (ROOT / "docs").glob("*.md")
    }
    files = [
        *PACKAGE.rglob("*.py"),
        *(ROOT / "tools").glob("*.py"),
        *(ROOT / "tests").glob("*.py"),
        ROOT / "pyproject.toml",
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
    for path in files:
        if path == Path(__file__):
            continue  # names the seeds it forbids
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"ARCHITECTURE\.md|CABS_SPEC|MOSAIC_NOTES|/work/shared", text), path
        for doc, anchor in re.findall(r"docs/(\w+\.md)#([\w-]+)", text):
            assert anchor in anchors.get(doc, set()), f"{path}: docs/{doc}#{anchor}"
        for doc, anchor in re.findall(r"\]\((\w+\.md)#([\w-]+)\)", text):
            assert anchor in anchors.get(doc, set()), f"{path}: {doc}#{anchor}"
