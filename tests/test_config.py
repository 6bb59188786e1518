"""Config: layering, YAML numbers, overrides, and rejection of bad input naming the field."""

from __future__ import annotations

import pytest

from clusterlab.config import PRESETS, ConfigError, apply_overrides, flatten, load_config, parse_yaml


def test_yaml_scientific_notation_is_a_number():
    # PyYAML's YAML 1.1 reads `1e-4` as a string; researchers mean a number.
    assert parse_yaml("lr: 1e-4")["lr"] == pytest.approx(1e-4)
    assert parse_yaml("lr: 5.0e-4")["lr"] == pytest.approx(5e-4)
    assert parse_yaml("name: cifar10")["name"] == "cifar10"


def test_layers_defaults_preset_file_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: simclr_digits\nepochs: 7\noptim:\n  lr: 1e-3\n")
    cfg = load_config(path, ["optim.lr=3e-4", "model.embedding_dim=32"])
    assert cfg.epochs == 7  # file beats preset
    assert cfg.optim.lr == pytest.approx(3e-4)  # override beats file
    assert cfg.model.embedding_dim == 32
    assert cfg.model.backbone == "small_cnn"  # from the preset
    assert cfg.optim.weight_decay == pytest.approx(1e-6)  # field default


@pytest.mark.parametrize(
    ("dataset", "lr", "protocol"),
    [("stl10", 1e-4, "train+unlabeled"), ("cifar10", 5e-4, "train"), ("cifar100_20", 5e-4, "train")],
)
def test_paper_presets_follow_mixem_supplementary(dataset, lr, protocol):
    # MIX'EM supplementary 1.1: lr 1e-4 STL10 / 5e-4 CIFAR, cosine decay, batch 512; 1.2: augmentation.
    cfg = load_config(None, [f"data.name={dataset}", "data.root=/data"])
    assert cfg.optim.lr == pytest.approx(lr)
    assert (cfg.optim.schedule, cfg.batch_size, cfg.epochs, cfg.data.protocol) == ("cosine", 512, 600, protocol)
    assert cfg.augment.crop_scale == (0.08, 1.0)
    assert cfg.augment.jitter == (0.8, 0.8, 0.8, 0.2)
    assert (cfg.augment.jitter_p, cfg.augment.grayscale_p, cfg.augment.hflip_p) == (0.8, 0.2, 0.5)


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        (["optim.lrr=3"], "optim.lrr", "allowed keys here: name, lr"),
        (["bogus=1"], "bogus", "allowed keys here: method, data"),
        (["optim.lr=0"], "optim.lr", "greater than 0"),
        (["optim.lr=-1e-3"], "optim.lr", "greater than 0"),
        (["optim.lr=fast"], "optim.lr", "valid number"),
        (["loss.weights={contrast: -1}"], "loss.weights", ">= 0"),
        (["loss.weights={push: 1}"], "unknown terms", "allowed: contrast"),
        (["data.name=imagenet"], "data.name", "'cifar10'"),
        (["method=dino"], "method", "allowed: excb, lsdc, mixem, rotnet, simclr"),
        (["optim.name=lamb"], "optim.name", "'adam' or 'sgd'"),
        (["batch_size=1"], "batch_size", "greater than or equal to 2"),
        (["epochs=0"], "epochs", "greater than or equal to 1"),
        (["data.protocol=train+unlabeled"], "data.protocol", "stl10"),
        (["data.name=cifar10"], "data.root", "--data-root"),
        (["augment.crop_scale=[0.9,0.1]"], "augment.crop_scale", "low <= high"),
        (["augment.blur_kernel=4"], "augment.blur_kernel", "odd"),
        (["optim.warmup_epochs=500", "epochs=10"], "optim.warmup_epochs", "< epochs"),
        (["resources.num_workers=3", "batch_size=256"], "resources.num_workers", "divisible"),
        (["run_name=a/b"], "run_name", "letters, digits"),
        (["data.val_fraction=1.5"], "data.val_fraction", "less than 1"),
    ],
)
def test_invalid_config_names_the_field(overrides, field, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, preset="simclr_digits")
    assert field in str(err.value) and hint in str(err.value)


def test_unknown_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="allowed: excb_cifar10, excb_cifar100_20, "):
        load_config(None, [], preset="nope")
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_flatten_gives_dotted_params():
    flat = flatten(load_config(None, [], preset="simclr_digits"))
    assert flat["optim.lr"] == "0.002" and flat["data.name"] == "digits" and flat["method"] == "simclr"


def test_every_preset_is_valid():
    for name, raw in PRESETS.items():
        overrides = [] if raw["data"]["name"] == "digits" else ["data.root=/data"]
        load_config(None, overrides, preset=name)


def test_overrides_may_follow_the_options():
    """`ray job submit ... -- clusterlab sweep space.yaml --address auto epochs=2` must not be
    refused for putting an override last; anything else unknown still is (exit 2)."""
    from clusterlab.cli import parse_args

    args = parse_args(["sweep", "space.yaml", "epochs=3", "--address", "auto", "storage_path=/mnt/shared/r"])
    assert args.space == "space.yaml" and args.address == "auto"
    assert args.overrides == ["epochs=3", "storage_path=/mnt/shared/r"]
    with pytest.raises(SystemExit) as exc:
        parse_args(["sweep", "space.yaml", "--address", "auto", "--no-such-flag"])
    assert exc.value.code == 2
