"""The package versions a run actually used, for logging with it.

constraints.txt pins what `make`, CI and the node image install, but a run can still meet other
versions (a hand-made environment, an image built from an older lock, torch's CUDA build that
differs between a laptop and the image): recording them makes two runs comparable after the fact.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re

# Requires-Dist entries: the distribution name, and whether an extra (dev) selects it.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXTRA = re.compile(r";.*\bextra\s*==")
# torch/version.py, as PyTorch's builds write it: `cuda: Optional[str] = '12.6'` (None for CPU
# or ROCm builds).
_TORCH_CUDA = re.compile(r"^cuda\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", re.M)

NOT_INSTALLED = "not installed"


def package_versions() -> dict[str, str]:
    """Installed versions of clusterlab and of its direct (non-dev) dependencies, by the names
    its metadata gives them, plus "python" and "torch.version.cuda" (the CUDA version torch was
    built for, "none" for a build without CUDA).

    Read from the installed distributions' metadata, without importing anything: cheap enough
    for every run, and torch's CUDA build is known even where torch was never imported. A
    missing dependency reads "not installed" rather than failing the run that logs it.
    """
    versions = {"python": platform.python_version(), "clusterlab": importlib.metadata.version("clusterlab")}
    for requirement in importlib.metadata.requires("clusterlab") or []:
        if not _EXTRA.search(requirement):
            name = _NAME.match(requirement).group(0)
            versions[name] = _installed_version(name)
    versions["torch.version.cuda"] = _torch_cuda()
    return versions


def _installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _torch_cuda() -> str:
    """torch.version.cuda, read from torch/version.py: importing torch costs seconds. PyPI's
    wheel carries no +cuXYZ label in its version, so the label cannot say it."""
    try:
        source = importlib.metadata.distribution("torch").locate_file("torch/version.py").read_text()
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError):
        return NOT_INSTALLED
    match = _TORCH_CUDA.search(source)
    return match.group(1) if match else "none"
