"""ONNX export (dynamo exporter) and parity with onnxruntime.

One paper preset (dcpoolformer-paper, the fastest to export) runs in the default suite, dynamic at
256 px and checked at 256 and at another batch and size; the two Swin presets are marked slow (their
export takes minutes on 2 cores). The swin-paper encoder currently makes the exporter specialise the
input size, so those presets fall back to a static graph, with a note saying why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctseg.errors import OutputError
from ctseg.models import create
from ctseg.models.export import ExportResult, check_onnx_parity, export_onnx, run_onnx
from tests.models.test_decoders import tiny_model

TOL = 1e-4


def _export_and_check(name: str, path: Path) -> ExportResult:
    torch.manual_seed(0)
    model = create(name, num_classes=6, ct={"ignore_index": 6}).train()  # exported without heads, in eval
    result = export_onnx(model, path, input_size=(256, 256))
    assert path.is_file() and result.path == path
    assert result.num_classes == 6 and result.opset > 0
    g = torch.Generator().manual_seed(3)
    assert check_onnx_parity(model, path, torch.randn(1, 3, 256, 256, generator=g)) <= TOL
    if result.dynamic:
        # The same file runs at another batch and size, incl. one that needs padding.
        assert result.accepts(2, 320, 288)
        assert check_onnx_parity(model, path, torch.randn(2, 3, 320, 288, generator=g)) <= TOL
    else:
        assert result.notes and not result.accepts(2, 320, 288)
    assert model.training  # exporting did not flip the caller's model to eval
    return result


def test_export_dcpoolformer_paper(tmp_path: Path) -> None:
    result = _export_and_check("dcpoolformer-paper", tmp_path / "dcpoolformer.onnx")
    assert result.dynamic, result.notes
    assert [p.name for p in tmp_path.iterdir()] == ["dcpoolformer.onnx"]  # no temp files left


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dcswin-paper", "unetformer-paper"])
def test_export_swin_paper_presets(tmp_path: Path, name: str) -> None:
    # Dynamic where the swin-paper encoder allows it; today it exports static (see the module docstring).
    _export_and_check(name, tmp_path / f"{name}.onnx")


@pytest.mark.slow
def test_unetformer_decoder_exports_dynamic(tmp_path: Path) -> None:
    # The decoder itself has no size-dependent branches (reflection by index gather).
    model = tiny_model("unetformer")
    result = export_onnx(model, tmp_path / "u.onnx", input_size=(256, 256))
    assert result.dynamic, result.notes
    for shape in [(1, 3, 256, 256), (2, 3, 320, 288), (1, 3, 100, 60)]:
        assert check_onnx_parity(model, result.path, torch.randn(*shape)) <= TOL


@pytest.mark.slow
def test_static_export_and_accepts(tmp_path: Path) -> None:
    model = tiny_model("unetformer")
    result = export_onnx(model, tmp_path / "s.onnx", input_size=(64, 96), dynamic=False)
    assert not result.dynamic and not result.notes
    assert result.accepts(1, 64, 96) and not result.accepts(1, 64, 64) and not result.accepts(2, 64, 96)
    x = torch.randn(1, 3, 64, 96)
    assert check_onnx_parity(model, result.path, x) <= TOL
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        run_onnx(result.path, torch.randn(1, 3, 64, 64))


def test_unwritable_path_fails_before_exporting(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        export_onnx(tiny_model(), blocker / "model.onnx")
