"""Shared fixtures: the built-in tiny model and sample data, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never talk to a hub or to wandb's servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ftune_home(tmp_path_factory) -> Path:
    """FTUNE_HOME for the whole session (the built-in model and data are built here once).

    CI points FTUNE_HOME at a cache directory so the build is shared by every test module.
    """
    home = os.environ.get("FTUNE_HOME")
    if not home:
        home = str(tmp_path_factory.mktemp("ftune_home"))
        os.environ["FTUNE_HOME"] = home
    return Path(home)


@pytest.fixture(scope="session")
def tiny_model_dir(ftune_home) -> Path:
    """Directory of the built-in tiny Llama model and tokenizer (HF format)."""
    from ftune.builtin_assets import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def sample_data_path(ftune_home) -> Path:
    """The built-in sample instruction dataset (alpaca JSONL)."""
    from ftune.builtin_assets import ensure_sample_dataset

    return ensure_sample_dataset()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, loaded through AutoTokenizer like any hub model's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
