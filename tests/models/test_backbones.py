"""ctseg.models.backbones: the paper's encoders, the timm adapter, the ViT neck and the registry.

All models use random init (no internet); inputs are tiny (64-160 px) so the file stays fast on 2 cores.
"""

from __future__ import annotations

import pytest
import timm
import torch

from ctseg.errors import CheckpointError, ConfigError
from ctseg.models.backbones import (
    Backbone,
    PoolFormerPaper,
    SwinPaper,
    TimmBackbone,
    TimmViTBackbone,
    create_backbone,
    list_backbones,
)
from ctseg.models.backbones.poolformer_paper import load_poolformer_s12
from ctseg.models.backbones.swin_paper import MASK_VALUE, SwinBlock, shifted_window_mask
from ctseg.models.backbones.vit_neck import spaced_block_indices

SIZES = [(64, 64), (128, 128), (96, 160)]


@pytest.fixture(scope="module")
def swin_paper() -> Backbone:
    torch.manual_seed(0)
    return create_backbone("swin-paper")


@pytest.fixture(scope="module")
def poolformer_paper() -> Backbone:
    torch.manual_seed(0)
    return create_backbone("poolformer-paper")


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_shapes(bb: Backbone, h: int, w: int, batch: int = 1) -> None:
    with torch.no_grad():
        feats = bb.eval()(torch.randn(batch, 3, h, w))
    assert bb.strides == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [
        (batch, c, h // s, w // s) for c, s in zip(bb.out_channels, bb.strides)
    ]
    assert all(f.is_contiguous() and torch.isfinite(f).all() for f in feats)


def _check_backward(bb: Backbone, stem: torch.nn.Parameter, size: tuple[int, int] = (64, 64)) -> None:
    """Train-mode forward (shapes checked) and backward; the gradient must reach ``stem``."""
    bb.train()
    bb.zero_grad()
    feats = bb(torch.randn(1, 3, *size))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, size[0] // s, size[1] // s) for c, s in zip(bb.out_channels, bb.strides)
    ]
    sum(f.square().mean() for f in feats).backward()
    assert stem.grad is not None and stem.grad.abs().sum() > 0, "no gradient reached the stem"
    bb.zero_grad()
    bb.eval()


# --- the paper's encoders ---------------------------------------------------------------------------


def test_param_counts_match_spec(swin_paper, poolformer_paper):
    assert isinstance(swin_paper, SwinPaper) and isinstance(poolformer_paper, PoolFormerPaper)
    assert _params(swin_paper) == pytest.approx(13.83e6, rel=0.01)
    assert _params(poolformer_paper) == pytest.approx(9.46e6, rel=0.01)
    assert swin_paper.out_channels == poolformer_paper.out_channels == [64, 128, 256, 512]


@pytest.mark.parametrize("size", [*SIZES, (256, 256)])
@pytest.mark.parametrize("name", ["swin_paper", "poolformer_paper"])
def test_paper_encoder_shapes(name, size, request):
    _check_shapes(request.getfixturevalue(name), *size)


def test_paper_encoders_backward_reaches_stem(swin_paper, poolformer_paper):
    _check_backward(swin_paper, swin_paper.patch_embed.proj.weight)
    _check_backward(poolformer_paper, poolformer_paper.patch_embed.proj.weight)


def test_swin_paper_structure(swin_paper):
    blocks = [b for stage in swin_paper.layers for b in stage.blocks]
    assert len(blocks) == 14
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in blocks]
    assert rates == pytest.approx([0.3 * i / 13 for i in range(14)])
    assert [b.shift for b in blocks[:4]] == [0, 3, 0, 3]
    assert [b.attn.num_heads for b in blocks] == [2, 2, 4, 4] + [8] * 8 + [16, 16]
    assert blocks[0].attn.relative_position_bias_table.shape == (13 * 13, 2)
    assert swin_paper.layers[0].downsample.reduction.bias is None
    assert swin_paper.layers[-1].downsample is None
    # Outputs are post-norm: every stage has its own LayerNorm.
    assert all(hasattr(swin_paper, f"norm{i}") for i in range(4))


