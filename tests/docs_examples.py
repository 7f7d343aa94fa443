"""The code blocks of README.md and docs/*.md, by name, for the tests that run them.

A fenced ``python`` block must follow, on the line just above its fence, a marker naming it::

    <!-- test: readme-handler -->
    ```python
    ...
    ```

The marker is an HTML comment, so it does not show when the page is rendered.  Each name is
unique across README.md and docs/, and `tests/test_docs.py` runs every named block (a block
without a marker, or a name nothing runs, fails there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- test: ([a-z0-9][a-z0-9-]*) -->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str
    marker: str | None  # the name on the line above the fence, if any
    code: str

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    """Every fenced block of the pages, in order."""
    found = []
    for page in pages:
        lines = page.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            opening = FENCE.match(lines[i])
            if opening is None:
                i += 1
                continue
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: unclosed code block")
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            found.append(
                Block(
                    page=str(page.relative_to(ROOT)),
                    line=i + 1,
                    language=opening.group(1),
                    marker=marker.group(1) if marker else None,
                    code="\n".join(lines[i + 1 : end]) + "\n",
                )
            )
            i = end + 1
    return found


def example(name: str) -> str:
    """The code of the block marked ``<!-- test: name -->``."""
    matches = [b for b in blocks() if b.marker == name]
    assert len(matches) == 1, f"{len(matches)} blocks are marked {name!r}"
    return matches[0].code
