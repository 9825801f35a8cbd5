"""The house rules docs/ARCHITECTURE.md states that no linter checks: long modules say
why they are long, at their top."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import rapido

ROOT = Path(rapido.__file__).parent
LONG = 500


def test_every_module_over_500_lines_says_why_at_its_top() -> None:
    silent = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") <= LONG:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not re.search(r"\b\d{3,4} lines\b", doc):
            silent.append(f"{path.relative_to(ROOT.parent)} ({text.count(chr(10))} lines)")
    assert not silent, ("modules over 500 lines without the reason in their docstring (a "
                        "sentence naming its size, 'over 500 lines', and why): "
                        + ", ".join(silent))
