"""Methods: model parts on top of the backbone, views, and named loss terms.

A method registers itself under its config name; the platform looks it up here. The
training loop, distribution, precision, checkpointing and logging are not the method's
business (they live in ``clusterlab.platform``).
"""

from clusterlab.trainers.base import METHODS, Method, build_method, register
from clusterlab.trainers import mixem, simclr  # noqa: F401  (register "mixem", "simclr")

__all__ = ["METHODS", "Method", "build_method", "register"]
