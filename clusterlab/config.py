"""Typed, validated experiment configuration.

One :class:`ExperimentConfig` describes a whole experiment: method, data + protocol, model,
optimiser + schedule, augmentation, loss, evaluation, tracking and resources. It is built in
layers, each overriding the one before::

    field defaults  <  preset (method x dataset, paper values)  <  YAML file  <  key=value overrides

Every layer is validated at construction (pydantic, unknown keys forbidden), so a bad field
fails here, naming the field and the allowed values, before Ray or MLflow start.
"""

from __future__ import annotations

import copy
import json
import re
import reprlib
from collections.abc import Hashable
from datetime import datetime
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Mapping, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DatasetName = Literal["cifar10", "cifar100_20", "stl10", "imagefolder", "digits", "mnist"]
Protocol = Literal["train", "train+test", "train+unlabeled"]


#: names that become directories, MLflow filter literals and file names: no quotes, slashes or dots first
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
MAX_RUN_NAME = 100
MAX_SEED = 2**32 - 1  # seeds are 32 bits: what numpy's and Python's generators take


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the field and how to fix it."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class DataConfig(StrictModel):
    """Dataset, protocol and splits (MIX'EM Sec. 5.4 / Table 4; supplementary 1.3)."""

    name: DatasetName = "digits"
    root: Path | None = Field(None, description="directory holding the dataset folders (--data-root)")
    protocol: Protocol = Field(
        "train+test",
        description="splits that train; evaluation is on `test` (MIX'EM Table 4) or every labelled split (eval.split)",
    )
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="held-out share of the training pool for the validation loss"
    )
    image_size: int | None = Field(None, ge=8, description="served image size; None = dataset default")
    download: bool = Field(False, description="download missing files (needs internet); never implicit")
    limit: int | None = Field(None, ge=1, description="use only the first N images of every split (a smoke test, "
                              "a quick look); null = all")

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, v: Path | None) -> Path | None:
        """A relative root is taken from where the command runs (Ray Train workers run in
        another directory); ``~`` is left for each node to expand to its own HOME."""
        return v if v is None or str(v).startswith("~") else v.absolute()


class AugmentConfig(StrictModel):
    """SimCLR augmentation as in MIX'EM supplementary 1.2, applied per sample on whole batches."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    jitter: tuple[float, float, float, float] = Field(
        (0.8, 0.8, 0.8, 0.2), description="brightness, contrast, saturation, hue"
    )
    jitter_p: float = Field(0.8, ge=0.0, le=1.0)
    grayscale_p: float = Field(0.2, ge=0.0, le=1.0)
    blur_kernel: int | None = Field(
        None, description="odd kernel size; None = 3 for <= 64 px, 9 for larger (supplementary 1.2)"
    )
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("crop_scale")
    @classmethod
    def _scale_in_unit_interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("needs 0 < low <= high <= 1")
        return v

    @field_validator("blur_kernel")
    @classmethod
    def _odd_kernel(cls, v: int | None) -> int | None:
        if v is not None and (v < 1 or v % 2 == 0):
            raise ValueError("must be a positive odd integer (e.g. 3 or 9)")
        return v


class ModelConfig(StrictModel):
    backbone: Literal["resnet18", "small_cnn", "iic_vgg4"] = "resnet18"
    stem: Literal["auto", "cifar", "imagenet"] = Field(
        "auto", description="auto: CIFAR stem (3x3 conv, no max-pool) for <= 64 px inputs"
    )
    cnn_width: int = Field(32, ge=1, description="channels of the small_cnn backbone's first block")
    embedding_dim: int = Field(256, ge=1, description="projection output (256 base encoder, 32 continued)")
    hidden_dim: int | None = Field(None, ge=1, description="projection hidden width; None = feature dim")
    sync_batchnorm: bool | None = Field(
        None, description="BatchNorm over the global batch in multi-worker runs (SyncBatchNorm on CUDA); "
        "null = on whenever resources.num_workers > 1, as the SimCLR paper and the released ExCB code")


class OptimConfig(StrictModel):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(5e-4, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only")
    weight_decay: float | None = Field(
        None, ge=0.0, description="null = the method's value (resolved at validation, logged resolved): LSD-C 5e-4 "
        "(main paper Sec. 4), 1e-4 with lsdc.composition=mixup (supplementary Sec. 1); other methods 1e-6")
    schedule: Literal["cosine", "constant", "multistep"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0.0, description="cosine: the lr it decays to")
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="multistep: factor applied at each milestone")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v) or v != sorted(set(v)):
            raise ValueError("milestones must be increasing epochs >= 1")
        return v


class LossConfig(StrictModel):
    temperature: float = Field(0.5, gt=0.0, description="NT-Xent temperature (MIX'EM Eq. 1)")
    weights: dict[str, float] = Field(default_factory=dict, description="weight per named loss term")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if w < 0}
        if bad:
            raise ValueError(f"loss weights must be >= 0, got {bad}")
        return v


class MixemConfig(StrictModel):
    """MIX'EM options (Sec. 3.2)."""

    num_components: int | None = Field(None, ge=2, description="M; None = the dataset's number of classes")
    push_pull_form: Literal["paper", "released"] = Field(
        "paper", description="paper: Eq. 6-8 on the component embeddings over the batch; released: the released "
        "code's definition (mixed embedding z, one zero vector appended per component, per view, summed over views)"
    )
    view_reduction: Literal["joint", "sum"] = Field(
        "joint", description="joint: comp-ent, inst-ent (and paper-form push/pull) over the rows of both views; "
        "sum: each per view, summed over the two views, as the released code weights them (about 2x joint)"
    )


