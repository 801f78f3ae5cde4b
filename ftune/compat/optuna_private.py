"""Optuna internals ftune relies on, each wrapped once (tested in test_compat)."""

from __future__ import annotations

from typing import Any

RDB_STORAGE_URL = "url"
"""The key of ``optuna.storages.RDBStorage``'s pickled state that holds the database URL."""


def rdb_storage_state_with_url(state: dict[str, Any], url: str) -> dict[str, Any]:
    """An ``RDBStorage``'s pickled ``state`` pointing at the database ``url`` instead (for ``__setstate__``)."""
    return {**state, RDB_STORAGE_URL: url}


def optuna_search_trials(search: Any) -> dict[str, Any]:
    """Ray Tune's ``OptunaSearch``: its Tune trial id -> ``optuna.Trial`` map (``_ot_trials``), live."""
    return search._ot_trials


def optuna_search_study(search: Any) -> Any:
    """Ray Tune's ``OptunaSearch``: the ``optuna.Study`` it asks and tells (``_ot_study``)."""
    return search._ot_study


def live_trial(study: Any, number: int) -> Any:
    """The study's trial ``number`` as a live ``optuna.Trial`` (what ``study.ask()`` returns for a new one), to
    report and tell on; Optuna's public API hands out live trials only for new ones."""
    import optuna

    storage = study._storage
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
