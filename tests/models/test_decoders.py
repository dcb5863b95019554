"""Decoders (DCFAM, UNetFormer) and their blocks, against a tiny stand-in backbone.

The stand-in is test scaffolding with the encoders' contract (4 NCHW maps at strides 4/8/16/32,
``out_channels``, ``strides``), so these tests exercise the decoders alone and stay fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctseg.errors import ConfigError
from ctseg.models.decoders import DCFAMDecoder, UNetFormerDecoder, create_decoder
from ctseg.models.decoders.blocks import reflect_pad, same_padding
from ctseg.models.decoders.dcfam import SharedChannelAttention, SharedSpatialAttention
from ctseg.models.decoders.unetformer import GlobalLocalAttention
from ctseg.models.segmentor import SegmentationModel, pad_to_multiple

PAPER_CHANNELS = [64, 128, 256, 512]


class TinyBackbone(nn.Module):
    """Stand-in encoder: strided convs giving 4 maps at strides 4, 8, 16, 32."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 24, 32)) -> None:
        super().__init__()
        self.out_channels = list(channels)
        self.strides = [4, 8, 16, 32]
        stages, c_in = [], 3
        for i, c in enumerate(channels):
            k = 4 if i == 0 else 2
            stages.append(nn.Sequential(nn.Conv2d(c_in, c, k, stride=k), nn.BatchNorm2d(c), nn.ReLU()))
            c_in = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


def tiny_model(decoder: str = "dcfam", num_classes: int = 5, **kw) -> SegmentationModel:
    bb = TinyBackbone()
    return SegmentationModel(bb, create_decoder(decoder, bb.out_channels, num_classes), num_classes, **kw)


def _features(channels: list[int], h: int, w: int, batch: int = 2) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, h // s, w // s, generator=g) for c, s in zip(channels, (4, 8, 16, 32))]


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- parameter counts: the clean-room check against reference-spec §2 -------------------------------


def test_dcfam_decoder_has_8_06_m_parameters() -> None:
    n = _nparams(DCFAMDecoder(PAPER_CHANNELS, num_classes=6))
    assert abs(n - 8.06e6) / 8.06e6 < 0.005, n


def test_unetformer_decoder_has_0_51_m_parameters() -> None:
    n = _nparams(UNetFormerDecoder(PAPER_CHANNELS, num_classes=6, decode_channels=64))
    assert abs(n - 0.51e6) / 0.51e6 < 0.01, n


def test_unetformer_aux_head_adds_parameters_only_when_asked() -> None:
    plain = UNetFormerDecoder(PAPER_CHANNELS, 6)
    aux = UNetFormerDecoder(PAPER_CHANNELS, 6, aux_head=True)
    assert plain.aux_head is None
    assert _nparams(aux) > _nparams(plain)


# --- shapes for any 4-stage channels ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["dcfam", "unetformer"])
@pytest.mark.parametrize(
    ("channels", "h", "w"),
    [([8, 16, 24, 32], 64, 64), ([40, 80, 160, 320], 96, 128), ([64, 128, 320, 512], 64, 96)],
)
def test_decoder_output_shape_any_channels(name: str, channels: list[int], h: int, w: int) -> None:
    dec = create_decoder(name, channels, num_classes=7).eval()
    with torch.no_grad():
        out = dec(_features(channels, h, w), (h, w))
    assert out.shape == (2, 7, h, w)
    assert torch.isfinite(out).all()


def test_create_decoder_unknown_name() -> None:
    with pytest.raises(ConfigError, match="unknown decoder 'fpn'"):
        create_decoder("fpn", PAPER_CHANNELS, 6)


@pytest.mark.parametrize("cls", [DCFAMDecoder, UNetFormerDecoder])
def test_decoder_rejects_three_stages(cls: type[nn.Module]) -> None:
    with pytest.raises(ValueError, match="4 encoder stages"):
        cls([16, 32, 64], 6)