def test_poolformer_paper_structure(poolformer_paper):
    assert poolformer_paper.patch_embed.proj.kernel_size == (8, 8)
    assert poolformer_paper.patch_embed.proj.stride == (4, 4)
    assert poolformer_paper.patch_embed.proj.padding == (2, 2)
    for i in (1, 3, 5):
        conv = poolformer_paper.network[i].proj
        assert (conv.kernel_size, conv.stride, conv.padding) == ((2, 2), (2, 2), (0, 0))
    assert [len(poolformer_paper.network[i]) for i in (0, 2, 4, 6)] == [2, 2, 8, 2]
    block = poolformer_paper.network[0][0]
    assert torch.all(block.layer_scale_1 == 1e-5)
    assert block.norm1.num_groups == 1
    assert all(getattr(poolformer_paper, f"norm{i}").num_groups == 1 for i in (0, 2, 4, 6))


# --- the pad-then-roll shifted window attention -----------------------------------------------------


def _regions(n: int, window: int, shift: int) -> list[int]:
    # The three slices of a rolled axis: [0, n-window), [n-window, n-shift), [n-shift, n).
    return [0 if i < n - window else (1 if i < n - shift else 2) for i in range(n)]


@pytest.mark.parametrize(("hp", "wp"), [(14, 14), (21, 14), (7, 7)])
def test_shift_mask_is_minus_100_exactly_across_regions(hp, wp):
    window, shift = 7, 3
    mask = shifted_window_mask(hp, wp, window, shift)
    nwh, nww = hp // window, wp // window
    assert mask.shape == (nwh * nww, window * window, window * window)
    assert set(mask.unique().tolist()) <= {0.0, MASK_VALUE}
    rows, cols = _regions(hp, window, shift), _regions(wp, window, shift)
    for wi in range(nwh * nww):
        top, left = (wi // nww) * window, (wi % nww) * window
        region = [(rows[top + t // window], cols[left + t % window]) for t in range(window * window)]
        expected = torch.tensor([[0.0 if a == b else MASK_VALUE for b in region] for a in region])
        torch.testing.assert_close(mask[wi], expected, rtol=0, atol=0)
    if hp > window and wp > window:
        assert (mask[0] == 0).all()  # only the last window row/column mixes regions


def _reference_attention(block: SwinBlock, y: torch.Tensor, order: str) -> torch.Tensor:
    """Dense re-implementation of (S)W-MSA on normalised tokens ``y`` ``(B, h, w, C)`` → ``(B, h, w, C)``.

    Builds the rolled, padded grid by explicit index arithmetic and lets each token attend to every token
    in the same window and the same shift region; ``order`` is "pad_then_roll" (the paper's encoder) or
    "roll_then_pad" (timm's Swin).
    """
    b, h, w, c = y.shape
    ws, s = block.window, block.shift
    hp, wp = h + (-h) % ws, w + (-w) % ws
    zero = y.new_zeros(b, c)

    def source(ri: int, rj: int) -> tuple[int, int] | None:
        # Which original position lands on rolled/padded grid cell (ri, rj).
        if order == "pad_then_roll":
            i, j = (ri + s) % hp, (rj + s) % wp
        else:
            if ri >= h or rj >= w:
                return None
            i, j = (ri + s) % h, (rj + s) % w
        return (i, j) if i < h and j < w else None

    cells = [(ri, rj) for ri in range(hp) for rj in range(wp)]
    grid = torch.stack([y[:, src[0], src[1]] if (src := source(*cell)) else zero for cell in cells], 1)
    heads = block.attn.num_heads
    qkv = block.attn.qkv(grid).view(b, len(cells), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    logits = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    pos = torch.tensor(cells)  # (N, 2) rolled/padded coordinates
    region = torch.stack(
        [torch.tensor(_regions(hp, ws, s))[pos[:, 0]], torch.tensor(_regions(wp, ws, s))[pos[:, 1]]], 1
    )
    same_window = ((pos[:, None] // ws) == (pos[None] // ws)).all(-1)
    same_region = (region[:, None] == region[None]).all(-1) if s else torch.ones_like(same_window)
    allowed = same_window & same_region
    rel = (pos[:, None] % ws) - (pos[None] % ws) + ws - 1  # (N, N, 2) in [0, 2·ws − 2]
    table = block.attn.relative_position_bias_table
    bias = table[rel[..., 0] * (2 * ws - 1) + rel[..., 1]].permute(2, 0, 1)  # (heads, N, N)
    logits = (logits + bias).masked_fill(~allowed, float("-inf"))
    out = block.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, len(cells), c))
    out = out.view(b, hp, wp, c)
    result = torch.empty_like(y)
    for ri, rj in cells:
        if (src := source(ri, rj)) is not None:
            result[:, src[0], src[1]] = out[:, ri, rj]
    return result


@pytest.mark.parametrize(
    ("h", "w", "shift"),
    [(14, 14, 0), (14, 14, 3), (16, 16, 0), (16, 16, 3), (9, 12, 3)],
)
def test_window_attention_matches_dense_reference(h, w, shift):
    torch.manual_seed(0)
    c = 16
    block = SwinBlock(c, num_heads=2, window=7, shift=shift).eval()
    x = torch.randn(2, h * w, c)
    hp, wp = block.padded_size(h, w)
    mask = shifted_window_mask(hp, wp, 7, shift) if shift else None
    with torch.no_grad():
        out = block(x, h, w, mask)
        y = block.norm1(x).view(2, h, w, c)
        ref_attn = _reference_attention(block, y, "pad_then_roll").reshape(2, h * w, c)
        x1 = x + ref_attn
        ref = x1 + block.mlp(block.norm2(x1))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if shift and (h % 7 or w % 7):
        # Where padding is needed, the paper's pad-then-roll differs from timm's roll-then-pad.
        with torch.no_grad():
            other = x + _reference_attention(block, y, "roll_then_pad").reshape(2, h * w, c)
            other = other + block.mlp(block.norm2(other))
        assert not torch.allclose(out, other, rtol=1e-4, atol=1e-5)


def test_exact_window_multiple_is_plain_window_attention():
    # 14 = 2·7: no padding, and W-MSA is attention inside each 7×7 window with nothing else mixed in.
    torch.manual_seed(0)
    block = SwinBlock(8, num_heads=2, window=7, shift=0).eval()
    x = torch.randn(1, 14 * 14, 8)
    with torch.no_grad():
        out = block(x, 14, 14).view(1, 14, 14, 8)
        x_perturbed = x.view(1, 14, 14, 8).clone()
        x_perturbed[:, 7:, 7:] += 1.0  # change only the bottom-right window
        out2 = block(x_perturbed.view(1, -1, 8), 14, 14).view(1, 14, 14, 8)
    torch.testing.assert_close(out[:, :7], out2[:, :7], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 7:, :7], out2[:, 7:, :7], rtol=0, atol=0)
    assert not torch.allclose(out[:, 7:, 7:], out2[:, 7:, 7:])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin-paper", "poolformer-paper"])
def test_paper_encoders_export_to_onnx(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    bb = create_backbone(name).eval()
    x = torch.randn(1, 3, 64, 96)
    program = torch.onnx.export(bb, (x,), dynamo=True, verbose=False)
    program.save(str(tmp_path / "encoder.onnx"))
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = bb(x)
    for g, r in zip(got, ref):
        torch.testing.assert_close(torch.from_numpy(g), r, rtol=1e-4, atol=1e-4)


# --- S12 weights into the paper's PoolFormer ---------------------------------------------------------


def _expected_s12_keys(model: PoolFormerPaper) -> set[str]:
    # §2.4: all of network.0/2/6 plus the biases of the stem and of downsamplings network.1 / network.5.
    keys = {k for k in model.state_dict() if k.startswith(("network.0.", "network.2.", "network.6."))}
    return keys | {"patch_embed.proj.bias", "network.1.proj.bias", "network.5.proj.bias"}


def test_s12_timm_layout_copies_exactly_the_spec_tensors(tmp_path):
    torch.manual_seed(1)
    s12 = timm.create_model("poolformer_s12")
    path = tmp_path / "poolformer_s12_timm.pth"
    torch.save(s12.state_dict(), path)
    bb = create_backbone("poolformer-paper", pretrained=path)
    report = bb.load_report
    assert set(report.loaded) == _expected_s12_keys(bb)
    assert len(report.loaded) == 63 and len(bb.state_dict()) == 156
    assert "network.4.0.norm1.weight" in {k for k, *_ in report.mismatched}
    assert {"norm0.weight", "network.4.7.mlp.fc1.weight"} <= set(report.missing)
    src = s12.state_dict()
    own = bb.state_dict()
    torch.testing.assert_close(own["network.2.1.mlp.fc2.weight"], src["stages.1.blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(own["network.6.0.layer_scale_1"], src["stages.3.blocks.0.layer_scale1.scale"])
    torch.testing.assert_close(own["network.5.proj.bias"], src["stages.3.downsample.conv.bias"])
    torch.testing.assert_close(own["patch_embed.proj.bias"], src["stem.conv.bias"])


def test_s12_official_layout(tmp_path):
    # The official (sail-sg) S12 file: same names as our encoder, S12 shapes, a classifier instead of
    # the output norms.
    torch.manual_seed(2)
    s12 = PoolFormerPaper(
        layers=(2, 2, 6, 2), embed_dims=(64, 128, 320, 512), in_patch_size=7, down_patch_size=3, down_pad=1
    )
    sd = {k: v for k, v in s12.state_dict().items() if not k.startswith("norm")}
    sd |= {
        "norm.weight": torch.ones(512),
        "norm.bias": torch.zeros(512),
        "head.weight": torch.zeros(1000, 512),
    }
    path = tmp_path / "poolformer_s12.pth.tar"
    torch.save({"state_dict": sd}, path)
    model = PoolFormerPaper()
    report = load_poolformer_s12(model, path)
    assert set(report.loaded) == _expected_s12_keys(model)
    torch.testing.assert_close(model.state_dict()["network.0.1.norm2.bias"], sd["network.0.1.norm2.bias"])


# --- timm adapter --------------------------------------------------------------------------------------

TIMM_CASES = {
    "swin_tiny_patch4_window7_224": [96, 192, 384, 768],
    "poolformer_s12": [64, 128, 320, 512],
    "convnext_atto": [40, 80, 160, 320],
    "resnet18": [64, 128, 256, 512],
    "pvt_v2_b0": [32, 64, 160, 256],
    "caformer_s18": [64, 128, 320, 512],
}


def _first_param(bb: Backbone) -> torch.nn.Parameter:
    return next(bb.parameters())


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_adapter(name):
    torch.manual_seed(0)
    bb = create_backbone(f"timm:{name}")
    assert isinstance(bb, TimmBackbone)
    assert bb.out_channels == TIMM_CASES[name]
    assert (bb.stage_norms is not None) == name.startswith("swin")
    _check_shapes(bb, 96, 160)
    _check_backward(bb, _first_param(bb), (64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_adapter_larger_inputs(name):
    bb = create_backbone(f"timm:{name}")
    for size in [(128, 128), (256, 256), (512, 384)]:
        _check_shapes(bb, *size)


SMALL_SWIN = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 2, 2)}


def test_timm_swin_outputs_are_nchw_views_of_timm_features():
    torch.manual_seed(0)
    bb = create_backbone("timm:swin_tiny_patch4_window7_224", stage_norm=False, **SMALL_SWIN).eval()
    assert bb.channels_last and bb.stage_norms is None
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours, raw = bb(x), bb.body(x)
    for o, r in zip(ours, raw):
        torch.testing.assert_close(o, r.permute(0, 3, 1, 2), rtol=0, atol=0)


def test_timm_swin_same_result_whatever_the_construction_size():
    # Built for 512² and run at 256² gives what a model built for 256² gives: sizes only change masks.
    torch.manual_seed(0)
    big = create_backbone("timm:swin_tiny_patch4_window7_224", img_size=512, **SMALL_SWIN).eval()
    small = create_backbone("timm:swin_tiny_patch4_window7_224", img_size=256, **SMALL_SWIN).eval()
    small.load_state_dict(big.state_dict())
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        for a, b in zip(big(x), small(x)):
            torch.testing.assert_close(a, b)
    _check_shapes(big, 96, 160)


def test_timm_stage_norm_is_optional_and_trainable():
    bb = create_backbone("timm:convnext_atto", stage_norm=True)
    assert bb.stage_norms is not None and len(bb.stage_norms) == 4
    _check_shapes(bb, 64, 64)
    _check_backward(bb, bb.stage_norms[0].weight)


def test_timm_wrong_strides_are_a_config_error():
    with pytest.raises(ConfigError, match="strides"):
        create_backbone("timm:resnet18", out_indices=(0, 1, 2, 3))


# --- plain ViT through the simple feature pyramid -----------------------------------------------------

TINY_VIT = {"embed_dim": 64, "depth": 4, "num_heads": 2}


def test_vit_small_neck_shapes_and_backward():
    torch.manual_seed(0)
    bb = create_backbone("timm:vit_small_patch16_224")
    assert isinstance(bb, TimmViTBackbone)
    assert bb.out_channels == [96, 192, 384, 384]
    assert bb.indices == [2, 5, 8, 11]
    _check_shapes(bb, 96, 160)
    _check_backward(bb, bb.vit.patch_embed.proj.weight, (64, 64))


@pytest.mark.parametrize("levels", ["spaced", "last"])
def test_vit_prefix_tokens_and_levels(levels):
    torch.manual_seed(0)
    bb = create_backbone(
        "timm:vit_small_patch16_224", levels=levels, reg_tokens=4, out_channels=[32, 64, 128, 256], **TINY_VIT
    )
    assert bb.vit.num_prefix_tokens == 5  # class token + 4 register tokens are removed before the neck
    assert bb.out_channels == [32, 64, 128, 256]
    assert bb.indices == ([0, 1, 2, 3] if levels == "spaced" else [3])
    for size in [(64, 64), (128, 128), (96, 160)]:
        _check_shapes(bb, *size)
    _check_backward(bb, bb.vit.patch_embed.proj.weight)


@pytest.mark.parametrize("patch", [8, 14])
def test_vit_other_patch_size_is_resampled_to_stride_16(patch):
    bb = create_backbone("timm:vit_small_patch16_224", patch_size=patch, **TINY_VIT)
    _check_shapes(bb, 64, 96)
    _check_shapes(bb, 96, 160)


def test_spaced_block_indices():
    assert spaced_block_indices(12) == [2, 5, 8, 11]
    assert spaced_block_indices(24) == [5, 11, 17, 23]
    assert spaced_block_indices(4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        spaced_block_indices(3)


# --- registry and weights -----------------------------------------------------------------------------


def test_registry_names_and_errors():
    assert {"swin-paper", "poolformer-paper"} <= set(list_backbones())
    assert "timm:resnet18" in list_backbones("timm:resnet1*", include_timm=True)
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        create_backbone("nope")
    # timm 1.0.31 has no SegFormer MiT (mit_b0); the name must fail clearly, not with a KeyError.
    with pytest.raises(ConfigError, match="mit_b0"):
        create_backbone("timm:mit_b0")
    with pytest.raises(ConfigError, match="swin-paper"):
        create_backbone("swin-paper", depth=3)
    with pytest.raises(ConfigError, match="invalid argument"):
        create_backbone("timm:resnet18", not_an_argument=1)
    with pytest.raises(ConfigError, match="no published weights"):
        create_backbone("swin-paper", pretrained=True)


def test_swin_paper_local_weights_roundtrip(tmp_path, swin_paper):
    path = tmp_path / "encoder.pt"
    torch.save({"state_dict": swin_paper.state_dict()}, path)
    loaded = create_backbone("swin-paper", pretrained=str(path))
    assert loaded.load_report.complete
    torch.testing.assert_close(loaded.norm3.weight, swin_paper.norm3.weight)
    # A PoolFormer file is refused by name, not skipped silently.
    other = tmp_path / "poolformer.pt"
    torch.save(PoolFormerPaper(layers=(1, 1, 1, 1)).state_dict(), other)
    with pytest.raises(
        CheckpointError,
        match=r"(?s)poolformer\.pt: does not fit SwinPaper.*loaded 0/203.*missing: patch_embed\.norm\.weight",
    ):
        create_backbone("swin-paper", pretrained=other)


def test_timm_local_weights_file(tmp_path):
    torch.manual_seed(3)
    full = timm.create_model("convnext_atto")
    path = tmp_path / "convnext_atto.pth"
    torch.save(full.state_dict(), path)
    bb = create_backbone("timm:convnext_atto", pretrained=path)
    torch.testing.assert_close(bb.body.stem_0.weight, full.stem[0].weight)
    wrong = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r"resnet18\.pth: cannot be loaded into timm:convnext_atto"):
        create_backbone("timm:convnext_atto", pretrained=wrong)
    with pytest.raises(CheckpointError, match="not found"):
        create_backbone("timm:convnext_atto", pretrained=tmp_path / "absent.pth")


def test_partial_local_weights(tmp_path, swin_paper):
    # timm file with another classifier: the feature net takes every tensor it has (names flattened by
    # features_only, "stages.0" → "stages_0"), the head is reported as unexpected.
    torch.manual_seed(4)
    full = timm.create_model("convnext_atto", num_classes=7)
    path = tmp_path / "convnext_atto_7cls.pth"
    torch.save({"model": full.state_dict()}, path)
    bb = create_backbone("timm:convnext_atto", pretrained=path, partial=True)
    report = bb.load_report
    assert not report.missing and not report.mismatched
    assert set(report.unexpected) == {k for k in full.state_dict() if k.startswith("head.")}
    torch.testing.assert_close(
        bb.body.stages_3.blocks[0].conv_dw.weight, full.stages[3].blocks[0].conv_dw.weight
    )
    # The paper's Swin: a file with one mis-shaped tensor loads the rest and names that one.
    sd = swin_paper.state_dict()
    sd["norm3.weight"] = torch.ones(7)
    path = tmp_path / "swin_bad_norm.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"norm3\.weight \(expected \[512\], got \[7\]\)"):
        create_backbone("swin-paper", pretrained=path)
    bb = create_backbone("swin-paper", pretrained=path, partial=True)
    assert [k for k, *_ in bb.load_report.mismatched] == ["norm3.weight"]
    assert len(bb.load_report.loaded) == len(sd) - 1
    torch.testing.assert_close(bb.norm0.weight, swin_paper.norm0.weight)


@pytest.fixture
def offline_empty_hf_cache(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache, so pretrained=True cannot find weights."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.mark.parametrize("name", ["timm:convnext_atto", "poolformer-paper"])
def test_pretrained_without_cache_fails_with_instructions(name, offline_empty_hf_cache):
    with pytest.raises(CheckpointError) as info:
        create_backbone(name, pretrained=True)
    msg = str(info.value)
    assert "pretrained weights could not be obtained" in msg
    assert 'pretrained="path/to/' in msg and "HF_HUB_OFFLINE=1" in msg
    assert len(msg) < 3000


# --- CUDA (run by benchmarks/gpu_check.sh on a GPU machine; skipped here) ---------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("name", ["swin-paper", "poolformer-paper", "timm:swin_tiny_patch4_window7_224"])
def test_cuda_matches_cpu_and_trains_in_bf16(name, no_tf32):
    torch.manual_seed(0)
    bb = create_backbone(name).eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        ref = bb(x)
        got = bb.cuda()(x.cuda())  # fused SDPA kernels and the folded window mask on the GPU
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-3, atol=1e-3)
    # A bf16 training step at the paper's crop size: finite outputs and a gradient at the stem.
    bb.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        feats = bb(torch.randn(4, 3, 512, 512, device="cuda"))
    assert [tuple(f.shape[-2:]) for f in feats] == [(128, 128), (64, 64), (32, 32), (16, 16)]
    sum(f.float().square().mean() for f in feats).backward()
    stem = next(bb.parameters()).grad
    assert stem is not None and torch.isfinite(stem).all() and stem.abs().sum() > 0
