"""ctseg.models.weights: strict / partial loading with reports, checkpoint wrappers, safe reading."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ctseg.errors import CheckpointError
from ctseg.models.weights import LoadReport, load_state_dict_report, read_state_dict


class Tiny(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 4)


def _fresh_sd(width: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in Tiny(width).state_dict().items()
    }


def _assert_equal(module: nn.Module, sd: dict[str, torch.Tensor], keys: list[str]) -> None:
    own = module.state_dict()
    for k in keys:
        torch.testing.assert_close(own[k], sd[k], rtol=0, atol=0)


def test_strict_full_match_loads_everything(tmp_path):
    sd = _fresh_sd()
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    model = Tiny()
    report = load_state_dict_report(model, path)
    assert report.complete
    assert sorted(report.loaded) == sorted(sd)
    assert report.source == str(path)
    _assert_equal(model, sd, list(sd))


def test_strict_names_mismatched_key_and_file(tmp_path):
    sd = _fresh_sd()
    sd["head.weight"] = torch.randn(5, 8)  # 5 classes instead of 4
    path = tmp_path / "other_head.pt"
    torch.save(sd, path)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_state_dict_report(model, path)
    msg = str(info.value)
    assert str(path) in msg
    assert "head.weight (expected [4, 8], got [5, 8])" in msg
    assert "partial=True" in msg
    # An error copies nothing, not even the tensors that fit.
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_strict_names_missing_and_unexpected_keys():
    sd = _fresh_sd()
    del sd["bn.running_var"]
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing: bn\.running_var") as info:
        load_state_dict_report(Tiny(), sd)
    assert "unexpected: extra.weight" in str(info.value)
    assert "<state_dict>" in str(info.value)


def test_non_strict_tolerates_missing_but_not_shapes():
    sd = _fresh_sd()
    del sd["head.bias"]
    model = Tiny()
    report = load_state_dict_report(model, sd, strict=False)
    assert report.missing == ["head.bias"] and not report.mismatched
    _assert_equal(model, sd, report.loaded)
    sd["stem.weight"] = torch.randn(8, 3, 5, 5)
    with pytest.raises(
        CheckpointError, match=r"stem\.weight \(expected \[8, 3, 3, 3\], got \[8, 3, 5, 5\]\)"
    ):
        load_state_dict_report(Tiny(), sd, strict=False)


def test_partial_loads_what_fits_and_logs(caplog):
    source = _fresh_sd(width=8)
    source["head.weight"] = torch.randn(6, 8)  # does not fit
    source["aux.weight"] = torch.randn(2)  # not in the model
    model = Tiny()
    untouched = model.state_dict()["head.weight"].clone()
    with caplog.at_level(logging.WARNING, logger="ctseg.models.weights"):
        report = load_state_dict_report(model, source, partial=True)
    assert report.mismatched == [("head.weight", (4, 8), (6, 8))]
    assert report.unexpected == ["aux.weight"]
    assert report.missing == []
    assert set(report.loaded) == set(source) - {"head.weight", "aux.weight"}
    _assert_equal(model, source, report.loaded)
    torch.testing.assert_close(model.state_dict()["head.weight"], untouched, rtol=0, atol=0)
    assert "head.weight" in caplog.text and "aux.weight" in caplog.text
    text = str(report)
    assert "1 shape mismatches" in text and "1 unexpected" in text


def test_lightning_checkpoint_with_prefix_is_unwrapped(tmp_path):
    sd = _fresh_sd()
    ckpt = {
        "epoch": 3,
        "global_step": 10,
        "state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}
        | {"model.decoder.conv.weight": torch.zeros(2, 2)},
        "optimizer_states": [],
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    model = Tiny()
    report = load_state_dict_report(model, path)
    assert report.prefix == "model.backbone."
    assert report.ignored == ["model.decoder.conv.weight"]
    assert report.complete
    _assert_equal(model, sd, list(sd))


def test_model_wrapper_and_module_prefix():
    sd = _fresh_sd()
    wrapped = {"model": {f"module.{k}": v for k, v in sd.items()}, "meta": {"note": "x"}}
    flat, name = read_state_dict(wrapped)
    assert set(flat) == set(sd) and name == "<state_dict>"
    model = Tiny()
    assert load_state_dict_report(model, wrapped).complete


def test_explicit_prefix_map():
    sd = _fresh_sd()
    renamed = {k.replace("stem.", "encoder.conv0."): v for k, v in sd.items()}
    model = Tiny()
    report = load_state_dict_report(model, renamed, prefix_map={"encoder.conv0.": "stem."})
    assert report.complete and report.prefix == ""
    _assert_equal(model, sd, list(sd))


class _NotATensor:
    pass


def test_pickled_objects_refused_with_clear_error(tmp_path):
    path = tmp_path / "geoseg_style.pth"
    torch.save({"state_dict": _fresh_sd(), "config": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_state_dict_report(Tiny(), path)
    assert str(path) in str(info.value)
    # The user can opt in for files they trust.
    assert load_state_dict_report(Tiny(), path, weights_only=False).complete


def test_unreadable_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_report(Tiny(), tmp_path / "absent.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt\.pt: not a readable PyTorch checkpoint"):
        load_state_dict_report(Tiny(), bad)
    empty = tmp_path / "meta_only.pt"
    torch.save({"epoch": 1, "config": {"lr": 0.1}}, empty)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_state_dict_report(Tiny(), empty)


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _fresh_sd().items()}
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    model = Tiny()
    assert load_state_dict_report(model, path).complete
    _assert_equal(model, sd, list(sd))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"broken\.safetensors"):
        load_state_dict_report(Tiny(), broken)


def test_report_str_lists_keys_by_name():
    report = LoadReport(
        source="f.pt",
        loaded=["a"],
        missing=[f"m{i}" for i in range(12)],
        mismatched=[("w", (1, 2), (3, 4))],
    )
    text = str(report)
    assert "loaded 1/14 tensors from f.pt" in text
    assert "w (expected [1, 2], got [3, 4])" in text
    assert "m0, m1" in text and "and 2 more" in text
    assert not report.complete
