"""Node.js and the JavaScript client's dev dependencies, for the tests that run js/.

`make test` installs both (`make js-deps`); in CI (``CI`` set) a missing one is a failure,
never a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "js"
NODE = shutil.which("node")


def require_node() -> str:
    """The node binary, with js/'s dev dependencies installed."""
    missing = None
    if NODE is None:
        missing = "node (Node.js 18+) is not installed: run `make js-deps`"
    elif not (JS / "node_modules" / "ws" / "package.json").is_file():
        missing = "js/node_modules is missing: run `make js-deps` (npm ci in js/)"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    assert NODE is not None
    return NODE
