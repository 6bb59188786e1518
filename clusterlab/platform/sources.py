"""What ``clusterlab evaluate`` evaluates: an MLflow run's checkpoint, a checkpoint directory,
or a features file. Each source is checked before Ray starts (a missing run or checkpoint, a
features file without the columns evaluation needs, more clusters than samples), then
evaluated with the K-means fan-out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clusterlab.config import ConfigError
from clusterlab.eval.feature_files import read_features
from clusterlab.platform import tracking
from clusterlab.platform.evaluate import EvalResult, check_evaluable, evaluate_checkpoint, evaluate_features
from clusterlab.platform.reeval import EvalOptions, check_run, evaluate_run
from clusterlab.platform.train import init_ray
from clusterlab.trainers.checkpoint import read_checkpoint


@dataclass(frozen=True)
class EvalSource:
    """Exactly one of ``run_id``, ``checkpoint`` or ``features``."""

    run_id: str | None = None
    checkpoint: Path | None = None
    features: Path | None = None
    #: with ``features``: the train split's features, for the linear probe
    train_features: Path | None = None
    #: with ``checkpoint``: where its features are written or reused (default: beside it)
    features_dir: Path | None = None
    #: with ``run_id``: the tracking store (default: $CLUSTERLAB_TRACKING_URI or ./mlflow.db)
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("run_id", "checkpoint", "features") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"evaluate: give exactly one of --run-id, --checkpoint, --features (got {given or 'none'})")
        if self.train_features is not None and self.features is None:
            raise ConfigError("evaluate: --train-features goes with --features (a run or checkpoint is probed on "
                              "its own train split)")
        if self.features_dir is not None and self.checkpoint is None:
            raise ConfigError("evaluate: --features-dir goes with --checkpoint (a run's features are its artifacts, "
                              "a features file is read where it is)")


def evaluate_source(source: EvalSource, options: EvalOptions, address: str | None = None, device: str | None = None,
                    tasks: int | None = None) -> EvalResult:
    """Check ``source``, start or join Ray, evaluate. A run's evaluation is logged to it under
    ``eval/<options.version>/``; the others are only returned."""
    try:
        if source.features is not None:
            test = read_features(source.features)
            train = read_features(source.train_features) if source.train_features else None
            if options.k is not None and options.k > len(test["label"]):
                raise ConfigError(f"--k: {options.k} clusters cannot be formed from the {len(test['label'])} samples "
                                  f"of {source.features}; use --k <= {len(test['label'])}")
            check_evaluable(test, options.k, str(source.features))
            init_ray(address)
            return evaluate_features(test, options.k, n_init=options.n_init, seed=options.seed, tasks=tasks,
                                     device=device, train=train, plots=options.plots)
        if source.run_id is not None:
            client = tracking.connect(tracking.resolve_tracking_uri(source.tracking_uri), existing=True)
            check_run(client, source.run_id)
            init_ray(address)
            return evaluate_run(client, source.run_id, options, device=device, tasks=tasks, progress=True)
        checkpoint = Path(source.checkpoint)
        read_checkpoint(checkpoint)  # a missing or unreadable checkpoint is refused before Ray starts
        features_dir = source.features_dir or checkpoint.parent / "features" / checkpoint.name
        init_ray(address)
        return evaluate_checkpoint(checkpoint, features_dir, n_init=options.n_init, k=options.k, tasks=tasks,
                                   device=device, seed=options.seed, plots=options.plots)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
