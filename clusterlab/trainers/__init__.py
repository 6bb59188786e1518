"""Methods: model parts on top of the backbone, views, and named loss terms.

A method registers itself under its config name; the platform looks it up here. The
training loop, distribution, precision, checkpointing and logging are not the method's
business (they live in ``clusterlab.platform``).
"""

from clusterlab.trainers.base import METHODS, DataMeta, Method, build_method, register
from clusterlab.trainers import excb, lsdc, mixem, rotnet, simclr  # noqa: F401  (register the methods)

__all__ = ["METHODS", "DataMeta", "Method", "build_method", "register"]
