"""The model registry, the presets (real encoders) and ``create``'s weights / CT options."""

from __future__ import annotations

import pytest
import torch

import ctseg.models
from ctseg.cli import main as cli_main
from ctseg.errors import CheckpointError, ConfigError
from ctseg.models import SegmentationModel, create, list_models, pad_to_multiple

PAPER_PARAMS = {"dcswin-paper": 21.9e6, "unetformer-paper": 14.3e6, "dcpoolformer-paper": 17.5e6}
PAPER = list(PAPER_PARAMS)
# Presets with big timm encoders: forward+backward at 64 px takes long on 2 cores.
HEAVY = {"dcswin-small", "dcswin-base"}
ALL_PRESETS = [
    "dcswin-paper",
    "unetformer-paper",
    "dcpoolformer-paper",
    "dcswin-tiny",
    "dcswin-small",
    "dcswin-base",
    "unetformer-r18",
    "dcpoolformer-s12",
]


def _nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def paper_models() -> dict[str, SegmentationModel]:
    torch.manual_seed(0)
    return {name: create(name, num_classes=6).eval() for name in PAPER}


def test_list_models_has_every_preset_and_family() -> None:
    models = list_models()
    for name in [*ALL_PRESETS, "dcfam-<timm name>", "unetformer-<timm name>"]:
        assert name in models and models[name].strip()
    assert list(list_models("*-paper")) == PAPER
    assert ctseg.models.list_models is list_models


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_parameter_count(paper_models: dict[str, SegmentationModel], name: str) -> None:
    n = _nparams(paper_models[name])
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01, n


@pytest.mark.parametrize("name", PAPER)
# 500 is padded to 512 inside, so 512 (slow) adds little beyond 500.
@pytest.mark.parametrize("size", [256, 500, pytest.param(512, marks=pytest.mark.slow)])
def test_paper_preset_output_and_feature_shapes(
    paper_models: dict[str, SegmentationModel], name: str, size: int
) -> None:
    model = paper_models[name]
    with torch.no_grad():
        logits, feats = model(torch.randn(1, 3, size, size), return_features=True)
    assert logits.shape == (1, 6, size, size)
    padded = -(-size // 32) * 32  # 500 -> 512: features refer to the padded input
    assert model.feature_strides == [4, 8, 16, 32]
    assert model.feature_channels == [64, 128, 256, 512]
    assert [tuple(f.shape) for f in feats] == [
        (1, c, padded // s, padded // s) for c, s in zip(model.feature_channels, model.feature_strides)
    ]


def test_unaligned_input_is_pad_predict_crop(paper_models: dict[str, SegmentationModel]) -> None:
    model = paper_models["dcpoolformer-paper"]
    x = torch.randn(1, 3, 100, 84)
    with torch.no_grad():
        a = model(x)
        b = model(pad_to_multiple(x, 32, model.pad_mode))[:, :, :100, :84]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in ALL_PRESETS]
)
def test_preset_forward_backward_cpu(name: str) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=3, pretrained=False).train()
    x = torch.randn(2, 3, 64, 64)
    logits, feats = model(x, return_features=True)
    assert logits.shape == (2, 3, 64, 64)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    loss = logits.logsumexp(1).mean() + sum(f.square().mean() for f in feats)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("name", "channels"),
    [("dcfam-resnet18", [64, 128, 256, 512]), ("unetformer-convnext_atto", [40, 80, 160, 320])],
)
def test_generic_timm_families(name: str, channels: list[int]) -> None:
    model = create(name, num_classes=4).eval()
    assert model.feature_channels == channels
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 4, 64, 96)


def test_unetformer_r18_aux_head_is_optional() -> None:
    assert create("unetformer-r18", 3).decoder.aux_head is None
    model = create("unetformer-r18", 3, decoder_kwargs={"aux_head": True}).train()
    logits, aux = model(torch.randn(2, 3, 64, 64), return_aux=True)
    assert logits.shape == aux.shape == (2, 3, 64, 64)


# --- errors -----------------------------------------------------------------------------------------


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'dcswin-papr'; did you mean dcswin-paper"):
        create("dcswin-papr", 6)


def test_unknown_timm_name_in_family() -> None:
    with pytest.raises(ConfigError, match=r"no model 'resnett18'.*resnet18"):
        create("dcfam-resnett18", 6)


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unexpected keyword argument 'depth'"):
        create("dcpoolformer-paper", 6, depth=3)
    with pytest.raises(ConfigError, match="num_classes"):
        create("dcpoolformer-paper", 0)
    with pytest.raises(ConfigError, match="decoder 'dcfam'"):
        create("dcpoolformer-paper", 6, decoder_kwargs={"heads": 2})


