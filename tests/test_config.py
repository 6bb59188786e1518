"""Config: layering, YAML numbers, overrides, and rejection of bad input naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterlab.config import PRESETS, ConfigError, apply_overrides, build_config, flatten, load_config, parse_yaml


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
    # Silent in the paper: the released config.yaml's weight decay and gaussian_blur.py's 50% blur.
    assert cfg.optim.weight_decay == pytest.approx(1e-5) and cfg.augment.blur_p == 0.5


@pytest.mark.parametrize(
    ("preset", "cosine", "temperature", "k"),
    [("lsdc_cifar10", 0.9, 1.0, 20), ("lsdc_cifar100_20", 0.95, 0.5, 10), ("lsdc_stl10", None, 0.5, None)],
)
def test_lsdc_presets_carry_supplementary_table_1_thresholds(preset, cosine, temperature, k):
    opts = load_config(None, ["data.root=/data"], preset=preset).lsdc
    assert opts.sne_threshold == 0.01 and opts.sne_temperature == temperature
    if cosine is not None:
        assert opts.cosine_threshold == cosine and opts.k == k
    # `threshold` is the tau of the selected labelling.
    for labeling, field in (("cosine", "cosine_threshold"), ("l2", "l2_threshold"), ("sne", "sne_threshold")):
        assert opts.model_copy(update={"labeling": labeling}).threshold == getattr(opts, field)


def test_the_old_shared_lsdc_threshold_names_the_new_fields(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("preset: lsdc_cifar10\ndata: {root: /data}\nlsdc: {labeling: sne, threshold: 0.01}\n")
    for args in ((path, []), (None, ["data.root=/data", "lsdc.threshold=0.9"])):
        with pytest.raises(ConfigError) as err:
            load_config(*args, preset=None if args[0] else "lsdc_cifar10")
        message = str(err.value)
        assert "lsdc:" in message and "'threshold'" in message
        assert all(f in message for f in ("cosine_threshold", "l2_threshold", "sne_threshold"))


@pytest.mark.parametrize(
    ("overrides", "weight_decay"),
    [
        (["lsdc.composition=mixup"], 1e-4),  # LSD-C supplementary Sec. 1: MixUp needs 1e-4
        (["lsdc.composition=mixup", "optim.weight_decay=3e-4"], 3e-4),  # the user's value wins
        (["optim.weight_decay=3e-4", "lsdc.composition=mixup"], 3e-4),
        (["lsdc.composition=ricap"], 5e-4),  # the preset's (main paper Sec. 4)
        ([], 5e-4),
        (["lsdc.composition=none"], 5e-4),
    ],
)
def test_lsdc_mixup_lowers_the_weight_decay_unless_the_user_sets_it(overrides, weight_decay):
    cfg = load_config(None, ["data.root=/data", *overrides], preset="lsdc_cifar10")
    assert cfg.optim.weight_decay == pytest.approx(weight_decay)


def test_lsdc_mixup_weight_decay_from_a_file(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("preset: lsdc_cifar10\ndata: {root: /data}\nlsdc: {composition: mixup}\n")
    assert load_config(path).optim.weight_decay == pytest.approx(1e-4)
    path.write_text("preset: lsdc_cifar10\ndata: {root: /data}\nlsdc: {composition: mixup}\n"
                    "optim: {weight_decay: 2e-4}\n")
    assert load_config(path).optim.weight_decay == pytest.approx(2e-4)
    # Other methods keep theirs even if their (unused) lsdc section says mixup.
    assert load_config(None, ["lsdc.composition=mixup"], preset="simclr_digits").optim.weight_decay == pytest.approx(1e-6)


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


def test_lsdc_presets_train_and_evaluate_on_the_whole_dataset():
    """LSD-C Sec. 4: "we train and test the methods on the whole dataset"; its RotNet
    pretraining stage is evaluated the same way, and so is every MNIST preset (the MNIST
    clustering protocol). The other presets keep the test split."""
    for name, raw in PRESETS.items():
        overrides = [] if raw["data"]["name"] == "digits" else ["data.root=/data"]
        cfg = load_config(None, overrides, preset=name)
        if name.startswith("lsdc_"):
            assert (cfg.data.protocol, cfg.eval.split) == ("train+test", "all"), name
        elif name.endswith("_mnist"):  # the MNIST clustering protocol, for every method
            assert (cfg.data.protocol, cfg.eval.split) == ("train+test", "all"), name
        elif name.startswith("rotnet_"):
            assert cfg.eval.split == "all", name
        else:
            assert cfg.eval.split == "test", name
    cfg = load_config(None, [], preset="rotnet_digits")
    assert cfg.eval.kmeans_n_init == 20  # the preset's own eval keys survive the merge
    assert flatten(load_config(None, ["eval.split=all"], preset="simclr_digits"))["eval.split"] == "all"
    with pytest.raises(ConfigError, match="eval.split"):
        load_config(None, ["eval.split=train"], preset="simclr_digits")


@pytest.mark.parametrize("labeling,field", [("cosine", "cosine_threshold"), ("sne", "sne_threshold"),
                                            ("l2", "l2_threshold"), ("knn", None)])
def test_checkpoints_from_before_the_threshold_split_still_load(labeling, field):
    """A checkpoint's stored config with the old shared lsdc.threshold keeps its meaning."""
    from clusterlab.config import build_stored_config

    stored = load_config(None, [f"lsdc.labeling={labeling}"], preset="lsdc_digits").model_dump(mode="json")
    for name in ("cosine_threshold", "l2_threshold", "sne_threshold"):
        del stored["lsdc"][name]
    stored["lsdc"]["threshold"] = 0.42
    cfg = build_stored_config(stored, "old checkpoint")
    assert cfg.lsdc.labeling == labeling
    if field is not None:
        assert getattr(cfg.lsdc, field) == 0.42 and cfg.lsdc.threshold == 0.42
    with pytest.raises(ConfigError, match="threshold"):
        build_config(stored, "a user's config")  # only stored configs are carried over


def test_excb_local_crops_are_refused_on_the_single_size_mnist_net():
    with pytest.raises(ConfigError, match="excb.local_crops.*iic_vgg4"):
        load_config(None, ["model.backbone=iic_vgg4"], preset="excb_digits")
    assert load_config(None, ["model.backbone=iic_vgg4", "excb.local_crops=0"], preset="excb_digits").excb.local_crops == 0


def test_a_relative_data_root_is_resolved_where_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ray Train workers start elsewhere: the config must carry an absolute path
    assert load_config(None, ["data.root=data"], preset="simclr_cifar10").data.root == tmp_path / "data"
    assert str(load_config(None, ["data.root=~/d"], preset="simclr_cifar10").data.root) == "~/d"  # per node
