"""Evaluation: feature extraction, clustering and metrics (plain PyTorch / NumPy)."""
