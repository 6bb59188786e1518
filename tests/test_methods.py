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
    baselines = ["pixels", "pixels_umap", "pixels_tsne"]
    assert prefixes == ["kmeans_norm", "kmeans_raw", "umap_kmeans", "head", *baselines]
    assert [p for _, p in result_rows()] == ["kmeans_norm", "kmeans_raw", "umap_kmeans", "maxcomp", "kmeans_mixinit",
                                             "head", *baselines]
    # LSD-C Tables 2-4 report the cluster head; MIX'EM Table 1 row 6 the mixture-initialised K-means
    assert spec_for("lsdc").headline_metric in spec_for("lsdc").final_metrics()
    assert spec_for("mixem").headline_metric == "kmeans_mixinit_acc"


TOY_METHOD = '''"""A method no clusterlab module knows: a linear head tells flipped images from upright ones."""
import torch
import torch.nn.functional as F
from torch import nn

from clusterlab.data.augment import Normalize
from clusterlab.models import build_backbone
from clusterlab.trainers import DataMeta, Method, register


@register("toy_flip")
class ToyFlip(Method):
    def __init__(self, cfg, data: DataMeta) -> None:
        super().__init__(cfg, data)
        self.backbone, dim = build_backbone(cfg.model, data.image_size)
        self.head = nn.Linear(dim, 2)
        self.normalize = Normalize(data.mean, data.std)

    def make_views(self, images):
        return [self.normalize(images)]

    def representation(self, x):
        return self.backbone(x)

    def forward(self, views):
        x = torch.cat([views[0], views[0].flip(3)])
        labels = torch.arange(2, device=x.device).repeat_interleave(len(views[0]))
        logits = self.head(self.backbone(x)).float()
        accuracy = (logits.argmax(1) == labels).float().mean().detach()
        return {"terms": {"flip": F.cross_entropy(logits, labels)}, "stats": {"flip_acc": accuracy}}
'''
# Every Python process started with this directory on PYTHONPATH (the command, Ray's workers,
# the evaluation) registers the spec; the implementation module is imported where a model is built.
TOY_SPEC = '''from clusterlab.methods import MethodSpec, register_spec
register_spec(MethodSpec("toy_flip", loss_terms=("flip",), default_weights={"flip": 1.0}, epoch_stats=("flip_acc",),
                         module="toy_flip_method"))
'''


@pytest.mark.ray
def test_a_method_registered_outside_the_package_trains_end_to_end_through_train(tmp_path):
    """Nothing in platform/ or the CLI names a method: one registered by this test (its spec, its
    module) trains on Ray Train, is evaluated, and lands in MLflow like the shipped ones."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "toy_flip_method.py").write_text(TOY_METHOD)
    (plugin / "sitecustomize.py").write_text(TOY_SPEC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "CLUSTERLAB_TRACKING_URI": uri,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "clusterlab.cli", "train", "method=toy_flip", "model.backbone=small_cnn",
                          "model.cnn_width=8", "epochs=2", "batch_size=64", "eval.kmeans_n_init=2",
                          "eval.raw_pixels_baseline=false", f"storage_path={tmp_path / 'ray'}",
                          "tracking.experiment=toy", "--run-name", "toy"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "toy_flip"
    assert {"train_loss_flip", "flip_acc", "kmeans_norm_acc"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "flip_acc")] == [1, 2]
    assert not any(key.startswith(("mixem.", "lsdc.", "excb.")) for key in run.data.params)
