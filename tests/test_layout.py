"""README's Layout lists every module of launcher/ and workers/, one line each, and nothing that is gone (#25)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> set[str]:
    """Every module with code of its own (an ``__init__.py`` that only documents or re-exports is its wing's)."""
    found = set()
    for package in ("launcher", "workers"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "__main__.py":
                continue
            defines = any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.parse(path.read_text()).body)
            if path.name == "__init__.py" and (path.parent == ROOT / package or not defines):
                continue
            found.add(path.relative_to(ROOT).as_posix())
    return found


def listed() -> set[str]:
    """``launcher/`` or ``workers/`` opens a section; each ``  path.py  what it holds`` line in it is a module."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```") + 3:]
    found, package = set(), ""
    for line in block[:block.index("```")].splitlines():
        if head := re.match(r"^(launcher|workers)/ ", line):
            package = head.group(1)
        elif line and not line.startswith(" "):
            package = ""
        elif package and (m := re.match(r"^  ([\w/]+\.py) ", line)):
            found.add(f"{package}/{m.group(1)}")
    return found


def test_readme_layout_lists_every_module_once() -> None:
    on_disk, in_readme = modules(), listed()
    assert on_disk - in_readme == set(), "modules missing from README's Layout"
    assert in_readme - on_disk == set(), "README's Layout lists modules that are gone"


def test_no_product_module_over_300_lines_and_no_function_over_60() -> None:
    """#25's budgets: a newcomer reads a module in one sitting and a function on one screen."""
    over = []
    for path in [*(ROOT / "launcher").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        text = path.read_text()
        if text.count("\n") > 300:
            over.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None \
                    and node.end_lineno - node.lineno + 1 > 60:
                over.append(f"{path.relative_to(ROOT)}: {node.name}() {node.end_lineno - node.lineno + 1} lines")
    assert over == []