class LsdcConfig(StrictModel):
    """LSD-C options (Sec. 3, supplementary Table 1); every Table 4 ablation is a choice here."""

    num_clusters: int | None = Field(None, ge=2, description="K outputs of the linear head; None = number of classes")
    labeling: Literal["knn", "cosine", "l2", "sne"] = Field("knn", description="pairwise labelling (Sec. 3.2)")
    label_space: Literal["features", "predictions"] = Field(
        "features", description="label on backbone features (the method) or on head logits (Table 4 ablation)")
    k: int = Field(20, ge=1, description="knn: neighbours")
    cosine_threshold: float = Field(
        0.9, description="cosine: tau, connected when cos(f_i, f_j) > tau; supplementary Table 1: 0.9 CIFAR10, "
                         "0.95 CIFAR100-20")
    l2_threshold: float = Field(
        1.0, description="l2: tau, connected when ||f_i - f_j||^2 < tau; no paper value (Sec. 4 grid-searched "
                         "0..2 without reporting the best): 1.0, the middle of that range, is a placeholder to sweep")
    sne_threshold: float = Field(
        0.01, description="sne: tau, connected when (p_j|i + p_i|j) / 2 > tau; supplementary Table 1: 0.01")
    sne_temperature: float = Field(1.0, gt=0.0, description="sne: T of Eq. 1")
    composition: Literal["ricap", "mixup", "none"] = Field("ricap", description="data composition (Sec. 3.3)")
    composition_beta: float = Field(0.3, gt=0.0, description="Beta(b, b) of RICAP crop sizes / MixUp weight")
    composite_pairing: Literal["eq6", "released"] = Field(
        "eq6", description="eq6: pair (i, j) scores pure i against composite j, p_i . p~_j, with composite j's "
        "target (Eq. 6 as printed); released: the released code's PairEnum order, p_j . p~_i against the same "
        "target (the score matrix transposed)")
    rampup_lambda: float = Field(5.0, ge=0.0, description="lambda of the consistency ramp-up (Eq. 8)")
    rampup_length: float = Field(100.0, ge=0.0, description="T of the ramp-up, in epochs")
    train_from_block: int = Field(4, ge=1, le=5, description="first trained macro-block: 4 = last block + head "
                                                             "(supplementary Sec. 1), 5 = head only, 1 = all")

    @model_validator(mode="before")
    @classmethod
    def _no_shared_threshold(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "threshold" in data:
            raise ValueError("unknown key 'threshold' (split per labelling): use cosine_threshold, l2_threshold "
                             "or sne_threshold, e.g. lsdc.sne_threshold=0.01")
        return data

    @property
    def threshold(self) -> float:
        """tau of the selected ``labeling`` (kNN has none: it uses ``k``; this returns the cosine one)."""
        return {"l2": self.l2_threshold, "sne": self.sne_threshold}.get(self.labeling, self.cosine_threshold)


class ExcbConfig(StrictModel):
    """ExCB options (explicit cluster balancing; ExCB supplementary Sec. 2, Algorithms 1-2).
    Where the supplementary gives no value (temperatures, momenta, crop counts), the defaults
    are the released code's configs/main_config.yaml (ImageNet, ResNet-50); sweep them for small
    datasets (search_spaces/excb_*.yaml)."""

    num_clusters: int | None = Field(None, ge=2, description="K; None = number of classes; more = over-clustering")
    global_crops: int = Field(2, ge=2, description="G global views (the teacher sees these)")
    local_crops: int = Field(6, ge=0, description="L local views (student only); released main_config.yaml "
                                                  "mini_crops: 6")
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    local_size: int | None = Field(None, ge=4, description="local crop side; None = half the image (16 px at 32, 48 at 96)")
    projector_dim: int = Field(256, ge=2, description="output of the projector h (input of the centroid layer)")
    student_temperature: float = Field(0.1, gt=0.0, description="t_s; released main_config.yaml student_temp: 0.1")
    teacher_temperature: float = Field(0.04, gt=0.0, description="t_t; released main_config.yaml teacher_temp: 0.04")
    teacher_momentum: float = Field(0.996, ge=0.0, le=1.0, description="EMA start, cosine schedule to 1; released "
                                                                       "main_config.yaml ema_momentum: 0.996")
    size_momentum: float = Field(0.999, ge=0.0, lt=1.0, description="momentum of the relative cluster sizes s; "
                                                                    "released main_config.yaml center_momentum: 0.999")
    balancing: bool = Field(True, description="apply B to the teacher's similarities (off: the ablation)")
    balance_above: Literal["linear", "inverse"] = Field(
        "linear", description="B for s > 1/K: linear to -1 at s = 1 (Sec. 2) or (1+z)/(sK) - 1 (Algorithm 1)")
    boost_argmax: bool = Field(False, description="released-code option (criterion.py centering): multiply the "
                                                  "balanced arg-max similarity by 1.01, then clamp to [-1, 1]")
    view_pairing: Literal["algorithm1", "released"] = Field(
        "algorithm1", description="algorithm1: the projector term pairs each teacher view with every other view "
        "(local crops included), total 0.5 loss_h + 0.5 loss_g (Algorithm 1); released: the released code's "
        "unroll_batch matches (projector term on the other global views only) and one mean over all pairs, i.e. "
        "term weights by pair count (1/3, 2/3 at G = 2, L = 0) unless loss.weights sets them")
    s_from: Literal["raw", "balanced"] = Field(
        "balanced", description="update s from the teacher's assignments after B (released code) or before it")
    centroid_init: Literal["kmeans", "random"] = Field(
        "kmeans", description="centroids from K-means on the initial projections (released code) or N(0, 1)")
    centroid_init_samples: int = Field(50_000, ge=2, description="training images the K-means initialisation uses")


class EvalConfig(StrictModel):
    """Post-training evaluation (K-means fan-out, Hungarian ACC / NMI / ARI, linear probe)."""

    split: Literal["test", "all"] = Field(
        "test", description="images clustered and scored: `test`, or `all` = the labelled images of every split "
        "(train + test; not STL-10's unlabeled), the whole-dataset protocol of LSD-C Sec. 4; the linear probe "
        "always trains on train and scores on test")
    kmeans_n_init: int = Field(50, ge=1, description="random K-means initialisations; best inertia wins")
    kmeans_max_iter: int = Field(300, ge=1)
    batch_size: int = Field(512, ge=1, description="feature extraction batch size")
    raw_pixels_baseline: bool = Field(True, description="also cluster raw pixels for comparison")
    embedding_baselines: bool = Field(
        True, description="also UMAP (10-d) + K-means and, up to 10,000 images, t-SNE (2-d) + K-means on the raw "
        "pixels of the same images (cached per images and seed), and UMAP + K-means on the run's representation")


# Tag namespaces the platform writes itself (MLflow's standard tags, clusterlab's bookkeeping).
RESERVED_TAG_PREFIXES = ("mlflow.", "clusterlab.")
MAX_TAG_KEY = 250  # MLflow's limits on tag keys and values
MAX_TAG_VALUE = 8000


class TrackingConfig(StrictModel):
    uri: str | None = Field(
        None, description="MLflow tracking URI; None = $CLUSTERLAB_TRACKING_URI or sqlite:///mlflow.db in the cwd"
    )
    experiment: str = Field("clusterlab", min_length=1, description="MLflow experiment (--experiment)")
    tags: dict[str, str] = Field(
        default_factory=dict, description="your own tags on the run (and a sweep's runs), e.g. {team: vision} "
        "(--tag team=vision); searchable in the UI as tags.team")
    note: str | None = Field(None, max_length=MAX_TAG_VALUE,
                             description="the run's description, shown on its MLflow page (--note)")
    system_metrics: bool = Field(
        True, description="log CPU / GPU utilisation and memory of every training worker's node as "
        "system/<node>/... metrics (MLflow's system-metrics monitor; GPUs through nvidia-ml-py)")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="seconds between system-metric samples")

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_values_as_text(cls, v: Any) -> Any:
        """YAML reads ``version: 2`` as a number; a tag is text."""
        return {str(k): str(val) for k, val in v.items()} if isinstance(v, dict) else v

    @field_validator("tags")
    @classmethod
    def _own_tags(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not key.strip() or key.startswith(RESERVED_TAG_PREFIXES):
                raise ValueError(f"tag {key!r}: give a non-empty name outside {', '.join(RESERVED_TAG_PREFIXES)} "
                                 "(clusterlab and MLflow write those themselves)")
            if len(key) > MAX_TAG_KEY or len(value) > MAX_TAG_VALUE:
                raise ValueError(f"tag {key!r}: names take at most {MAX_TAG_KEY} characters and values "
                                 f"{MAX_TAG_VALUE} (MLflow's limits)")
        return v


class ResourcesConfig(StrictModel):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    gpus_per_worker: float = Field(0.0, ge=0.0)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(0, ge=-1, description="restarts of a failed training run from its last checkpoint (a worker or node lost; never "
        "for a NaN loss or out of memory, which would fail again); -1: unlimited")
    custom_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each worker needs, e.g. {worker_node: 1} to place "
        "workers on nodes started with `ray start --resources '{\"worker_node\": 1}'`")
    preemption_check_steps: int = Field(
        20, ge=0, description="training steps between asking Ray Train whether a node of the run is about to be "
        "preempted (a spot reclaim notice); on notice the epoch so far is checkpointed at once and the restarted run "
        "continues from that step; 0: never ask")

    @field_validator("custom_resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        builtin = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(v))
        if builtin:
            raise ValueError(f"{', '.join(builtin)}: use cpus_per_worker / gpus_per_worker for built-in resources")
        negative = sorted(k for k, amount in v.items() if amount <= 0)
        if negative:
            raise ValueError(f"amounts must be > 0 ({', '.join(negative)})")
        return v

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class PerformanceConfig(StrictModel):
    """Training-step fast paths. Each switch: true, false, or null = auto (on for CUDA devices,
    off on CPUs, where bf16 matmuls and channels_last convolutions are usually slower)."""

    bf16: bool | None = Field(None, description="bf16 autocast of the model's forward; null = on CUDA only")
    channels_last: bool | None = Field(None, description="channels_last model weights and views; null = on CUDA only")
    fused_optimizer: bool | None = Field(
        None, description="single-kernel Adam / SGD (CUDA, and CPU in recent torch); null = on CUDA only")
    compile: bool = Field(False, description="torch.compile the model (the first steps pay the compilation)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"

    def enabled(self, name: Literal["bf16", "channels_last", "fused_optimizer"], device_type: str) -> bool:
        """Whether switch ``name`` is on for this device type (``cuda``, ``cpu``)."""
        value = getattr(self, name)
        return device_type == "cuda" if value is None else value


#: ``optim.weight_decay`` when no layer sets it and the method's spec names none
DEFAULT_WEIGHT_DECAY = 1e-6


class ExperimentConfig(StrictModel):
    method: str = "simclr"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    mixem: MixemConfig = Field(default_factory=MixemConfig)
    lsdc: LsdcConfig = Field(default_factory=LsdcConfig)
    excb: ExcbConfig = Field(default_factory=ExcbConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    batch_size: int = Field(512, ge=2, description="global batch size, split across workers")
    epochs: int = Field(100, ge=1)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds torch, numpy and the data order (32 bits: what "
                                                          "numpy's legacy seeding and DataLoader workers take)")
    run_name: str | None = Field(None, description="Ray Train run name; the same name resumes that run")
    init_from: str | None = Field(
        None, description="checkpoint directory/file or MLflow run id whose backbone initialises this run"
    )
    storage_path: str | None = Field(None, description="Ray Train storage; None = ./ray_results")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from clusterlab.methods import spec_for  # lazy: the specs' checks import this module

        spec_for(v)
        return v

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(SAFE_NAME, v):
            raise ValueError("use letters, digits, '_', '.', '-' only (it names a directory)")
        if v is not None and len(v) > MAX_RUN_NAME:
            raise ValueError(f"at most {MAX_RUN_NAME} characters (it names a directory, inside Ray's own longer "
                             f"names), got {len(v)}")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "ExperimentConfig":
        from clusterlab.methods import spec_for  # lazy: the specs' checks import this module

        spec = spec_for(self.method)
        if self.optim.weight_decay is None:  # after every layer, so a sweep's searched composition counts too
            self.optim.weight_decay = spec.weight_decay(self) if spec.weight_decay else DEFAULT_WEIGHT_DECAY
        if self.optim.warmup_epochs >= self.epochs:
            raise ValueError(f"optim.warmup_epochs ({self.optim.warmup_epochs}) must be < epochs ({self.epochs})")
        if self.batch_size % self.resources.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by resources.num_workers "
                f"({self.resources.num_workers})"
            )
        if self.data.protocol == "train+unlabeled" and self.data.name != "stl10":
            raise ValueError("data.protocol 'train+unlabeled' exists for data.name 'stl10' only")
        if spec.check_config is not None:
            spec.check_config(self)
        if self.data.name == "imagefolder" and self.data.image_size is None:
            raise ValueError("data.image_size is required for data.name 'imagefolder'")
        if self.data.name not in ("digits",) and self.data.root is None:
            raise ValueError(f"data.root is required for data.name {self.data.name!r} (pass --data-root DIR)")
        terms = spec.loss_terms
        unknown = set(self.loss.weights) - set(terms)
        if unknown:
            raise ValueError(
                f"loss.weights has unknown terms {sorted(unknown)} for method {self.method!r}; allowed: {', '.join(terms)}"
            )
        return self

    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.method}-{self.data.name}-{datetime.now():%Y%m%d-%H%M%S}"

    def to_yaml(self) -> str:
        """The config as YAML, credentials in its URIs masked (it is printed and logged)."""
        from clusterlab.redact import redact_values

        return yaml.safe_dump(redact_values(self.model_dump(mode="json")), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- presets


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out



#: Paper values per (method, dataset). MIX'EM supplementary 1.1-1.2: Adam, lr 1e-4 (STL10) /
#: 5e-4 (CIFAR), cosine decay, batch 512, the SimCLR augmentation, blur 3x3 / 9x9; the base
#: encoder is trained 600 epochs with embedding dim 256 (MIX'EM Sec. 4). The paper gives no
#: weight decay and no blur probability: 1e-5 is the released config.yaml's weight_decay, and
#: 0.5 the released data_aug/gaussian_blur.py's blur chance (also SimCLR's, the "[1]" whose
#: augmentation supplementary 1.2 says it follows).
_PAPER_BASE: dict[str, Any] = {"batch_size": 512, "epochs": 600,
                               "optim": {"name": "adam", "schedule": "cosine", "weight_decay": 1e-5},
                               "augment": {"blur_p": 0.5}}


def _paper(dataset: str, protocol: str, lr: float) -> dict[str, Any]:
    return deep_merge(_PAPER_BASE, {"data": {"name": dataset, "protocol": protocol}, "optim": {"lr": lr}})


def _stage2(dataset: str, lr: float) -> dict[str, Any]:
    return deep_merge(_paper(dataset, "train+test", lr), {"method": "mixem", "epochs": 100,
                                                           "model": {"embedding_dim": 32}})


def _table1(l1: float, l2: float, l3: float, l4: float) -> dict[str, float]:
    return {"comp_ent": l1, "inst_ent": l2, "push": l3, "pull": l4}


PRESETS: dict[str, dict[str, Any]] = {
    "simclr_cifar10": _paper("cifar10", "train", 5e-4),
    "simclr_cifar100_20": _paper("cifar100_20", "train", 5e-4),
    # MIX'EM Sec. 4: the STL10 base encoder trains on train + unlabeled.
    "simclr_stl10": _paper("stl10", "train+unlabeled", 1e-4),
    # Stage 2 (MIX'EM Sec. 4): 100 epochs with embedding dim 32 on a base encoder, train+test
    # protocol, loss weights of supplementary Table 1 (l1..l4 = comp_ent, inst_ent, push, pull).
    "mixem_stl10": deep_merge(_stage2("stl10", 1e-4), {"loss": {"weights": _table1(1, 0.1, 0.05, 0.1)}}),
    "mixem_cifar10": deep_merge(_stage2("cifar10", 5e-4), {"loss": {"weights": _table1(1, 0.1, 0.0, 0.05)}}),
    "mixem_cifar100_20": deep_merge(_stage2("cifar100_20", 5e-4),
                                     {"loss": {"weights": _table1(1, 0.01, 0.05, 0.0)}}),
    # Scaled down for 2 CPU cores: 16 px digits, small CNN, milder crops (an 8 px digit
    # cropped to 8% of its area is unrecognisable) and no flips (digits are not mirror-symmetric).
    "simclr_digits": {
        "data": {"name": "digits", "protocol": "train+test", "image_size": 16, "val_fraction": 0.1},
        "model": {"backbone": "small_cnn", "embedding_dim": 64},
        "optim": {"name": "adam", "lr": 2e-3, "schedule": "cosine", "warmup_epochs": 2},
        "augment": {"crop_scale": (0.5, 1.0), "hflip_p": 0.0, "jitter": (0.4, 0.4, 0.4, 0.1), "blur_p": 0.5},
        "loss": {"temperature": 0.5},
        "batch_size": 128,
        "epochs": 40,
        "eval": {"kmeans_n_init": 20},
    },
}
# Stage 2 of the demo: MIX'EM continued from the simclr_digits encoder (embedding dim 32).
# Measured on digits (40 epochs): with the STL10 weights (1, 0.1, 0.05, 0.1) only ~5 of 10
# components stayed in use (Max Comp ACC 0.27); l1 = 2 without push/pull kept all 10 in use
# (Max Comp 0.45, MIX'EM-initialised K-means 0.786).
PRESETS["mixem_digits"] = deep_merge(PRESETS["simclr_digits"], {
    "method": "mixem",
    "epochs": 40,
    "model": {"embedding_dim": 32},
    "loss": {"weights": _table1(2, 0.1, 0.0, 0.0)},
})

# MIX'EM's recipe on MNIST (no paper has it): the CIFAR settings (Adam 5e-4, cosine, batch 512,
# stage 2: 100 epochs, embedding 32, CIFAR-10's Table 1 weights, 10 classes like MNIST) on IIC's
# 4-conv net, trained and evaluated on all 70,000 images as MNIST clustering papers do. Scaled:
# 200 base epochs instead of 600 (70,000 images, one grey channel); crops kept above half the
# digit and no flips (as for digits); colour jitter on brightness / contrast only, the
# saturation and hue of a grey image being nothing. Projection hidden width 512, as on ResNet-18
# (the net's 4608-d representation would otherwise make the MIX'EM heads 235M parameters).
_MNIST_SIMCLR = {"data": {"name": "mnist", "protocol": "train+test"}, "eval": {"split": "all"},
                 "model": {"backbone": "iic_vgg4", "hidden_dim": 512},
                 "augment": {"crop_scale": (0.5, 1.0), "hflip_p": 0.0, "jitter": (0.4, 0.4, 0.0, 0.0),
                             "grayscale_p": 0.0}}
PRESETS["simclr_mnist"] = deep_merge(_paper("mnist", "train+test", 5e-4), {**_MNIST_SIMCLR, "epochs": 200})
PRESETS["mixem_mnist"] = deep_merge(_stage2("mnist", 5e-4),
                                    {**_MNIST_SIMCLR, "loss": {"weights": _table1(1, 0.1, 0.0, 0.05)}})

# RotNet + LSD-C. Augmentation for both: random crop (about a pad-4 crop's area) and flips only.
_CROP_FLIP = {"crop_scale": (0.64, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}


def _rotnet(dataset: str, protocol: str) -> dict[str, Any]:
    """LSD-C supplementary Sec. 1: RotNet for 200 epochs, SGD lr 0.1 divided by 5 at 60/120/160.
    Evaluated like the LSD-C stage it pretrains, on the whole dataset (``eval.split: all``)."""
    return {"method": "rotnet", "data": {"name": dataset, "protocol": protocol}, "eval": {"split": "all"},
            "augment": _CROP_FLIP,
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "multistep",
                      "milestones": [60, 120, 160], "gamma": 0.2},
            "batch_size": 128, "epochs": 200}


def _lsdc(dataset: str, epochs: int, milestones: list[int], lam: float, length: float,
          lsdc: dict[str, Any]) -> dict[str, Any]:
    """LSD-C supplementary Table 1: SGD lr 0.1 (x0.1 at the LR steps), batch 256, weight decay
    5e-4 (main paper Sec. 4), ramp-up lambda / T, RICAP, last macro-block + head trained.
    Trained and evaluated on the whole dataset (LSD-C Sec. 4: "we train and test the methods on
    the whole dataset"): ``data.protocol: train+test``, ``eval.split: all``."""
    return {"method": "lsdc", "data": {"name": dataset, "protocol": "train+test"}, "eval": {"split": "all"},
            "augment": _CROP_FLIP,
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9,  # weight decay: methods.lsdc_weight_decay
                      "schedule": "multistep" if milestones else "constant", "milestones": milestones, "gamma": 0.1},
            "batch_size": 256, "epochs": epochs,
            "lsdc": {"rampup_lambda": lam, "rampup_length": length, "composition": "ricap", **lsdc}}


PRESETS.update({
    "rotnet_cifar10": _rotnet("cifar10", "train+test"),
    "rotnet_cifar100_20": _rotnet("cifar100_20", "train+test"),
    "rotnet_stl10": _rotnet("stl10", "train+unlabeled"),  # "all the data available" (LSD-C Sec. 4.1)
    # Table 1 rows; labelling = the best of Table 4 per dataset (kNN; SNE for STL10, whose row has no k).
    # Every labelling of a row carries Table 1's values (cosine tau, SNE tau and T, k), so
    # `lsdc.labeling=cosine` / `sne` on a preset is that Table 4 column.
    "lsdc_cifar10": _lsdc("cifar10", 220, [140, 180], 5, 100,
                          {"labeling": "knn", "k": 20, "cosine_threshold": 0.9, "sne_threshold": 0.01,
                           "sne_temperature": 1.0}),
    "lsdc_cifar100_20": _lsdc("cifar100_20", 200, [170], 25, 150,
                              {"labeling": "knn", "k": 10, "cosine_threshold": 0.95, "sne_threshold": 0.01,
                               "sne_temperature": 0.5}),
    "lsdc_stl10": _lsdc("stl10", 200, [140, 180], 5, 50,
                        {"labeling": "sne", "sne_threshold": 0.01, "sne_temperature": 0.5}),
    # MNIST (supplementary Table 1 row: SGD, 15 epochs, no LR steps, lr 0.1, lambda 5, T 50, kNN
    # k = 10) on IIC's VGG-style 4-conv net (LSD-C Sec. 4), all 70,000 images. The paper freezes
    # ResNet-18's first three macro-blocks; here likewise the first three conv stages, so conv4 +
    # head train. No flips: digits are not mirror-symmetric.
    "rotnet_mnist": deep_merge(_rotnet("mnist", "train+test"),
                               {"model": {"backbone": "iic_vgg4"}, "augment": {"hflip_p": 0.0}}),
    "lsdc_mnist": deep_merge(_lsdc("mnist", 15, [], 5, 50, {"labeling": "knn", "k": 10}),
                             {"model": {"backbone": "iic_vgg4"}, "augment": {"hflip_p": 0.0}}),
})

# MNIST on this project's 2-core CPU budget (a chain in at most 3 h; the recipe's RotNet alone is
# about 30 h there). Each schedule is the recipe's scaled to the epochs run: RotNet's LR steps at
# 60/120/160 of 200 become 2/4/5 of 6, LSD-C's ramp-up T = 50 of 15 epochs becomes 50 x 5/15 of 5
# (the same weight curve over the run). bf16 autocast: this CPU has bf16 units (1.9x measured);
# 10 K-means initialisations on 70,000 images (the recipe scores with 50).
_MNIST_CPU = {"performance": {"bf16": True}, "eval": {"kmeans_n_init": 10}}
PRESETS.update({
    "rotnet_mnist_cpu": deep_merge(deep_merge(PRESETS["rotnet_mnist"], _MNIST_CPU),
                                   {"epochs": 6, "optim": {"milestones": [2, 4, 5]}}),
    "lsdc_mnist_cpu": deep_merge(deep_merge(PRESETS["lsdc_mnist"], _MNIST_CPU),
                                 {"epochs": 5, "lsdc": {"rampup_length": round(50 * 5 / 15, 3)}}),
    # Digits, scaled to 2 CPU cores. RotNet 20 epochs (K-means on it: ACC 0.40). LSD-C measured
    # from that encoder, in-process: 20 epochs on the last block, lr 0.05 -> head ACC 0.19 (stuck
    # near uniform outputs); 100 epochs, lr 0.1: last block 0.32, last two blocks 0.44 (NMI 0.48),
    # all but the first 0.39. The last two of the small CNN's four blocks train here.
    "rotnet_digits": deep_merge(_rotnet("digits", "train+test"), {
        "data": {"image_size": 16, "val_fraction": 0.1}, "model": {"backbone": "small_cnn"},
        "optim": {"milestones": [12, 16]}, "epochs": 20, "eval": {"kmeans_n_init": 20}}),
    "lsdc_digits": deep_merge(_lsdc("digits", 100, [80], 5, 30, {"labeling": "knn", "k": 10, "train_from_block": 3}),
                              {"data": {"image_size": 16, "val_fraction": 0.1}, "model": {"backbone": "small_cnn"},
                               "batch_size": 128, "eval": {"kmeans_n_init": 20}}),
})

# ExCB: multi-crop (2 global + L local views), K = number of classes unless over-clustering.
_EXCB_AUGMENT = {"hflip_p": 0.5, "jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "grayscale_p": 0.2}


def _excb(dataset: str, protocol: str, lr: float, local_crops: int) -> dict[str, Any]:
    return {"method": "excb", "data": {"name": dataset, "protocol": protocol}, "augment": _EXCB_AUGMENT,
            "optim": {"name": "adam", "lr": lr, "weight_decay": 1e-6, "schedule": "cosine", "warmup_epochs": 10},
            "batch_size": 256, "epochs": 200, "excb": {"local_crops": local_crops}}


PRESETS.update({
    "excb_cifar10": _excb("cifar10", "train+test", 5e-4, 4),
    "excb_cifar100_20": _excb("cifar100_20", "train+test", 5e-4, 4),
    "excb_stl10": _excb("stl10", "train+unlabeled", 5e-4, 6),
    # Digits on 2 CPU cores: 16 px, small CNN, 2 global + 2 local (8 px) views.
    "excb_digits": deep_merge(_excb("digits", "train+test", 2e-3, 2), {
        "data": {"image_size": 16, "val_fraction": 0.1}, "model": {"backbone": "small_cnn", "cnn_width": 16},
        "augment": {"hflip_p": 0.0}, "optim": {"warmup_epochs": 2}, "batch_size": 128, "epochs": 40,
        # Measured in-process (width 16, K = 30, 40 epochs): 3% of clusters empty at inference,
        # largest relative size 2.9, head ACC 0.54 (many-to-one Hungarian), against 47% empty
        # without B. K = 10: head ACC 0.46. About 12 steps per epoch, so the teacher and s
        # follow faster than ImageNet's 0.996 / 0.999 would let them. Teacher temperature 0.05 (not
        # the released 0.04 default): the value those measurements used.
        "excb": {"num_clusters": 30, "global_scale": (0.4, 1.0), "local_scale": (0.2, 0.5), "projector_dim": 64,
                 "teacher_momentum": 0.99, "size_momentum": 0.9, "teacher_temperature": 0.05},
        "eval": {"kmeans_n_init": 20}}),
})


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-4` is a string; researchers write it as a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping_once(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping whose keys are unique: YAML's "last one wins" would drop a setting unseen."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _construct_mapping_once  # type: ignore[method-assign]

#: Bounds on what a config or search-space file may cost to read: its size, and the size of
#: its value once YAML aliases are expanded (a few hundred bytes of nested aliases, a
#: "billion laughs", expand to gigabytes when a value is printed or validated).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


def _expanded_size(value: Any, limit: int) -> int:
    """The number of values in ``value`` with every alias expanded, counted without expanding
    (each shared container is counted once and multiplied), stopping past ``limit``."""
    sizes: dict[int, int] = {}

    def size(v: Any) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) not in sizes:
            sizes[id(v)] = 0  # a recursive alias: counted as one value, refused by validation
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            total = 1
            for item in items:
                total += size(item)
                if total > limit:
                    break
            sizes[id(v)] = total
        return sizes[id(v)]

    return size(value)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        detail = str(exc)
        raise ConfigError(f"{source}: not valid YAML: {detail[:600]}{'...' if len(detail) > 600 else ''}") from None
    if _expanded_size(value, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
        raise ConfigError(f"{source}: its YAML aliases expand to more than {MAX_CONFIG_NODES:,} values; a config "
                          f"needs a few hundred: write the values out instead of nesting aliases")
    return value


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` in at most about ``limit`` characters, without building the whole repr
    (an error message quotes a value; it must not print megabytes of it)."""
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlist = shortener.maxdict = shortener.maxtuple = shortener.maxset = 10
    shortener.maxlevel = 3
    text = shortener.repr(value) if not isinstance(value, str) or len(value) > limit else repr(value)
    return text if len(text) <= limit + 10 else text[:limit] + "..."


def read_config_text(path: Path, what: str = "config file") -> str:
    """The UTF-8 text of a config or search-space file, refused above :data:`MAX_CONFIG_BYTES`."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is {size:,} bytes; a config is a few KB (at most {MAX_CONFIG_BYTES:,} "
                          f"bytes): is it the right file?")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = parse_yaml(read_config_text(path), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config fields")
    return data


# --------------------------------------------------------------------------- overrides


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides; values are parsed as YAML (`1e-4` is a number)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = parse_yaml(text, f"override {key}")
    return out


# --------------------------------------------------------------------------- building


def _allowed_keys(loc: Sequence[str | int], root: type[BaseModel]) -> list[str]:
    """The field names of the model at ``loc`` (through nested models, ``dict[str, Model]``
    values and optional models), or [] where that is not a model."""

    def unwrap(annotation: Any) -> Any:
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if get_origin(annotation) in (Union, UnionType) and len(args) == 1 else annotation

    annotation: Any = root
    for part in loc[:-1]:
        annotation = unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = getattr(annotation.model_fields.get(str(part)), "annotation", None)
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return []
    annotation = unwrap(annotation)
    return list(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def format_validation_error(exc: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """One line per error, ``field: message``; unknown keys list the allowed ones."""
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc, root or ExperimentConfig)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg = f"{msg} (got {short_repr(err['input'])})"
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def build_config(raw: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig` or raise :class:`ConfigError`."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def build_stored_config(raw: Mapping[str, Any], source: str) -> ExperimentConfig:
    """:func:`build_config` for a config stored by an earlier clusterlab (a checkpoint's), with
    renamed fields carried over: the shared ``lsdc.threshold`` becomes the field of the
    labelling it served (``cosine_threshold``, ``l2_threshold`` or ``sne_threshold``; kNN used none)."""
    raw = copy.deepcopy(dict(raw))
    lsdc = raw.get("lsdc")
    if isinstance(lsdc, dict) and "threshold" in lsdc:
        threshold = lsdc.pop("threshold")
        labeling = lsdc.get("labeling", LsdcConfig.model_fields["labeling"].default)
        if labeling != "knn":
            lsdc.setdefault(f"{labeling}_threshold", threshold)
    return build_config(raw, source)


def dotted_overrides(values: Mapping[str, Any]) -> list[str]:
    """``{dotted key: value}`` as ``key=value`` overrides. JSON is valid YAML, so every value
    round-trips through :func:`apply_overrides` unchanged; non-ASCII text stays literal (JSON's
    ``\\ud83d\\ude42`` escape of an emoji is two lone surrogates to YAML)."""
    return [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in values.items()]


def resolve_raw(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    preset: str | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """The one resolution of a config, used by ``train``, ``config``, ``sweep`` and the demo.

    Layers, later ones winning: defaults < preset < YAML file < ``fixed`` (a search space's
    ``overrides:`` and ``resources:``, dotted keys) < ``key=value`` overrides (the command
    line). A sweep's searched values come after all of these; the command line may not name a
    searched key (:func:`clusterlab.search_space.load_search_space` refuses it).

    The preset is, in order: the ``preset`` argument (``--preset``) or a ``preset=NAME``
    override (both the command line; they must agree), a ``preset:`` key in the YAML file, or
    ``<method>_<dataset>`` when such a preset exists for the method and dataset the layers above
    it ask for. Returns the raw mapping (unvalidated) and a label naming its sources.
    """
    user: dict[str, Any] = read_yaml_file(path) if path else {}
    named = {f"{path}: preset": user.pop("preset", None)}
    user = apply_overrides(user, dotted_overrides(fixed or {}))
    user = apply_overrides(user, overrides)
    named = {"preset": preset, "override preset": user.pop("preset", None), **named}
    if None not in (named["preset"], named["override preset"]) and named["preset"] != named["override preset"]:
        raise ConfigError(f"preset: --preset {preset} and the override preset={named['override preset']} disagree; "
                          "give one of them")
    origin, preset = next(((where, name) for where, name in named.items() if name is not None), ("", None))
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{origin}: unknown preset {preset!r}; allowed: {', '.join(sorted(PRESETS))}")
    if preset is None:
        method = user.get("method", ExperimentConfig.model_fields["method"].default)
        dataset = (user.get("data") or {}).get("name", DataConfig.model_fields["name"].default)
        candidate = f"{method}_{dataset}"
        preset = candidate if candidate in PRESETS else None
    raw = deep_merge(PRESETS[preset], user) if preset else user
    layers = (f"preset {preset}" if preset else "", str(path or ""), "search space" if fixed else "",
              "overrides" if overrides else "")
    return raw, " + ".join(s for s in layers if s) or "defaults"


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    preset: str | None = None,
) -> ExperimentConfig:
    """The validated config of ``clusterlab train`` / ``config``: :func:`resolve_raw` without a
    search space."""
    return build_config(*resolve_raw(path, overrides, preset))


#: The longest param value MLflow stores whole (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``);
#: MLflow cuts a longer one, which then never equals the config it came from.
PARAM_VALUE_LIMIT = 6000


def param_value(text: str) -> str:
    """``text`` as an MLflow param: whole up to :data:`PARAM_VALUE_LIMIT` characters, else its
    head and the SHA-256 of the whole (config.yaml beside the params keeps every value), so that
    the same config gives the same param and a resumed run compares equal."""
    if len(text) <= PARAM_VALUE_LIMIT:
        return text
    import hashlib

    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    tail = f"... ({len(text)} characters, sha256 {digest}; whole in config.yaml)"
    return text[:PARAM_VALUE_LIMIT - len(tail)] + tail


def flatten(cfg: ExperimentConfig) -> dict[str, str]:
    """Dotted ``section.key -> value`` pairs, for MLflow params (credentials in URIs masked;
    values over MLflow's length limit as :func:`param_value` shortens them). Other methods'
    config sections are left out: a run's params are what it used."""
    from clusterlab.methods import SPECS
    from clusterlab.redact import redact_uri

    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = param_value(redact_uri(str(value)))

    others = {spec.config_section for spec in SPECS.values() if spec.name != cfg.method}
    # Tags and the note are the run's tags, not params: they may change when a run resumes.
    dumped = cfg.model_dump(mode="json", exclude={"tracking": {"tags", "note"}})
    walk("", {k: v for k, v in dumped.items() if k not in others})
    return flat
