"""The IIC VGG-4 backbone (``model.backbone=iic_vgg4``, LSD-C Sec. 4's MNIST network): shapes,
parameter count from its configuration, macro-blocks, and LSD-C / RotNet steps built on it."""

from __future__ import annotations

import math

import pytest
import torch

from clusterlab.config import load_config
from clusterlab.models import build_backbone, macro_blocks
from clusterlab.models.backbones import IICVGG4
from clusterlab.trainers import DataMeta, build_method

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _model_cfg():
    return load_config(None, ["model.backbone=iic_vgg4"], preset="lsdc_digits").model


@pytest.mark.parametrize("size,side", [(28, 3), (32, 4), (24, 3), (8, 1)])
def test_representation_is_the_flattened_last_feature_map(size, side):
    torch.manual_seed(0)
    net, out_dim = build_backbone(_model_cfg(), size)
    assert isinstance(net, IICVGG4) and out_dim == 512 * side * side
    h = net(torch.randn(3, 3, size, size))
    assert h.shape == (3, out_dim)
    if size == 28:
        assert out_dim == 4608


def test_too_small_or_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 8 px"):
        build_backbone(_model_cfg(), 7)
    net, _ = build_backbone(_model_cfg(), 28)
    with pytest.raises(ValueError, match="built for 28 px"):
        net(torch.randn(2, 3, 16, 16))  # e.g. ExCB's half-size local crops


def test_parameter_count_matches_the_configuration():
    channels = [3, 64, 128, 256, 512]
    expected = sum(5 * 5 * c_in * c_out + 2 * c_out for c_in, c_out in zip(channels, channels[1:]))
    net, _ = build_backbone(_model_cfg(), 28)
    assert sum(p.numel() for p in net.parameters()) == expected == 4_307_520
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == list(zip(channels, channels[1:]))
    assert all(m.kernel_size == (5, 5) and m.stride == (1, 1) and m.padding == (2, 2) and m.dilation == (1, 1)
               and m.bias is None for m in convs)
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 3 and all(m.kernel_size == 2 and m.stride == 2 for m in pools)


@pytest.mark.parametrize("train", [False, True])
def test_macro_blocks_compose_to_the_forward(train):
    torch.manual_seed(0)
    net, _ = build_backbone(_model_cfg(), 28)
    net.train(train)
    blocks = macro_blocks(net)
    assert len(blocks) == 4
    params = {id(p) for b in blocks for p in b.parameters()}
    assert params == {id(p) for p in net.parameters()}  # the four blocks cover the whole net
    x = torch.randn(4, 3, 28, 28)
    h = x
    for block in blocks:
        h = block(h)
    assert torch.allclose(h, net(x), atol=1e-6)
    assert blocks[0][0].in_channels == 3 and isinstance(blocks[3][-1], torch.nn.Flatten)


def test_channels_last_gives_the_same_representation():
    torch.manual_seed(0)
    net, _ = build_backbone(_model_cfg(), 28)
    net.eval()
    x = torch.randn(2, 3, 28, 28)
    ref = net(x)
    out = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _method(preset, *overrides):
    cfg = load_config(None, ["model.backbone=iic_vgg4", *overrides], preset=preset)
    return build_method(cfg, DataMeta(10, 28, MEAN, STD))


def test_lsdc_step_on_iic_vgg4_trains_only_conv4_and_the_head():
    torch.manual_seed(0)
    method = _method("lsdc_digits", "lsdc.train_from_block=4").train()
    blocks = macro_blocks(method.backbone)
    assert method.head.in_features == 4608
    assert [list(b.parameters()) for b in method._frozen] == [list(b.parameters()) for b in blocks[:3]]
    assert all(not m.training for b in blocks[:3] for m in b.modules())  # frozen BatchNorm statistics kept
    assert all(m.training for m in blocks[3].modules())
    method.set_progress(1.0)
    out = method(method.make_views(torch.randint(0, 256, (12, 3, 28, 28), dtype=torch.uint8)))
    method.total_loss(out["terms"]).backward()
    assert all(p.grad is None for b in blocks[:3] for p in b.parameters())
    for p in [*blocks[3].parameters(), *method.head.parameters()]:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
    assert method.eval_outputs(torch.randn(2, 3, 28, 28))["representation"].shape == (2, 4608)


def test_rotnet_step_on_iic_vgg4_trains_every_block():
    torch.manual_seed(0)
    method = _method("rotnet_digits").train()
    out = method(method.make_views(torch.randint(0, 256, (6, 3, 28, 28), dtype=torch.uint8)))
    loss = method.total_loss(out["terms"])
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    for block in macro_blocks(method.backbone):
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in block.parameters())
