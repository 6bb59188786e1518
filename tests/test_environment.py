"""package_versions(): what each run logs about its environment."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import tomllib

from test_cluster_configs import ROOT, canonical, lock_pins

from clusterlab import environment
from clusterlab.environment import NOT_INSTALLED, package_versions


def direct_dependencies() -> list[str]:
    """The names of pyproject.toml's (non-dev) dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [re.match(r"[A-Za-z0-9][\w.-]*", d).group(0) for d in deps]


def test_versions_are_the_installed_ones():
    versions = package_versions()
    names = direct_dependencies()
    assert set(versions) == {"python", "clusterlab", "torch.version.cuda", *names}, "dev extras (pytest) are not logged"
    assert versions["python"] == platform.python_version()
    for name in ["clusterlab", *names]:
        assert versions[name] == importlib.metadata.version(name), name


def test_torch_cuda_is_torchs_own():
    """Read from torch/version.py without importing torch, it must say what torch says."""
    import torch

    assert package_versions()["torch.version.cuda"] == (torch.version.cuda or "none")


def test_this_environment_runs_the_locked_versions():
    """`make` installs with -c constraints.txt, so a run here logs the lock's versions (a +cuXYZ
    label, as the image's torch has, does not count: ==2.14.1 admits 2.14.1+cu126)."""
    pins = lock_pins()
    for name, version in package_versions().items():
        if canonical(name) in pins:
            assert version.split("+")[0] == pins[canonical(name)], f"{name} {version}, constraints.txt pins {pins[canonical(name)]}"


def test_a_missing_dependency_does_not_fail_the_run(monkeypatch):
    monkeypatch.setattr(environment.importlib.metadata, "requires", lambda _: ["no-such-package>=1"])
    assert package_versions()["no-such-package"] == NOT_INSTALLED
