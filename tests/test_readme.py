"""README stays true: its links resolve, its Python snippets parse, its commands exist."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_relative_links_resolve() -> None:
    for doc in (ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "deploy" / "README.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_python_snippets_parse() -> None:
    snippets = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert snippets
    for code in snippets:
        # Top-level `async with` / `await` appear in the async example; parse it inside a coroutine.
        ast.parse("async def _():\n" + "\n".join("    " + line for line in code.splitlines()))


def test_documented_commands_are_entry_points_or_make_targets() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    makefile = (ROOT / "Makefile").read_text()
    for command in ("make demo", "make test"):
        assert command in README and f"{command.split()[1]}:" in makefile
    for name in ("edge-client", "vqa-gateway", "vqa-worker", "alignedvq"):
        assert name in scripts and f"{name} " in README
