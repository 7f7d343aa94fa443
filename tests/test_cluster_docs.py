"""The configs of docs/cluster.md's three-node example are valid, and form one cluster."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from heartbeatd.config import parse_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "cluster.md"


def test_three_node_example_configs_are_valid_and_distinct() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    # The three nodes on one Redis server (the Sentinel example has a block of its own).
    configs = [parse_config(yaml.safe_load(block)) for block in blocks]
    configs = [c for c in configs if c.cluster.redis]
    assert len(configs) == 3
    assert len({c.cluster.node_id for c in configs}) == 3
    assert len({c.listen for c in configs}) == 3
    assert len({c.admin.listen for c in configs}) == 3
    assert len({c.cluster.redis for c in configs}) == 1
