"""Test-time augmentation: views invert exactly, invariant models are unchanged, TTA is equivariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ctseg.errors import ConfigError
from ctseg.inference.sliding import predict_large
from ctseg.inference.tta import PRESETS, TTA, VIEWS, maybe_tta, resolve_views
from tests.inference.conftest import conv_net, pointwise_net


def d4_symmetric_net(num_classes: int = 3, seed: int = 0) -> nn.Module:
    """3x3 convs whose kernels are averaged over the 8 symmetries of the square: flip/rot-equivariant."""
    net = conv_net(num_classes, seed, depth=3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                k = m.weight
                views = [torch.rot90(k, r, (-2, -1)) for r in range(4)]
                views += [v.transpose(-2, -1) for v in views]
                m.weight.copy_(torch.stack(views).mean(0))
    return net


@pytest.mark.parametrize("name", list(VIEWS))
def test_every_view_is_inverted_exactly(name: str) -> None:
    x = torch.randn(2, 3, 8, 11)  # non-square: transposes and rotations change the shape
    view = VIEWS[name]
    torch.testing.assert_close(view.inverse(view.forward(x)), x, rtol=0, atol=0)


def test_presets_and_view_lists_resolve() -> None:
    assert resolve_views(None) == ("identity",)
    assert resolve_views("flip") == ("identity", "hflip", "vflip")
    assert resolve_views("hflip,rot90") == ("identity", "hflip", "rot90")
    assert len(resolve_views("d4,flip")) == 8
    assert set(PRESETS["d4"]) == set(VIEWS)
    with pytest.raises(ConfigError, match="unknown TTA view"):
        resolve_views("mirror")
    with pytest.raises(ConfigError, match="scales"):
        TTA(pointwise_net(), "flip", scales=(0.0,))


@pytest.mark.parametrize("views", ["flip", "flip4", "rot", "d4"])
def test_tta_of_a_flip_invariant_model_changes_nothing(views: str) -> None:
    # Equivariant under flips and rotations by construction (symmetric kernels, symmetric zero padding).
    model = d4_symmetric_net()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(TTA(model, views)(x), model(x), rtol=1e-5, atol=1e-5)


def test_tta_changes_a_model_that_is_not_invariant() -> None:
    model = conv_net(3, depth=3)
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert (TTA(model, "d4")(x) - model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("views", ["flip4", "d4"])
def test_group_tta_is_equivariant(views: str) -> None:
    # Averaging over a group of views makes any network equivariant to that group.
    tta = TTA(conv_net(3, depth=3), views)
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(tta(x.flip(-1)), tta(x).flip(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tta(x.flip(-2)), tta(x).flip(-2), rtol=1e-5, atol=1e-5)


def test_multiscale_keeps_the_shape_and_is_exact_on_constant_images() -> None:
    model = pointwise_net(4)
    tta = TTA(model, "identity", scales=(0.5, 1.0, 1.5), size_divisor=4)
    x = torch.full((1, 3, 32, 40), 0.3)
    x[:, 1] = 0.7
    with torch.no_grad():
        y = tta(x)
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
    assert y.shape == (1, 4, 32, 40)
    assert tta._scaled(32, 0.75) % 4 == 0


def test_maybe_tta_returns_the_model_when_nothing_is_asked() -> None:
    model = pointwise_net()
    assert maybe_tta(model, None) is model
    assert maybe_tta(model, "none", (1.0,)) is model
    assert isinstance(maybe_tta(model, "hflip"), TTA)
    assert isinstance(maybe_tta(model, None, (0.75, 1.0)), TTA)


def test_tta_through_the_sliding_window(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    model = d4_symmetric_net()
    plain = predict_large(model, image, window=32, overlap=8, return_logits=True)
    tta = predict_large(model, image, window=32, overlap=8, tta="d4", return_logits=True)
    np.testing.assert_allclose(tta.logits, plain.logits, atol=1e-4)
