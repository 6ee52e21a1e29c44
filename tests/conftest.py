"""Shared fixtures: paths to the data the tests may read."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.settings import default_cache_dir, load_settings


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return default_cache_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return load_settings().data.goemotions_dir
