"""Sharding rules in the `where=` language: `treenn.shard`."""

from __future__ import annotations

from typing import Any


def shard(model: Any, mesh: Any, rules: Any) -> Any:
    raise NotImplementedError("treenn.shard is being written (issue 8)")
