"""clusterlab: deep clustering experiments from a laptop to a Ray cluster, tracked in MLflow."""

__version__ = "0.1.0"
