"""The repository stands on its own: no file of the project points to a path outside it (issue 14).

Facts the code relies on are documented in `docs/`, with their public sources; a path such as a machine-local
folder would mean nothing in a clone. Scans every text file git knows under the project's folders (tracked, plus
new files not ignored, so docs not yet committed count too) for the patterns in FORBIDDEN. This file is left out
by its own name, since it is about the patterns.
"""

from __future__ import annotations

import ast
import graphlib
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("diffa2", "tests", "bench", "demo", "stages", "data_recipes", "docs", "README.md", "Makefile")
FORBIDDEN = ("/" + "work/", ".." + "/shared")  # spelled in pieces, so a grep for them finds nothing here
FORMATTER_MARKER = "# fmt" + ": skip"  # the project does not run a formatter, so the markers would only be noise
MAX_LINES = 450  # one job per module: a longer Python file should be split (issue 14)
SELF = Path(__file__).name
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target): inline links, the only kind the docs use
CODE = re.compile(r"^```.*?^```|`[^`\n]*`", re.MULTILINE | re.DOTALL)  # fenced blocks and code spans hold no links
EXTERNAL = ("http://", "https://", "mailto:", "#")


def project_files() -> list[Path]:
    """Files under SCANNED as git lists them; without git (an unpacked archive), every file found there."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *SCANNED],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout
        paths = {ROOT / name for name in listing.decode("utf-8").split("\0") if name}
    except (OSError, subprocess.CalledProcessError):
        paths = set()
        for top in SCANNED:
            start = ROOT / top
            if start.is_file():
                paths.add(start)
            for folder, dirs, files in os.walk(start):
                dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
                paths.update(Path(folder) / f for f in files)
    return sorted(p for p in paths if p.is_file() and p.name != SELF)


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (one holding a NUL byte)."""
    data = path.read_bytes()
    return None if b"\0" in data else data.decode("utf-8", errors="replace")


def test_scan_covers_the_project():
    names = {p.relative_to(ROOT).as_posix() for p in project_files()}
    assert {"README.md", "diffa2/__init__.py", "docs/index.md"} <= names
    assert f"tests/{SELF}" not in names


def test_no_file_points_outside_the_repository():
    hits = []
    for path in project_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if any(pattern in line for pattern in FORBIDDEN):
                hits.append(f"{path.relative_to(ROOT).as_posix()}:{number}: {line.strip()[:160]}")
    assert not hits, "paths outside the repository (cite docs/ or the public source instead):\n" + "\n".join(hits)


def python_files() -> list[Path]:
    return [p for p in project_files() if p.suffix == ".py"]


def test_no_formatter_markers():
    hits = [p.relative_to(ROOT).as_posix() for p in python_files() if FORMATTER_MARKER in p.read_text()]
    assert not hits, f"{FORMATTER_MARKER!r} in {hits}: the project has no formatter; lay the code out by hand"


def test_no_python_file_over_the_line_budget():
    lines = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in python_files()}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"


def markdown_pages() -> list[Path]:
    """The pages a reader follows links through: the README and every page of docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The targets of the page's relative links, without their #fragment, code left out."""
    prose = CODE.sub("", page.read_text(encoding="utf-8"))
    targets = (match.group(1) for match in MARKDOWN_LINK.finditer(prose))
    return [t.split("#", 1)[0] for t in targets if not t.startswith(EXTERNAL)]


def test_link_extraction_skips_code_and_external_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md#two) [b](https://x.org/b.md) [c](#top) `[d](d.md)`\n"
                    "```\n[e](e.md)\n```\n[f](../f.md)\n")
    assert relative_links(page) == ["docs/a.md", "../f.md"]


def test_every_relative_link_in_the_docs_resolves():
    broken = [f"{page.relative_to(ROOT).as_posix()}: {target}" for page in markdown_pages()
              for target in relative_links(page) if not (page.parent / target).exists()]
    assert not broken, "relative links to files that do not exist:\n" + "\n".join(broken)


def test_index_links_every_docs_page():
    index = ROOT / "docs" / "index.md"
    linked = {(index.parent / target).resolve() for target in relative_links(index)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p != index and p.resolve() not in linked]
    assert not missing, f"docs pages not listed in docs/index.md (add one row each): {missing}"


# -- the import graph ------------------------------------------------------------------------------------------
# Units are diffa2's top-level modules and subpackages. Data flows one way (audio/chat -> modeling -> diffusion ->
# inference -> stages/eval/serve/demo); `rl` is a torch-only library another project can vendor unchanged.


def unit_imports() -> dict[str, set[str]]:
    """For each unit of the diffa2 package, the other units its modules import (function-level imports included)."""
    package = ROOT / "diffa2"
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = parts[:-1] if parts[-1] == "__init__" else parts
        unit = module[1] if len(module) > 1 else "__init__"
        targets = graph.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = list(module if path.name == "__init__.py" else module[:-1])
                if node.level:
                    base = base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                    names = [".".join(base)]
                else:
                    names = [node.module or ""]
            else:
                continue
            for name in names:
                pieces = name.split(".")
                if pieces[0] == "diffa2" and len(pieces) > 1 and pieces[1] != unit:
                    targets.add(pieces[1])
    return graph


def test_the_import_graph_of_the_package_has_no_cycle():
    graph = unit_imports()
    assert {"audio", "chat", "modeling", "diffusion", "rl", "stages", "eval", "serve", "demo"} <= graph.keys()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle between diffa2 units: {err.args[1]}") from None
    assert order.index("modeling") < order.index("diffusion") < order.index("inference") < order.index("serve")


def test_the_rl_library_imports_nothing_else_from_diffa2():
    assert unit_imports()["rl"] == set()
