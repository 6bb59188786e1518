"""One resolution of a config for `train`, `config` and `sweep` (clusterlab.config.resolve_raw).

Precedence, later winning: defaults < preset < YAML file < the search space's overrides and
resources < the command line; a sweep's searched values vary per trial on top, and the command
line may not fix a searched key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clusterlab import cli
from clusterlab.config import PRESETS, ConfigError, load_config
from clusterlab.search_space import load_search_space, trial_config

PRESET_EPOCHS = PRESETS["simclr_digits"]["epochs"]


def _files(tmp_path: Path, base: str, space: str) -> Path:
    (tmp_path / "base.yaml").write_text(base)
    path = tmp_path / "space.yaml"
    path.write_text(space)
    return path


@pytest.mark.parametrize("file_epochs, space_epochs, command_line, expected", [
    (None, None, [], PRESET_EPOCHS),   # the preset the file names
    (7, None, [], 7),                  # the file over the preset
    (7, 8, [], 8),                     # the space's overrides over the file
    (7, 8, ["epochs=9"], 9),           # the command line over everything
])
def test_each_layer_wins_over_the_ones_below_it(tmp_path, file_epochs, space_epochs, command_line, expected):
    base = "preset: simclr_digits\n" + (f"epochs: {file_epochs}\n" if file_epochs else "")
    space = "base: base.yaml\nsearch: {seed: {grid: [0, 1]}}\n" + (f"overrides: {{epochs: {space_epochs}}}\n"
                                                                    if space_epochs else "")
    _, base_raw, _ = load_search_space(_files(tmp_path, base, space), command_line)
    assert trial_config(base_raw, {"seed": 1}).epochs == expected
    # `clusterlab train` on the same file and command line resolves the same way (no space layer).
    train_expected = expected if space_epochs is None or command_line else file_epochs
    assert load_config(tmp_path / "base.yaml", command_line).epochs == train_expected


def test_searched_values_win_over_the_space_overrides_and_the_command_line_may_not_fix_them(tmp_path):
    path = _files(tmp_path, "preset: simclr_digits\n", "base: base.yaml\noverrides: {epochs: 8}\n"
                                                       "search: {epochs: {grid: [4, 5]}}\n")
    _, base_raw, _ = load_search_space(path)
    assert [trial_config(base_raw, {"epochs": e}).epochs for e in (4, 5)] == [4, 5]
    with pytest.raises(ConfigError, match=r"override 'epochs=9': epochs is searched by the space \(search.epochs\)"):
        load_search_space(path, ["epochs=9"])


def test_command_line_resources_win_over_the_space_resources_block(tmp_path):
    """The bug: the space's `resources:` replaced the section after the command line, so
    `resources.max_failures=3` (spot resilience) was silently dropped."""
    path = _files(tmp_path, "preset: simclr_digits\nresources: {max_failures: 2}\n",
                  "base: base.yaml\nsearch: {seed: {grid: [0]}}\nresources: {num_workers: 1, cpus_per_worker: 1}\n")
    cfg = trial_config(load_search_space(path, ["resources.cpus_per_worker=2", "resources.max_failures=3"])[1], {})
    assert (cfg.resources.cpus_per_worker, cfg.resources.max_failures) == (2, 3)
    cfg = trial_config(load_search_space(path)[1], {})
    assert (cfg.resources.cpus_per_worker, cfg.resources.max_failures) == (1, 2)  # the base's own field is kept


def test_a_base_file_without_preset_gets_the_implicit_preset_as_under_train(tmp_path):
    """The bug: the same YAML trained the simclr_digits preset's recipe under `train` but the bare
    defaults (100 epochs, resnet18) as a sweep base."""
    path = _files(tmp_path, "method: simclr\ndata: {name: digits}\n", "base: base.yaml\nsearch: {seed: {grid: [0]}}\n")
    swept = trial_config(load_search_space(path)[1], {})
    trained = load_config(tmp_path / "base.yaml")
    assert swept.epochs == trained.epochs == PRESET_EPOCHS
    assert swept.model_dump() == trained.model_dump()


def test_a_command_line_preset_wins_over_the_files_preset_key(tmp_path):
    (tmp_path / "base.yaml").write_text("preset: simclr_digits\n")
    assert load_config(tmp_path / "base.yaml", preset="mixem_digits").method == "mixem"
    (tmp_path / "base.yaml").write_text("preset: no_such\n")
    with pytest.raises(ConfigError, match="base.yaml: preset: unknown preset 'no_such'"):
        load_config(tmp_path / "base.yaml")


def test_sweep_dry_run_prints_the_resolved_base_and_every_trial(tracking_uri, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "mixem_loss_weights_digits.yaml"
    assert cli.main(["sweep", str(space), "resources.max_failures=3", "--name", "planned", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  max_failures: 3\n" in out and "  experiment: planned\n" in out
    trials = [line for line in out.splitlines() if line.startswith("# trial ")]
    assert len(trials) == 4 and "# trial   4: loss.weights.push=0.1 loss.weights.pull=0.1" in trials
    assert "# 4 trials, scheduler fifo" in out
    assert not (tmp_path / "mlflow.db").exists() and not Path(tracking_uri.removeprefix("sqlite:///")).exists()


@pytest.mark.parametrize("argv, code", [
    (["config", "--preset", "simclr_digits"], 0),
    (["sweep", "search_spaces/mixem_loss_weights_digits.yaml", "--dry-run"], 0),
    (["train", "method=dec"], 2),
    (["train", "--preset", "lsdc_digits", "loss.weights.contrast=1"], 2),
    (["sweep", "search_spaces/mixem_loss_weights_digits.yaml", "loss.weights.push=0.5"], 2),
    (["train", "--preset", "lsdc_mnist", "data.root=/nonexistent-clusterlab-data"], 2),
    (["train", "storage_path=README.md"], 2),
    (["sweep", "search_spaces/lsdc_mnist_seeds.yaml", "--data-root", "/nonexistent-clusterlab-data"], 2),
])
def test_config_answers_and_bad_configs_import_neither_torch_ray_nor_mlflow(argv, code):
    """What needs none of them answers without their import time (measured: 0.2 s instead of
    2-4 s on 2 cores); a wrong dataset path or storage_path too (4.5 s before
    ``platform/preflight.py``)."""
    script = (f"import sys; from clusterlab import cli; code = cli.main({argv!r}); "
              "print(code, sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.splitlines()[-1] == f"{code} []"


def test_a_preset_override_is_the_preset_flag_and_the_two_must_agree():
    assert load_config(None, ["preset=lsdc_digits"]) == load_config(None, [], preset="lsdc_digits")
    assert load_config(None, ["preset=lsdc_digits"], preset="lsdc_digits").method == "lsdc"
    with pytest.raises(ConfigError, match="--preset simclr_digits and the override preset=lsdc_digits disagree"):
        load_config(None, ["preset=lsdc_digits"], preset="simclr_digits")
    with pytest.raises(ConfigError, match="override preset: unknown preset 'nope'"):
        load_config(None, ["preset=nope"])
