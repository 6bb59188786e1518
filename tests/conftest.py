"""Shared fixtures: one local Ray instance per test session (ray.init costs ~5 s here)."""

from __future__ import annotations

import os

import pytest

# The hooks that write RELIABILITY.md from the tests marked `reliability` (see that module).
from reliability_report import pytest_configure, pytest_runtest_makereport, pytest_sessionfinish  # noqa: F401

# clusterlab joins the cluster in $RAY_ADDRESS (Ray's convention): the tests, and the commands
# they start, must never attach to a cluster the shell running them happens to name.
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session", autouse=True)
def baseline_cache(tmp_path_factory):
    """The pixel baselines' cache (eval/baselines.py) in a folder of the session, shared with the
    commands the tests start: nothing written to ~/.cache, each images' baselines computed once."""
    os.environ["CLUSTERLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("clusterlab-cache"))
    yield os.environ["CLUSTERLAB_CACHE_DIR"]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # A private local instance (never a stray cluster); logical CPUs above the 2 physical
    # cores avoid Train placement-group starvation (DESIGN.md).
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1))
    yield ray
    ray.shutdown()


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("CLUSTERLAB_TRACKING_URI", uri)
    return uri
