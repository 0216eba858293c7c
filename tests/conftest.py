"""Shared test policy: under CI=true a missing prerequisite fails the run instead of skipping."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, why: str) -> None:
    """Skip locally when a prerequisite is missing; fail under CI, where nothing may skip."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI=true: {why}", pytrace=False)
    pytest.skip(why)
