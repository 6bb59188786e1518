"""Sweep search spaces: a YAML file naming a base config, the searched keys and the Tune settings.

::

    name: mixem-loss-weights-stl10          # default sweep name (= MLflow experiment)
    base: mixem_stl10                       # a preset name, or a config YAML path (relative to this file)
    overrides: {data.root: ~/data}          # fixed changes to the base, dotted keys
    search:                                 # dotted config keys -> one domain each
      loss.weights.push: {grid: [0.0, 0.05, 0.1]}
      optim.lr: {loguniform: [5e-5, 5e-4]}
    tune:
      metric: val_loss                      # selects the best trial (MIX'EM supplementary 1.3)
      mode: min
      scheduler: {name: asha, max_t: 100, grace_period: 10, reduction_factor: 3}
      search_alg: {name: basic}             # or optuna: TPE proposes each trial's values (no grid)
      num_samples: 1                        # repeats of the grid / samples of the random keys
      max_concurrent_trials: 4
      seed: 0
    resources: {num_workers: 1, gpus_per_worker: 0.5, cpus_per_worker: 4}   # per trial

Domains: ``grid`` (every value, crossed with the other grids), ``choice`` (one value sampled),
``uniform`` / ``loguniform`` ([low, high]), ``randint`` ([low, high), integers).

Validation happens here, before Ray starts: unknown keys, empty grids, bad bounds, an ASHA
``grace_period`` above ``max_t``, a searched value the config rejects, and a metric the
method does not produce all raise :class:`~clusterlab.config.ConfigError` naming the field.
This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from clusterlab.config import (
    PRESETS,
    SAFE_NAME,
    ConfigError,
    ExperimentConfig,
    ResourcesConfig,
    StrictModel,
    apply_overrides,
    build_config,
    dotted_overrides,
    format_validation_error,
    parse_yaml,
    read_config_text,
    resolve_raw,
)
from clusterlab.methods import spec_for

#: the MIX'EM paper's names for the loss weights (Eq. 9), accepted wherever a key is named
LAMBDA_ALIASES = {"lambda_1": "loss.weights.comp_ent", "lambda_2": "loss.weights.inst_ent",
                  "lambda_3": "loss.weights.push", "lambda_4": "loss.weights.pull"}


class Domain(StrictModel):
    """Exactly one of the five ways to search a key."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Domain":
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} is empty; list at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {value[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values that must all make a valid config (every listed value, or both bounds)."""
        value = getattr(self, self.kind)
        if self.kind == "randint":
            return [value[0], value[1] - 1]
        return list(value)


class FifoScheduler(StrictModel):
    name: Literal["fifo"] = "fifo"


class AshaScheduler(StrictModel):
    """Async successive halving on the per-epoch metric (Tune's ``ASHAScheduler``); time = epochs."""

    name: Literal["asha"]
    max_t: int = Field(100, ge=1, description="epoch horizon of the halving rungs (<= epochs; survivors train all epochs)")
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(4.0, gt=1.0)

    @model_validator(mode="after")
    def _grace_within_max(self) -> "AshaScheduler":
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) must be <= max_t ({self.max_t})")
        return self


class BasicSearch(StrictModel):
    """Tune's ``BasicVariantGenerator``: every grid point, random domains drawn independently."""

    name: Literal["basic"] = "basic"


class OptunaSearch(StrictModel):
    """Bayesian optimisation with Optuna's TPE sampler (Tune's ``OptunaSearch``): each trial's
    values are proposed from the ``tune.metric`` of the trials finished before it, so
    ``tune.max_concurrent_trials`` (default: what the resources allow) also bounds how many
    proposals are made without that feedback. ``num_samples`` = trials; no ``grid`` domains."""

    name: Literal["optuna"]


# Schedulers that change a trial's hyperparameters while it trains: refused, with the reason.
MUTATING_SCHEDULERS = {"pbt", "pb2"}


class TuneSettings(StrictModel):
    metric: str = Field("val_loss", description="the metric that picks the best trial")
    mode: Literal["min", "max"] = "min"
    scheduler: Annotated[Union[FifoScheduler, AshaScheduler], Field(discriminator="name")] = Field(
        default_factory=FifoScheduler)
    search_alg: Annotated[Union[BasicSearch, OptunaSearch], Field(discriminator="name")] = Field(
        default_factory=BasicSearch, description="how trials' values are chosen: basic (grid / random) or optuna")
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the resources allow")
    seed: int | None = Field(0, description="seeds the sampling of random domains")

    @field_validator("scheduler", mode="before")
    @classmethod
    def _no_mutating_scheduler(cls, v: Any) -> Any:
        name = v.get("name") if isinstance(v, dict) else None
        if isinstance(name, str) and name.lower() in MUTATING_SCHEDULERS:
            raise ValueError(
                f"{name} is not supported: population-based training changes a trial's hyperparameters while it "
                "trains, but a clusterlab run is one config (its MLflow params are immutable, its checkpoint and "
                "resume assume them); use asha to stop weak trials early, or search_alg: {name: optuna}")
        return v


class SearchSpace(StrictModel):
    name: str | None = Field(None, pattern=f"^{SAFE_NAME}$")
    base: str = Field(description="preset name or config YAML path")
    overrides: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Domain] = Field(min_length=1)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    resources: ResourcesConfig | None = None

    def grid_keys(self) -> list[str]:
        return [k for k, d in self.search.items() if d.kind == "grid"]

    def trial_count(self) -> int:
        """Trials Tune will run: the grid's cross product (1 without grid keys) times ``num_samples``."""
        size = 1
        for key in self.grid_keys():
            size *= len(self.search[key].grid or [])
        return size * self.tune.num_samples


def resolve_base(space: SearchSpace, source: Path | None, extra_overrides: Sequence[str]) -> dict[str, Any]:
    """The base config as a raw mapping, resolved as ``clusterlab train``
    resolves a config (:func:`~clusterlab.config.resolve_raw`): the ``base`` preset or YAML file
    (whose ``preset:`` key, or else the implicit ``<method>_<dataset>`` preset, applies), then the
    space's ``overrides`` and ``resources``, then the command line's ``key=value``."""
    preset, path = (space.base, None) if space.base in PRESETS else (None, Path(space.base).expanduser())
    if path is not None:
        if not path.is_absolute() and source is not None:
            path = source.parent / path
        if not path.is_file():
            raise ConfigError(f"base: {space.base!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                              f"nor a config file ({path} does not exist)")
    fixed = dict(space.overrides)
    if space.resources is not None:  # only the fields the space sets: the base's others stay
        fixed |= {f"resources.{k}": v for k, v in space.resources.model_dump(mode="json", exclude_unset=True).items()}
    searched_on_command_line = [item for item in extra_overrides if item.partition("=")[0] in space.search]
    if searched_on_command_line:
        key = searched_on_command_line[0].partition("=")[0]
        raise ConfigError(f"override {searched_on_command_line[0]!r}: {key} is searched by the space (search.{key}); "
                          f"a fixed value would make every trial alike: drop the override, or take {key} out "
                          f"of search:")
    return resolve_raw(path, extra_overrides, preset, fixed)[0]


def trial_config(base: dict[str, Any], params: dict[str, Any], source: str = "trial") -> ExperimentConfig:
    """The validated config of one trial: the base with the searched values applied."""
    return build_config(apply_overrides(base, dotted_overrides(params)), source)


def check_space(space: SearchSpace, base: dict[str, Any], label: str) -> None:
    """Validate the base, the searched values against the config, and the metric against the method."""
    build_config(base, f"{label}: base")
    for key, domain in space.search.items():
        for value in domain.probe_values():
            try:
                trial_config(base, {key: value})
            except ConfigError as exc:
                detail = str(exc).split("\n", 1)[-1].strip()
                raise ConfigError(f"{label}: search.{key}: the value {value!r} makes an invalid config: {detail}") from None
    probe = trial_config(base, {k: d.probe_values()[0] for k, d in space.search.items()})
    method = spec_for(probe.method)
    per_epoch, final = method.epoch_metrics(), method.final_metrics()
    metric = space.tune.metric
    if isinstance(space.tune.search_alg, OptunaSearch) and space.grid_keys():
        raise ConfigError(f"{label}: search.{space.grid_keys()[0]}: optuna proposes every value itself; a grid "
                          "crosses all of them: use choice (or uniform / loguniform / randint), or search_alg: basic")
    if isinstance(space.tune.scheduler, AshaScheduler) and metric not in per_epoch:
        raise ConfigError(f"{label}: tune.metric: ASHA needs a metric reported every epoch; {metric!r} is not one "
                          f"of {', '.join(sorted(per_epoch))}")
    if metric not in per_epoch | final:
        raise ConfigError(f"{label}: tune.metric: method {probe.method!r} does not produce {metric!r}; choose one "
                          f"of {', '.join(sorted(per_epoch | final))}")
    if isinstance(space.tune.scheduler, AshaScheduler) and space.tune.scheduler.max_t > probe.epochs:
        raise ConfigError(f"{label}: tune.scheduler.max_t: {space.tune.scheduler.max_t} is more than the "
                          f"{probe.epochs} epochs a trial trains; set max_t <= epochs")


#: the search spaces shipped beside the package (a checkout, or the node image's copy)
SHIPPED_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def find_search_space(path: str | Path) -> Path:
    """``path`` if it is a file, else the shipped space it names from any directory
    (``search_spaces/NAME.yaml``, ``NAME.yaml`` or ``NAME``); ConfigError listing them otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("search_spaces")):
        for candidate in (SHIPPED_SPACES / path.name, SHIPPED_SPACES / f"{path.name}.yaml"):
            if candidate.is_file():
                return candidate
    shipped = ", ".join(sorted(p.stem for p in SHIPPED_SPACES.glob("*.yaml")))
    raise ConfigError(f"search space {path} does not exist; shipped ones (by name, from anywhere): {shipped or 'none'}")


def _canonical_search_keys(search: Any, path: Path) -> Any:
    """``search`` with MIX'EM's lambda names as the keys they alias; one key given under two
    names is refused (one of its grids would be dropped without a word)."""
    if not isinstance(search, dict):
        return search
    out: dict[str, Any] = {}
    named: dict[str, str] = {}
    for key, value in search.items():
        canonical = LAMBDA_ALIASES.get(key, key)
        if canonical in out:
            raise ConfigError(f"{path}: search.{key} and search.{named[canonical]} are the same key ({canonical}); "
                              f"search it once")
        out[canonical], named[canonical] = value, key
    return out


def load_search_space(path: str | Path, extra_overrides: Sequence[str] = ()) -> tuple[SearchSpace, dict[str, Any], str]:
    """Read and validate a search-space file -> (space, raw base config, the file's text)."""
    path = find_search_space(path)
    text = read_config_text(path, "search space")
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (base, search, tune, ...)")
    data["search"] = _canonical_search_keys(data.get("search") or {}, path)
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), SearchSpace)) from None
    base = resolve_base(space, path, extra_overrides)
    check_space(space, base, str(path))
    return space, base, text


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep, before Ray starts: what ``sweep --dry-run`` prints and ``run_sweep`` runs."""

    space: SearchSpace
    #: the resolved base config (raw; every trial applies its searched values to it), its
    #: ``tracking.experiment`` set to the sweep's name
    base: dict[str, Any]
    #: the search-space file's text (logged to the parent run)
    text: str
    #: the sweep's name = its MLflow experiment
    name: str
    #: the search-space file, as given
    path: str

    def resume_command(self) -> str:
        """The command that continues this sweep after an interruption."""
        named = self.name != (self.space.name or Path(self.path).stem)
        return f"clusterlab sweep {self.path} --resume" + (f" --experiment {self.name}" if named else "")


def plan_sweep(path: str | Path, overrides: Sequence[str] = (), name: str | None = None) -> SweepPlan:
    """Load and validate the search space, resolve its base, and name the sweep: ``name``
    (``--experiment``), else the space's ``name:``, else the file's stem; refused where it would break
    MLflow filters or storage paths."""
    space, base, text = load_search_space(path, overrides)
    name = name or space.name or Path(path).stem
    if not re.fullmatch(SAFE_NAME, name):
        raise ConfigError(f"sweep name {name!r}: use letters, digits, '_', '.', '-' only, starting with a letter or "
                          "digit (it names the MLflow experiment, MLflow search filters and a storage directory)")
    base.setdefault("tracking", {})["experiment"] = name
    root = build_config(base, f"{path}: base").data.root
    if root is not None:
        # Absolute here: trials validate the base again in their Tune actor's working directory.
        base.setdefault("data", {})["root"] = str(root)
    return SweepPlan(space, base, text, name, str(path))


def trial_plan(space: SearchSpace) -> list[str]:
    """What Tune will run, one line per trial: the grid point and, for the sampled keys, their
    domain (``--dry-run`` prints it)."""
    sampled = " ".join(f"{k}~{d.kind}{list(getattr(d, d.kind))}" for k, d in space.search.items() if d.kind != "grid")
    points = grid_points(space)
    lines = []
    for repeat in range(space.tune.num_samples):
        for point in points:
            values = " ".join(f"{k}={json.dumps(v)}" for k, v in point.items())
            lines.append(f"trial {len(lines) + 1:>3}: {' '.join(s for s in (values, sampled) if s)}")
    scheduler = space.tune.scheduler
    asha = (f" (max_t {scheduler.max_t}, grace {scheduler.grace_period}, reduction {scheduler.reduction_factor:g})"
            if isinstance(scheduler, AshaScheduler) else "")
    return [f"{space.trial_count()} trials, scheduler {scheduler.name}{asha}, search {space.tune.search_alg.name}, "
            f"best trial by {space.tune.metric} "
            f"({space.tune.mode}), sampling seed {space.tune.seed}", *lines]


def grid_points(space: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of the grid keys (what the heatmap's cells are)."""
    keys = space.grid_keys()
    return [dict(zip(keys, values)) for values in product(*(space.search[k].grid or [] for k in keys))]