@pytest.mark.parametrize("name", ["dcfam", "unetformer"])
def test_every_decoder_parameter_gets_a_gradient(name: str) -> None:
    channels = [8, 16, 24, 32]
    dec = create_decoder(name, channels, num_classes=3)
    feats = [f.requires_grad_() for f in _features(channels, 64, 64)]
    dec(feats, (64, 64)).square().mean().backward()
    no_grad = [n for n, p in dec.named_parameters() if p.grad is None]
    assert not no_grad
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_unetformer_return_aux() -> None:
    dec = UNetFormerDecoder([8, 16, 24, 32], 4, aux_head=True).eval()
    logits, aux = dec(_features([8, 16, 24, 32], 64, 64), (64, 64), return_aux=True)
    assert logits.shape == aux.shape == (2, 4, 64, 64)
    with pytest.raises(RuntimeError, match="aux_head=True"):
        UNetFormerDecoder([8, 16, 24, 32], 4)(_features([8, 16, 24, 32], 64, 64), (64, 64), return_aux=True)


# --- attention blocks against a direct (quadratic) formulation of reference-spec §2.2 --------------


def _l2(x: Tensor) -> Tensor:  # (B, C, N), unit norm over C
    return x / x.norm(dim=1, keepdim=True)


def test_spatial_attention_equals_quadratic_kernel_attention() -> None:
    torch.manual_seed(0)
    att = SharedSpatialAttention(16)
    nn.init.constant_(att.gamma, 0.7)
    x = torch.randn(2, 16, 5, 6)
    b, c, h, w = x.shape
    q = _l2(att.query(x).flatten(2))  # (B, C', N)
    k = _l2(att.key(x).flatten(2))
    v = att.value(x).flatten(2)  # (B, C, N)
    sim = 1.0 + q.transpose(1, 2) @ k  # (B, N, N): kernel 1 + q_n . k_m
    expected = (v @ sim.transpose(1, 2)) / sim.sum(-1)[:, None, :]  # (B, C, N)
    expected = x + 0.7 * expected.view(b, c, h, w)
    torch.testing.assert_close(att(x), expected, atol=1e-5, rtol=1e-5)


