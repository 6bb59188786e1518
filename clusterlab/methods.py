"""What each method declares to the platform, without importing torch.

A :class:`MethodSpec` names a method's loss terms and their default weights (the names
``loss.weights`` accepts), the statistics it reports every epoch, the readings its evaluation
adds beyond K-means on the representation, the metric a sweep's heatmap shows, its config
section (the only one its runs log as params) and its checks against the data. The config, the
search spaces, the sweep, the training driver and the CLI ask the spec instead of branching on
the method's name; the torch part of the method (``clusterlab.trainers``) registers under the
same name and reads its loss terms from here.

Adding a method: its spec here, its module in ``clusterlab/trainers/`` (``@register(name)``) and
its presets in ``clusterlab/config.py``; nothing in ``clusterlab/platform/`` or the CLI. A method
kept outside the package registers its spec with :func:`register_spec` (naming its ``module``)
in every process that may build it, e.g. from a ``sitecustomize`` (tests/test_methods.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clusterlab.config import ExperimentConfig

#: ACC / NMI / ARI: what every clustering reading logs under its prefix
SCORES = ("acc", "nmi", "ari")
#: the readings every method's evaluation logs (label for result tables, metric prefix); UMAP +
#: K-means on the representation with eval.embedding_baselines (N2D's reading)
COMMON_READINGS = (("K-means, L2-normalised representations", "kmeans_norm"),
                   ("K-means, raw representations", "kmeans_raw"),
                   ("UMAP + K-means, L2-normalised repr.", "umap_kmeans"))
#: the baselines on the raw pixels of the same images, the reference rows of every table: K-means
#: (eval.raw_pixels_baseline), UMAP / t-SNE + K-means (eval.embedding_baselines; eval/baselines.py)
PIXELS_READINGS = (("K-means on raw pixels", "pixels"),
                   ("UMAP (10-d) + K-means on raw pixels", "pixels_umap"),
                   ("t-SNE (2-d) + K-means on raw pixels", "pixels_tsne"))
#: every metric the training loop reports per epoch, whatever the method
COMMON_EPOCH_METRICS = frozenset({"train_loss", "val_loss", "lr", "epoch_seconds", "images_per_second"})

#: the cluster head's readings (LSD-C Sec. 4 and supplementary Sec. 2, ExCB): argmax ACC / NMI /
#: ARI, the confident-sample accuracy and share, and the cluster-size distribution
HEAD_METRICS = frozenset({f"head_{m}" for m in (*SCORES, "confident_acc", "confident_share", "empty_clusters",
                                                "largest_relative_size")})
HEAD_READING = ("cluster head, argmax (LSD-C, ExCB)", "head")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    #: the named loss terms the method's forward returns, in logging order
    loss_terms: tuple[str, ...]
    #: the weight of each term unless ``loss.weights`` sets it
    default_weights: Mapping[str, float]
    #: statistics the method reports every epoch besides the losses
    epoch_stats: tuple[str, ...] = ()
    #: per-epoch readings of the training steps against the class labels, where the training
    #: split has them (``Method.label_diagnostics``): to see why a method falls short, so not in
    #: :meth:`epoch_metrics`, and a sweep can never schedule or choose by them
    label_diagnostics: tuple[str, ...] = ()
    #: evaluation readings beyond K-means on the representation: (label, metric prefix)
    readings: tuple[tuple[str, str], ...] = ()
    #: metrics those readings log beyond ``<prefix>_{acc,nmi,ari}``
    extra_reading_metrics: frozenset[str] = frozenset()
    #: the clustering accuracy a sweep's heatmap shows and reports compare
    headline_metric: str = "kmeans_norm_acc"
    #: the method's own config section (a field of ExperimentConfig), if it has one
    config_section: str | None = None
    #: raises ConfigError when the data cannot serve the method: (config, split sizes)
    check_data: Callable[[ExperimentConfig, Mapping[str, int]], None] | None = field(default=None, compare=False)
    #: raises ValueError (naming the field) for a combination of settings the method cannot run
    check_config: Callable[[ExperimentConfig], None] | None = field(default=None, compare=False)
    #: ``optim.weight_decay`` when no layer sets it (None: config.DEFAULT_WEIGHT_DECAY)
    weight_decay: Callable[[ExperimentConfig], float] | None = field(default=None, compare=False)
    #: the module whose import registers the torch implementation (``@register(name)``), for a
    #: method kept outside ``clusterlab/trainers/`` (see :attr:`implementation`)
    module: str | None = None

    @property
    def implementation(self) -> str:
        """The module imported, on first use and in whichever process builds the model, to
        register the method's torch implementation: ``module``, else ``clusterlab.trainers.<name>``."""
        return self.module or f"clusterlab.trainers.{self.name}"

    def epoch_metrics(self) -> set[str]:
        """Every metric the training loop reports per epoch for this method (Tune can schedule on these)."""
        return set(COMMON_EPOCH_METRICS) | {f"train_loss_{t}" for t in self.loss_terms} | set(self.epoch_stats)

    def final_metrics(self) -> set[str]:
        """The scores the evaluation at the end of a run logs (a sweep can pick its best trial by these)."""
        return ({f"{prefix}_{s}" for _, prefix in _table_rows(self.readings) for s in SCORES}
                | set(self.extra_reading_metrics))


