"""The training loop in-process (world size 1, no Ray): epochs, checkpoints, resume, schedule."""

from __future__ import annotations

import math

import pytest
import torch

from clusterlab.config import load_config
from clusterlab.platform.loop import PREEMPTION_STEP_KEY, LocalSession, fit
from clusterlab.trainers.checkpoint import method_from_checkpoint, read_checkpoint
from clusterlab.trainers.optim import lr_factor

FAST = ["batch_size=128", "data.val_fraction=0.1", "optim.warmup_epochs=0", "model.cnn_width=8"]


def _cfg(*overrides: str):
    return load_config(None, [*FAST, *overrides], preset="simclr_digits")


def test_fit_reports_every_epoch_and_checkpoints(tmp_path):
    session = LocalSession(tmp_path)
    fit(_cfg("epochs=2"), session)
    assert [m["epoch"] for m in session.history] == [1.0, 2.0]
    for m in session.history:
        assert {"train_loss", "train_loss_contrast", "val_loss", "lr", "images_per_second"} <= set(m)
        assert all(math.isfinite(v) for v in m.values())
    state = read_checkpoint(session.latest_checkpoint())
    assert state["epochs_done"] == 2 and state["meta"]["num_classes"] == 10
    method, cfg, meta = method_from_checkpoint(state)
    assert cfg.epochs == 2 and meta.image_size == 16
    assert method.representation(torch.zeros(2, 3, 16, 16)).shape == (2, 16)  # 2 x cnn_width


class _Crash(RuntimeError):
    pass


class CrashingSession(LocalSession):
    """Dies right after the n-th epoch's checkpoint, like a killed worker."""

    def __init__(self, directory, crash_after: int) -> None:
        super().__init__(directory)
        self.crash_after = crash_after

    def report(self, metrics, checkpoint_dir) -> None:
        super().report(metrics, checkpoint_dir)
        if len(self.history) == self.crash_after:
            raise _Crash


def test_resume_after_a_crash_continues_from_the_last_checkpoint(tmp_path):
    cfg = _cfg("epochs=3")
    full = LocalSession(tmp_path / "full")
    fit(cfg, full)

    with pytest.raises(_Crash):
        fit(cfg, CrashingSession(tmp_path / "resumed", crash_after=2))
    again = LocalSession(tmp_path / "resumed")
    fit(cfg, again)  # picks up epoch_0002 and trains epoch 3 only
    assert [m["epoch"] for m in again.history] == [3.0]
    # The lr schedule continues where it stopped rather than restarting.
    assert again.history[0]["lr"] == pytest.approx(full.history[2]["lr"], rel=1e-6)
    assert read_checkpoint(again.latest_checkpoint())["epochs_done"] == 3


class PreemptedSession(LocalSession):
    """Its node gets a preemption notice the n-th time the loop asks, and is gone as soon as the
    checkpoint taken on the notice has been handed over (the run dies there)."""

    def __init__(self, directory, notice_at_ask: int) -> None:
        super().__init__(directory)
        self.notice_at_ask, self.asks = notice_at_ask, 0

    def preemption_notice(self) -> bool:
        self.asks += 1
        return self.asks == self.notice_at_ask

    def report(self, metrics, checkpoint_dir) -> None:
        super().report(metrics, checkpoint_dir)
        if PREEMPTION_STEP_KEY in metrics:
            raise _Crash


def test_a_preemption_notice_checkpoints_the_epoch_so_far_and_the_restart_continues_at_that_step(tmp_path):
    """Ray 2.60's just-in-time checkpoint (ray.train.get_preemption_info): asked every 4 steps
    (digits: 12 steps per epoch, so at steps 4, 8, 12), the 5th ask (epoch 2, step 8) gets the
    notice; the restarted run trains epoch 2 from step 9, not from its start."""
    cfg = _cfg("epochs=3", "resources.preemption_check_steps=4")
    full = LocalSession(tmp_path / "full")
    fit(cfg, full)

    preempted = PreemptedSession(tmp_path / "preempted", notice_at_ask=5)
    with pytest.raises(_Crash):
        fit(cfg, preempted)
    assert preempted.asks == 5
    checkpoint = preempted.latest_checkpoint()
    assert checkpoint.name == "epoch_0001_step_000008"  # after epoch 1's, before epoch 2's
    state = read_checkpoint(checkpoint)
    assert state["epochs_done"] == 1 and state["epoch_progress"]["step"] == 8
    assert set(state["epoch_progress"]["sums"]) == {"loss", "loss_contrast"}
    jit_report = preempted.history[-1]
    assert jit_report[PREEMPTION_STEP_KEY] == 8 and jit_report["epoch"] == 1.0  # epoch 1's metrics, not a new epoch

    again = LocalSession(tmp_path / "preempted")
    fit(cfg, again)
    assert [m["epoch"] for m in again.history] == [2.0, 3.0]
    assert again.history[0]["lr"] == pytest.approx(full.history[1]["lr"], rel=1e-6)  # epoch 2's first step's
    steps = [read_checkpoint(s.latest_checkpoint())["scheduler"]["last_epoch"] for s in (full, again)]
    assert steps[0] == steps[1] == 3 * 12  # the same optimiser steps as without the preemption: none repeated
    assert all(math.isfinite(v) for m in again.history for v in m.values())


def test_no_preemption_check_when_it_is_switched_off(tmp_path):
    session = PreemptedSession(tmp_path, notice_at_ask=1)
    fit(_cfg("epochs=1", "resources.preemption_check_steps=0"), session)
    assert session.asks == 0 and [m["epoch"] for m in session.history] == [1.0]


def test_batch_larger_than_dataset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="larger than the training set"):
        fit(_cfg("epochs=1", "batch_size=4096"), LocalSession(tmp_path))


def test_lr_schedule_warmup_then_cosine():
    total, warm = 100, 10
    assert lr_factor(0, total, warm, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, total, warm, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, total, warm, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, total, warm, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, total, warm, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(70, total, 0, "constant", 0.0) == 1.0


def test_mixem_component_entropy_avoids_collapse(tmp_path):
    """MIX'EM Sec. 3.2: without L_comp-ent the mixture degenerates onto one component; with it
    (and L_inst-ent) samples spread over components. Stage 2 starts from a briefly trained
    base encoder, as in Sec. 4; asserted from the per-epoch metrics that land in MLflow."""
    base = LocalSession(tmp_path / "base")
    fit(_cfg("epochs=3", "model.cnn_width=32"), base)

    def stage2(weights: str) -> list[dict[str, float]]:
        session = LocalSession(tmp_path / weights)
        fit(_cfg("method=mixem", "epochs=3", "model.cnn_width=32", "model.embedding_dim=16",
                 f"init_from={base.latest_checkpoint()}", f"loss.weights={weights}"), session)
        return session.history

    spread = stage2("{comp_ent: 2, inst_ent: 0.1, push: 0, pull: 0}")
    collapsed = stage2("{comp_ent: 0, inst_ent: 0.1, push: 0, pull: 0}")
    assert spread[-1]["nonempty_components"] > 5  # of 10
    assert collapsed[-1]["nonempty_components"] < 2
    assert {"train_loss_comp_ent", "train_loss_inst_ent", "train_loss_push", "train_loss_pull",
            "component_entropy"} <= set(spread[-1])
