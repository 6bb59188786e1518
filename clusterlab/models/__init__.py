"""Backbones and heads; plain PyTorch, no Ray or MLflow."""

from clusterlab.models.backbones import build_backbone, macro_blocks
from clusterlab.models.heads import ProjectionHead

__all__ = ["build_backbone", "macro_blocks", "ProjectionHead"]