def test_register_model_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="taken"):
        ctseg.models.register_model("dcswin-paper", "again")(lambda num_classes, **kw: None)


# --- CT heads and the deployable network ------------------------------------------------------------


def test_ct_heads_attached_and_dropped_for_inference() -> None:
    model = create("dcpoolformer-paper", num_classes=6, ct={"ignore_index": 6})
    from ctseg.contrastive import PatchContrastiveLoss

    assert isinstance(model.ct_loss, PatchContrastiveLoss)
    assert any(k.startswith("ct_loss.") for k in model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    mask = torch.randint(0, 7, (2, 64, 64))
    _logits, feats = model(x, return_features=True)
    loss, _stats = model.ct_loss(feats, mask)
    assert torch.isfinite(loss)

    infer = model.for_inference()
    assert not infer.training and model.training
    assert not hasattr(infer, "ct_loss")
    state = infer.state_dict()
    assert state and not any(k.startswith("ct_loss.") for k in state)
    full = model.state_dict()
    assert set(state) == {k for k in full if not k.startswith("ct_loss.")}
    for k, v in state.items():
        torch.testing.assert_close(v, full[k])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(infer(x), model(x))


def test_invalid_ct_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="ct:"):
        create("dcpoolformer-paper", 6, ct={"no_such_option": 1})


# --- weights ----------------------------------------------------------------------------------------


def test_whole_model_weights_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    src = create("dcpoolformer-paper", 6).eval()
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, path)
    torch.manual_seed(1)
    dst = create("dcpoolformer-paper", 6, weights=path).eval()
    assert dst.load_report.complete
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_strict_loading_names_the_mismatched_key(tmp_path) -> None:
    state = create("dcpoolformer-paper", 6).state_dict()
    state["decoder.head.1.0.weight"] = torch.zeros(5, 64, 1, 1)  # trained for 5 classes
    path = tmp_path / "five.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"decoder\.head\.1\.0\.weight") as info:
        create("dcpoolformer-paper", 6, weights=path)
    assert str(path) in str(info.value)
    model = create("dcpoolformer-paper", 6, weights=path, partial=True)
    assert [k for k, *_ in model.load_report.mismatched] == ["decoder.head.1.0.weight"]


def test_ct_checkpoint_loads_into_model_without_ct_and_back(tmp_path) -> None:
    ct_model = create("dcpoolformer-paper", 6, ct={"ignore_index": 6})
    path = tmp_path / "ct.pt"
    torch.save(ct_model.state_dict(), path)
    plain = create("dcpoolformer-paper", 6, weights=path)
    assert plain.load_report.complete and not hasattr(plain, "ct_loss")
    # A checkpoint without heads into a CT model: the heads keep their fresh init.
    torch.save(plain.state_dict(), path)
    again = create("dcpoolformer-paper", 6, ct={"ignore_index": 6}, weights=path)
    assert again.load_report.complete and hasattr(again, "ct_loss")


def test_pretrained_encoder_file_strict_and_partial(tmp_path) -> None:
    src = create("unetformer-paper", 6)  # the swin-paper encoder with the cheaper decoder
    state = src.backbone.state_dict()
    path = tmp_path / "encoder.pt"
    torch.save(state, path)
    model = create("unetformer-paper", 6, pretrained=path)
    torch.testing.assert_close(model.backbone.state_dict(), state)
    first = next(iter(state))
    state[first] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=first.replace(".", r"\.")):
        create("unetformer-paper", 6, pretrained=path)
    model = create("unetformer-paper", 6, pretrained=path, partial=True)
    assert [k for k, *_ in model.backbone.load_report.mismatched] == [first]


def test_missing_weights_file() -> None:
    with pytest.raises(CheckpointError, match="not found"):
        create("dcpoolformer-paper", 6, weights="/nonexistent/w.pt")


# --- the CLI ----------------------------------------------------------------------------------------


def test_cli_models_lists_the_registry(capsys) -> None:
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    for name in [*ALL_PRESETS, "dcfam-<timm name>"]:
        assert name in out


def test_cli_models_pattern_and_params(capsys) -> None:
    assert cli_main(["models", "dcpool*-paper", "--params"]) == 0
    out = capsys.readouterr().out
    assert "dcpoolformer-paper" in out and "dcswin-paper" not in out
    assert "17.51" in out


def test_cli_models_no_match_is_an_error(capsys) -> None:
    assert cli_main(["models", "nothing*"]) == 2
    assert "no model matches" in capsys.readouterr().err