SPECS: dict[str, MethodSpec] = {}


def register_spec(spec: MethodSpec) -> MethodSpec:
    """Add a method's spec under its name (a test may register a toy method)."""
    if spec.name in SPECS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    SPECS[spec.name] = spec
    return spec


def spec_for(name: str) -> MethodSpec:
    """The spec of a registered method, or ValueError naming the allowed ones."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(sorted(SPECS))}") from None


def result_rows(methods: list[str] | None = None) -> list[tuple[str, str]]:
    """The rows of a result table, (label, metric prefix): K-means, the readings of ``methods``
    (default: every method), then raw pixels."""
    specs = [spec_for(m) for m in methods] if methods is not None else list(SPECS.values())
    return _table_rows(dict.fromkeys(r for spec in specs for r in spec.readings))


def _table_rows(readings: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every evaluation's readings in table order: K-means (and UMAP + K-means) on the
    representation, ``readings``, the baselines on the raw pixels."""
    return [*COMMON_READINGS, *readings, *PIXELS_READINGS]


def lsdc_weight_decay(cfg: ExperimentConfig) -> float:
    """5e-4 (LSD-C main paper Sec. 4: SGD, every dataset but Reuters), and 1e-4 with MixUp as the
    composition (supplementary Sec. 1: "we have to decrease the weight decay to 1e-4 to make
    MixUp work")."""
    return 1e-4 if cfg.lsdc.composition == "mixup" else 5e-4


def _excb_local_crops_fit_the_backbone(cfg: ExperimentConfig) -> None:
    if cfg.model.backbone == "iic_vgg4" and cfg.excb.local_crops:
        raise ValueError("excb.local_crops: model.backbone 'iic_vgg4' flattens its last feature map, so it takes one "
                         "image size only and cannot embed ExCB's smaller local crops; set excb.local_crops=0 or "
                         "another backbone")


def _excb_has_images_for_its_centroids(cfg: ExperimentConfig, sizes: Mapping[str, int]) -> None:
    """ExCB seeds its K centroids with K-means on up to ``excb.centroid_init_samples`` training
    images (the released code's initialisation), which needs at least K images."""
    from clusterlab.config import ConfigError

    excb = cfg.excb
    if excb.centroid_init != "kmeans":
        return
    k, n = excb.num_clusters or sizes["num_classes"], min(sizes["train"], excb.centroid_init_samples)
    if k > n:
        raise ConfigError(f"excb.num_clusters: K-means centroid initialisation needs at least K = {k} images but "
                          f"has {n} (training set {sizes['train']}, excb.centroid_init_samples "
                          f"{excb.centroid_init_samples}); lower excb.num_clusters or set excb.centroid_init=random")


register_spec(MethodSpec("simclr", loss_terms=("contrast",), default_weights={"contrast": 1.0}))
register_spec(MethodSpec(
    "mixem",
    # MIX'EM Eq. 9: the contrastive loss (unweighted) plus the four mixture terms, lambda_1..lambda_4;
    # the defaults are supplementary Table 1's STL10 row
    loss_terms=("contrast", "comp_ent", "inst_ent", "push", "pull"),
    default_weights={"contrast": 1.0, "comp_ent": 1.0, "inst_ent": 0.1, "push": 0.05, "pull": 0.1},
    epoch_stats=("component_entropy", "nonempty_components"),
    # MIX'EM Table 1: the dominant component ("Max Comp") and K-means initialised by the mixture
    readings=(("MIX'EM dominant component (Max Comp)", "maxcomp"), ("K-means initialised by MIX'EM", "kmeans_mixinit")),
    headline_metric="kmeans_mixinit_acc",  # MIX'EM Table 1 row 6
    config_section="mixem",
))
register_spec(MethodSpec("rotnet", loss_terms=("rotation",), default_weights={"rotation": 1.0},
                         epoch_stats=("rotation_acc",)))
register_spec(MethodSpec(
    "lsdc",
    loss_terms=("clustering", "consistency"),  # LSD-C Eq. 7 and the ramped-up consistency of Eq. 8
    default_weights={"clustering": 1.0, "consistency": 1.0},
    epoch_stats=("rampup_weight", "adjacency_density"),
    label_diagnostics=("pseudo_label_precision", "pseudo_label_recall"),
    readings=(HEAD_READING,),
    extra_reading_metrics=HEAD_METRICS,
    headline_metric="head_acc",  # LSD-C Tables 2-4 report the head's clusters
    config_section="lsdc",
    weight_decay=lsdc_weight_decay,
))
register_spec(MethodSpec(
    "excb",
    loss_terms=("projector", "predictor"),
    default_weights={"projector": 0.5, "predictor": 0.5},  # ExCB Algorithm 1: 0.5 loss_h + 0.5 loss_g
    epoch_stats=("teacher_momentum", "empty_clusters", "largest_cluster"),
    readings=(HEAD_READING,),
    extra_reading_metrics=HEAD_METRICS,
    headline_metric="head_acc",
    config_section="excb",
    check_data=_excb_has_images_for_its_centroids,
    check_config=_excb_local_crops_fit_the_backbone,
))
