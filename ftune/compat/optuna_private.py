"""Optuna internals ftune relies on, each wrapped once (tested in test_compat)."""

from __future__ import annotations

from typing import Any

RDB_STORAGE_URL = "url"
"""The key of ``optuna.storages.RDBStorage``'s pickled state that holds the database URL."""


def rdb_storage_state_with_url(state: dict[str, Any], url: str) -> dict[str, Any]:
    """An ``RDBStorage``'s pickled ``state`` pointing at the database ``url`` instead (for ``__setstate__``)."""
    return {**state, RDB_STORAGE_URL: url}
