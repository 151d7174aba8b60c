"""Paste the measured tables into the README: each ``<!-- table:NAME -->`` …
``<!-- /table -->`` block gets the Markdown table (and the line above it) of
benchmarks/results/NAME.md, which the command that measured it wrote.

    .venv/bin/python scripts/readme_tables.py          # rewrite README.md
    .venv/bin/python scripts/readme_tables.py --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table:([\w.-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def result_table(name: str) -> str:
    """The table of a results file, with its caption (the text before it)."""
    path = ROOT / "benchmarks" / "results" / f"{name}.md"
    if not path.is_file():
        return f"(not measured yet: run the command that writes {path.relative_to(ROOT)})\n"
    return path.read_text(encoding="utf-8").strip() + "\n"


def render(readme: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + result_table(m.group(2)) + m.group(4), readme)


def main() -> int:
    path = ROOT / "README.md"
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in sys.argv[1:]:
        if new != text:
            print("README.md's tables differ from benchmarks/results: run "
                  "scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    print("README.md: tables " + ("rewritten" if new != text else "up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
