"""Method specs (clusterlab/methods.py): what each method declares is what it does.

The platform reads loss terms, per-epoch statistics, evaluation readings and the config
section from the torch-free spec; these tests hold each implementation to its spec.
"""

from __future__ import annotations

import pytest
import torch

from clusterlab.config import flatten, load_config
from clusterlab.methods import SPECS, result_rows, spec_for
from clusterlab.trainers import METHODS, DataMeta, build_method

SIZE = 16


def test_every_spec_has_an_implementation_and_every_implementation_a_spec():
    assert set(METHODS) == set(SPECS)
    assert all(METHODS[name].spec is SPECS[name] for name in SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_training_step_returns_exactly_the_declared_loss_terms_and_epoch_stats(name):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.cnn_width=8", "batch_size=8"], preset=f"{name}_digits")
    method = build_method(cfg, DataMeta(10, SIZE, (0.5,) * 3, (0.25,) * 3)).train()
    images = torch.randint(0, 256, (32, 3, SIZE, SIZE), dtype=torch.uint8)
    method.initialise(images, lambda x, k: x[:k].clone())  # ExCB seeds its 30 centroids; others ignore it
    out = method(method.make_views(images[:8]))
    spec = spec_for(name)
    assert tuple(out["terms"]) == spec.loss_terms
    assert set(out.get("stats", {})) == set(spec.epoch_stats)
    assert torch.isfinite(method.total_loss(out["terms"]))


def test_a_runs_params_hold_its_own_methods_section_only():
    sections = {spec.config_section for spec in SPECS.values()} - {None}
    assert sections == {"mixem", "lsdc", "excb"}
    for name in SPECS:
        prefixes = {key.split(".")[0] for key in flatten(load_config(None, preset=f"{name}_digits"))}
        own = SPECS[name].config_section
        assert prefixes & sections == ({own} if own else set()), name


def test_an_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown method 'dec'; allowed: excb, lsdc, mixem, rotnet, simclr"):
        spec_for("dec")


def test_result_tables_show_the_readings_of_the_methods_asked_for():
    prefixes = [prefix for _, prefix in result_rows(["lsdc"])]
    assert prefixes == ["kmeans_norm", "kmeans_raw", "head", "pixels"]
    assert [p for _, p in result_rows()] == ["kmeans_norm", "kmeans_raw", "maxcomp", "kmeans_mixinit", "head", "pixels"]
    # LSD-C Tables 2-4 report the cluster head; MIX'EM Table 1 row 6 the mixture-initialised K-means
    assert spec_for("lsdc").headline_metric in spec_for("lsdc").final_metrics()
    assert spec_for("mixem").headline_metric == "kmeans_mixinit_acc"