def test_channel_attention_equals_literal_spec_formula() -> None:
    torch.manual_seed(0)
    att = SharedChannelAttention()
    nn.init.constant_(att.gamma, -1.3)
    x = torch.randn(2, 6, 4, 5)
    b, c, h, w = x.shape
    n = h * w
    v = x.flatten(2)
    q = _l2(v)
    out = torch.empty_like(v)
    for bi in range(b):
        s = q[bi] @ q[bi].T  # (C, C): sum_n Q[c,n] Q[m,n]
        vk = v[bi] @ q[bi].T  # (C, C): sum_n V[c,n] Q[m,n]
        for ci in range(c):
            tailor = 1.0 / (n + s[ci].sum() + 1e-6 * q[bi, ci].sum())
            out[bi, ci] = (v[bi].sum(0) + vk[ci] @ q[bi]) * tailor
    torch.testing.assert_close(att(x), x - 1.3 * out.view(b, c, h, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module", [SharedSpatialAttention(8), SharedChannelAttention()])
def test_attention_starts_as_identity(module: nn.Module) -> None:
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(module(x), x)


def test_window_attention_is_local_to_windows() -> None:
    torch.manual_seed(0)
    gla = GlobalLocalAttention(dim=16, num_heads=4, window_size=4).eval()
    x = torch.randn(1, 16, 8, 8)
    y = x.clone()
    y[:, :, 0:4, 0:4] += torch.randn(1, 16, 4, 4)  # change window (0, 0) only
    with torch.no_grad():
        ax, ay = gla._window_attention(x), gla._window_attention(y)
    assert not torch.allclose(ax[:, :, :4, :4], ay[:, :, :4, :4])
    torch.testing.assert_close(ax[:, :, 4:, :], ay[:, :, 4:, :])
    torch.testing.assert_close(ax[:, :, :, 4:], ay[:, :, :, 4:])


@pytest.mark.parametrize("size", [1, 3, 4, 5, 8, 12])
def test_global_local_attention_any_map_size(size: int) -> None:
    gla = GlobalLocalAttention(dim=16, num_heads=4, window_size=8).eval()
    with torch.no_grad():
        assert gla(torch.randn(2, 16, size, size + 1)).shape == (2, 16, size, size + 1)


# --- padding --------------------------------------------------------------------------------------


def test_same_padding() -> None:
    assert same_padding(3) == 1
    assert same_padding(3, dilation=6) == 6
    assert same_padding(3, stride=2) == 1
    assert same_padding(8) == 3


@pytest.mark.parametrize("h", [1, 2, 3, 7])
@pytest.mark.parametrize("pad", [0, 1, 2, 5, 13])
def test_reflect_pad_matches_torch_and_extends_it(h: int, pad: int) -> None:
    x = torch.randn(1, 2, h, h + 1)
    y = reflect_pad(x, pad, pad)
    assert y.shape == (1, 2, h + pad, h + 1 + pad)
    if pad < h:
        torch.testing.assert_close(y, F.pad(x, (0, pad, 0, pad), mode="reflect"), rtol=0, atol=0)
    # Repeated reflection: the padded rows mirror back into the image without repeating the edge.
    period = max(2 * (h - 1), 1)
    for i in range(h + pad):
        j = i % period
        src = j if j < h else period - j
        torch.testing.assert_close(y[:, :, i, : h + 1], x[:, :, src, :], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["reflect", "constant", "replicate"])
def test_pad_to_multiple(mode: str) -> None:
    x = torch.randn(1, 3, 50, 64)
    y = pad_to_multiple(x, 32, mode)
    assert y.shape == (1, 3, 64, 64)
    torch.testing.assert_close(y[:, :, :50, :64], x)
    if mode == "constant":
        assert (y[:, :, 50:] == 0).all()
    assert pad_to_multiple(y, 32, mode) is not None and pad_to_multiple(y, 32, mode).shape == y.shape


# --- the segmentor ----------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["dcfam", "unetformer"])
@pytest.mark.parametrize(("h", "w"), [(50, 70), (33, 96)])
def test_segmentation_model_pads_and_crops(decoder: str, h: int, w: int) -> None:
    model = tiny_model(decoder).eval()
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        padded = model(pad_to_multiple(x, 32, "reflect"))
    assert logits.shape == (2, 5, h, w)
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    assert [f.shape[-2:] for f in feats] == [(hp // s, wp // s) for s in (4, 8, 16, 32)]
    assert [f.shape[1] for f in feats] == model.feature_channels
    # The model is exactly "pad, predict, crop".
    torch.testing.assert_close(logits, padded[:, :, :h, :w])


def test_segmentation_model_attributes_and_validation() -> None:
    model = tiny_model(num_classes=4, pad_mode="constant")
    assert model.feature_channels == [8, 16, 24, 32]
    assert model.feature_strides == [4, 8, 16, 32]
    assert model.num_classes == 4
    with pytest.raises(ValueError, match="pad_mode"):
        tiny_model(pad_mode="wrap")
    bb = TinyBackbone()
    with pytest.raises(ValueError, match="largest stride"):
        SegmentationModel(bb, create_decoder("dcfam", bb.out_channels, 3), 3, pad_multiple=48)


def test_segmentation_model_return_aux() -> None:
    bb = TinyBackbone()
    dec = UNetFormerDecoder(bb.out_channels, 3, aux_head=True)
    model = SegmentationModel(bb, dec, 3).eval()
    logits, feats, aux = model(torch.randn(1, 3, 40, 40), return_features=True, return_aux=True)
    assert logits.shape == aux.shape == (1, 3, 40, 40)
    assert len(feats) == 4
    with pytest.raises(ValueError, match="auxiliary head"):
        tiny_model("dcfam")(torch.randn(1, 3, 32, 32), return_aux=True)


def test_for_inference_is_an_eval_copy_with_same_weights() -> None:
    model = tiny_model().train()
    model.ct_loss = nn.Linear(2, 2)  # any submodule stands for the CT heads here
    infer = model.for_inference()
    assert not infer.training and model.training
    assert not hasattr(infer, "ct_loss") and hasattr(model, "ct_loss")
    assert not any(k.startswith("ct_loss.") for k in infer.state_dict())
    full = model.state_dict()
    for k, v in infer.state_dict().items():
        torch.testing.assert_close(v, full[k])
