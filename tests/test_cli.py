"""The command line's shared conventions: one name per option across commands, options that
stand for config keys, `--resume auto`, `--version`, and the trial names the MLflow UI shows."""

from __future__ import annotations

import pytest

from clusterlab import __version__, cli
from clusterlab.config import ConfigError
from clusterlab.platform.sweep import trial_display_name

SPACE = "search_spaces/mixem_loss_weights_digits.yaml"


def test_run_options_set_the_config_keys_they_name(tmp_path):
    args = cli.parse_args(["train", "--preset", "simclr_digits", "--experiment", "e1", "--tracking-uri",
                           f"sqlite:///{tmp_path}/x.db", "--tag", "team=vision", "--tag", "version=2",
                           "--note", "a: note, with YAML in it", "--init-from", str(tmp_path), "--data-root",
                           str(tmp_path)])
    cfg = cli._load(args)
    assert cfg.tracking.experiment == "e1" and cfg.tracking.uri == f"sqlite:///{tmp_path}/x.db"
    assert cfg.tracking.tags == {"team": "vision", "version": "2"}  # text, even where YAML reads a number
    assert cfg.tracking.note == "a: note, with YAML in it"
    assert cfg.init_from == str(tmp_path) and cfg.data.root == tmp_path


@pytest.mark.parametrize("tag, message", [
    ("team", "--tag 'team': write KEY=VALUE"),
    ("a.b=1", "without '.'"),
    ("mlflow.user=me", "without '.'"),
    ("clusterlab_x=1", None),
])
def test_a_tag_must_be_key_value_outside_the_reserved_names(tag, message):
    args = cli.parse_args(["train", "--tag", tag])
    if message is None:
        assert cli._load(args).tracking.tags == {"clusterlab_x": "1"}
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cli._load(args)


def test_reserved_tag_names_are_refused_from_a_yaml_file_too(tmp_path):
    (tmp_path / "run.yaml").write_text("tracking: {tags: {mlflow.source.name: spoofed}}\n")
    with pytest.raises(ConfigError, match="tracking.tags"):
        cli._load(cli.parse_args(["train", str(tmp_path / "run.yaml")]))


def test_sweep_takes_the_same_run_options_and_the_old_name_flag():
    args = cli.parse_args(["sweep", SPACE, "--experiment", "mine", "--tag", "a=b", "--init-from", "RUN",
                           "--tracking-uri", "sqlite:///s.db"])
    assert args.experiment == "mine" and cli._run_overrides(args) == [
        'init_from="RUN"', 'tracking.uri="sqlite:///s.db"', 'tracking.tags.a="b"']
    assert cli.parse_args(["sweep", SPACE, "--name", "old"]).experiment == "old"


@pytest.mark.parametrize("argv, resume, overrides", [
    ([SPACE], None, []),
    ([SPACE, "--resume"], "yes", []),
    ([SPACE, "--resume", "auto"], "auto", []),
    ([SPACE, "--resume", "epochs=2"], "yes", ["epochs=2"]),  # an override after a bare --resume
    ([SPACE, "epochs=2", "--resume", "auto", "batch_size=64"], "auto", ["epochs=2", "batch_size=64"]),
])
def test_resume_is_a_flag_or_auto(argv, resume, overrides):
    args = cli.parse_args(["sweep", *argv])
    assert args.resume == resume and args.overrides == overrides


def test_resume_refuses_other_values(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["sweep", SPACE, "--resume", "always"])
    assert exit_.value.code == 2 and "'always' is not `auto`" in capsys.readouterr().err


def test_version_and_the_methods_in_the_top_level_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out == f"clusterlab {__version__}\n"
    help_text = cli.build_parser().format_help()
    assert all(name in help_text for name in ("simclr", "mixem", "rotnet", "lsdc", "excb"))


@pytest.mark.parametrize("name", ["digits", "imagefolder"])
def test_datasets_that_cannot_be_downloaded_say_so(name, capsys):
    assert cli.main(["data", "download", name]) == 2
    assert f"data download {name}: {name} is not downloaded by clusterlab" in capsys.readouterr().err


@pytest.mark.parametrize("params, shown", [
    ({"loss.weights.push": 0.1, "loss.weights.pull": 1e-38 * 1e38}, "push=0.1 pull=1 [t_00001]"),
    ({"optim.lr": 0.000123456789}, "lr=0.0001235 [t_00001]"),
    ({"optim.lr": 0.1, "lsdc.lr": 2}, "optim.lr=0.1 lsdc.lr=2 [t_00001]"),  # short keys would collide
    ({}, "t_00001"),
])
def test_trials_are_named_by_their_searched_values(params, shown):
    assert trial_display_name(params, "t_00001") == shown
