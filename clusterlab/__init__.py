"""clusterlab: deep clustering experiments from a laptop to a Ray cluster, tracked in MLflow.

The Python API (:mod:`clusterlab.api`: ``load_features``, ``evaluate_features``,
``batched_kmeans``, ``sweep_results``, ``draw_heatmap``, ``write_features``) is importable from
here. It is loaded on first access (PEP 562), so ``import clusterlab`` and the CLI's config
commands import neither torch, Ray nor MLflow.
"""

__version__ = "0.1.0"

_API = ("batched_kmeans", "draw_heatmap", "evaluate_features", "load_features", "sweep_results", "write_features")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    if name in _API:
        from clusterlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'clusterlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
