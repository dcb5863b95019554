"""ISPRS Potsdam / Vaihingen preparation on fake archives in the official names, layouts and colours,
and decoding of the real ISPRS samples in ../shared/data/isprs_samples.

Official names used by the fakes (see docs/data.md for the sources): ``2_Ortho_RGB.zip`` →
``2_Ortho_RGB/top_potsdam_2_10_RGB.tif``; ``5_Labels_all.zip`` → ``5_Labels_all/top_potsdam_2_10_label.tif``;
``5_Labels_all_noBoundary.zip`` → ``5_Labels_all_noBoundary/top_potsdam_2_10_label_noBoundary.tif``;
Vaihingen ``ISPRS_semantic_labeling_Vaihingen.zip`` → ``top/top_mosaic_09cm_area1.tif`` and the ground-truth
zips with ``top_mosaic_09cm_area1.tif`` / ``top_mosaic_09cm_area1_noBoundary.tif`` at their root.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctseg.data.layout import read_manifest
from ctseg.data.prepare import prepare
from ctseg.data.prepare.common import decode_colors, sha256_file
from ctseg.data.prepare.isprs import MMSEG_ISPRS_ID_SHIFT, decode_mmseg_isprs
from ctseg.data.preview import colorize
from ctseg.data.protocols import ISPRS_COLORS, get_protocol
from ctseg.errors import DataError, OutputError
from tests.conftest import shared_data_path

TILES = {"train": ("2_11",), "val": ("2_10",), "test": ("2_13",)}


def label_map(rng: np.random.Generator, h: int, w: int, block: int = 50) -> np.ndarray:
    grid = rng.integers(0, 6, size=(-(-h // block), -(-w // block)), dtype=np.uint8)
    return np.kron(grid, np.ones((block, block), np.uint8))[:h, :w]


def erode(idx: np.ndarray) -> np.ndarray:
    """The ``noBoundary`` product: pixels next to another class become ignore (255)."""
    edge = np.zeros(idx.shape, bool)
    edge[:, 1:] |= idx[:, 1:] != idx[:, :-1]
    edge[:, :-1] |= idx[:, 1:] != idx[:, :-1]
    edge[1:, :] |= idx[1:, :] != idx[:-1, :]
    edge[:-1, :] |= idx[1:, :] != idx[:-1, :]
    out = idx.copy()
    out[edge] = 255
    return out


def to_rgb(idx: np.ndarray) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)  # 255 → black: the boundary colour
    lut[:6] = ISPRS_COLORS
    return lut[idx]


def tif_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    return buf.getvalue()


def make_potsdam(
    root: Path, tiles=("2_10", "2_11", "2_13"), size=(600, 600), as_zip: bool = True, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fake Potsdam products; returns tile → (image, full index map, eroded index map)."""
    rng = np.random.default_rng(seed)
    truth, files = {}, {}
    for t in tiles:
        image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        full = label_map(rng, *size)
        eroded = erode(full)
        truth[t] = (image, full, eroded)
        files[("2_Ortho_RGB", f"top_potsdam_{t}_RGB.tif")] = tif_bytes(image)
        files[("2_Ortho_RGB", f"top_potsdam_{t}_RGB.tfw")] = b"0.05\n0\n0\n-0.05\n0\n0\n"
        files[("5_Labels_all", f"top_potsdam_{t}_label.tif")] = tif_bytes(to_rgb(full))
        files[("5_Labels_all_noBoundary", f"top_potsdam_{t}_label_noBoundary.tif")] = tif_bytes(
            to_rgb(eroded)
        )
    root.mkdir(parents=True, exist_ok=True)
    for (product, name), data in files.items():
        if as_zip:
            with zipfile.ZipFile(root / f"{product}.zip", "a") as zf:
                zf.writestr(f"{product}/{name}", data)
        else:
            (root / product).mkdir(exist_ok=True)
            (root / product / name).write_bytes(data)
    return truth


def _mask(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(root / rel))


@pytest.fixture(scope="module")
def potsdam_zips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("potsdam_src")
    return root, make_potsdam(root)


def test_potsdam_paper_from_official_zips(potsdam_zips, tmp_path: Path) -> None:
    src, _ = potsdam_zips
    res = prepare("potsdam", src, tmp_path / "out", "potsdam-paper", splits=TILES)
    m = read_manifest(tmp_path / "out")
    # 600² at 500/500 → 2 x 2 windows; train has the original + h + v flips.
    assert [len(m.split(s)) for s in ("train", "val", "test")] == [12, 4, 4]
    assert res.written == 3 and res.skipped == 0
    assert {t.height for t in m.tiles} == {512} and {t.width for t in m.tiles} == {512}
    assert {t.extra["label_product"] for t in m.split("train")} == {"full"}
    assert {t.extra["label_product"] for t in m.split("test")} == {"eroded"}
    # sources: the three zips, with size and sha256
    assert sorted(Path(s["path"]).name for s in m.sources) == [
        "2_Ortho_RGB.zip",
        "5_Labels_all.zip",
        "5_Labels_all_noBoundary.zip",
    ]
    for s in m.sources:
        assert s["sha256"] == sha256_file(s["path"]) and s["size"] == Path(s["path"]).stat().st_size
    assert get_protocol(m.protocol).name == "potsdam-paper"
    for t in m.tiles:
        values = set(np.unique(_mask(tmp_path / "out", t.mask)).tolist())
        assert values <= {0, 1, 2, 3, 4, 5, 255}
    # train labels are full (no boundary): the top-left tile has no ignore at all
    assert 255 not in _mask(tmp_path / "out", "train/masks/2_11_0_0.png")
    # the bottom-right window holds 100 x 100 real pixels; the rest is ignore padding
    corner = _mask(tmp_path / "out", "train/masks/2_11_500_500.png")
    scale = 512 / 500
    assert (corner[int(101 * scale) :, :] == 255).all() and (
        corner[: int(99 * scale), : int(99 * scale)] != 255
    ).all()
    # eroded test labels carry ignore at class boundaries
    assert (_mask(tmp_path / "out", "test/masks/2_13_0_0.png") == 255).any()


def test_tiles_match_the_source_exactly_without_resize(potsdam_zips, tmp_path: Path) -> None:
    src, truth = potsdam_zips
    prepare("potsdam", src, tmp_path / "out", "potsdam-paper", splits=TILES, resize=None)
    out = tmp_path / "out"
    image, full, _ = truth["2_11"]
    np.testing.assert_array_equal(_mask(out, "train/masks/2_11_0_500.png")[:, :100], full[:500, 500:])
    assert (_mask(out, "train/masks/2_11_0_500.png")[:, 100:] == 255).all()
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "train/images/2_11_0_0.png")), image[:500, :500]
    )
    # flipped copies are tiles of the flipped source
    np.testing.assert_array_equal(_mask(out, "train/masks/2_11_h_0_0.png"), np.fliplr(full)[:500, :500])
    np.testing.assert_array_equal(_mask(out, "train/masks/2_11_v_0_0.png"), np.flipud(full)[:500, :500])
    _, _, test_eroded = truth["2_13"]
    np.testing.assert_array_equal(_mask(out, "test/masks/2_13_0_0.png"), test_eroded[:500, :500])


def test_extracted_folders_give_the_same_tiles_as_zips(potsdam_zips, tmp_path: Path) -> None:
    src, _ = potsdam_zips
    folder = tmp_path / "extracted"
    make_potsdam(folder, as_zip=False)  # same seed → same content
    a = prepare("potsdam", src, tmp_path / "a", "potsdam-paper", splits=TILES).manifest
    b = prepare("potsdam", folder, tmp_path / "b", "potsdam-paper", splits=TILES).manifest
    key = lambda m: sorted((t.id, t.extra["image_sha256"], t.extra["mask_sha256"]) for t in m.tiles)  # noqa: E731
    assert key(a) == key(b)
    assert all(s["kind"] == "file" for s in b.sources)


def test_rerun_is_idempotent_and_resumes_after_damage(potsdam_zips, tmp_path: Path) -> None:
    src, _ = potsdam_zips
    out = tmp_path / "out"
    prepare("potsdam", src, out, "potsdam-paper", splits=TILES)
    first = (out / "manifest.json").read_text()
    again = prepare("potsdam", src, out, "potsdam-paper", splits=TILES)
    assert (again.written, again.skipped) == (0, 3)
    assert (out / "manifest.json").read_text() == first
    (out / "val/masks/2_10_0_0.png").unlink()  # an interrupted or damaged run
    (out / "test/images/2_13_500_0.png").write_bytes(b"garbage")
    resumed = prepare("potsdam", src, out, "potsdam-paper", splits=TILES)
    assert (resumed.written, resumed.skipped) == (2, 1)
    assert (out / "manifest.json").read_text() == first
    with pytest.raises(OutputError, match="potsdam-paper"):
        prepare("potsdam", src, out, "potsdam-mmseg", splits=TILES)


def test_val_is_test_points_val_at_the_test_tiles(potsdam_zips, tmp_path: Path) -> None:
    src, _ = potsdam_zips
    with pytest.warns(UserWarning, match="val_is_test"):
        res = prepare("potsdam", src, tmp_path / "out", "potsdam-paper", splits=TILES, val_is_test=True)
    m = res.manifest
    assert {t.extra["source_id"] for t in m.split("train")} == {"2_10", "2_11"}
    assert [t.image for t in m.split("val")] == [t.image for t in m.split("test")]
    assert all(t.image.startswith("test/") for t in m.split("val"))
    assert not (tmp_path / "out" / "val").exists()


def test_bicubic_mask_interp_warns_and_invents_labels(potsdam_zips, tmp_path: Path) -> None:
    src, _ = potsdam_zips
    with pytest.warns(UserWarning, match="bicubic"):
        prepare("potsdam", src, tmp_path / "cubic", "potsdam-paper", splits=TILES, mask_interp="bicubic")
    prepare("potsdam", src, tmp_path / "near", "potsdam-paper", splits=TILES)
    cubic = _mask(tmp_path / "cubic", "test/masks/2_13_0_0.png")
    near = _mask(tmp_path / "near", "test/masks/2_13_0_0.png")
    assert (cubic != near).any()
    assert set(np.unique(cubic).tolist()) <= {0, 1, 2, 3, 4, 5, 255}


def test_unknown_colour_is_an_error_naming_the_file_or_ignored_on_request(tmp_path: Path) -> None:
    src = tmp_path / "src"
    truth = make_potsdam(src, as_zip=False)
    lab = src / "5_Labels_all" / "top_potsdam_2_11_label.tif"
    rgb = to_rgb(truth["2_11"][1])
    rgb[10:12, 10:13] = (252, 255, 0)
    lab.write_bytes(tif_bytes(rgb))
    with pytest.raises(DataError, match=r"top_potsdam_2_11_label\.tif.*\(252, 255, 0\) \(6 px\)"):
        prepare("potsdam", src, tmp_path / "out", "potsdam-paper", splits=TILES)
    with pytest.warns(UserWarning, match="6 label pixels"):
        res = prepare(
            "potsdam",
            src,
            tmp_path / "out2",
            "potsdam-paper",
            splits=TILES,
            unknown_colors="ignore",
            resize=None,
        )
    assert res.unknown == {str(lab): {"(252, 255, 0)": 6}}
    assert res.manifest.extra["unknown_label_values"] == res.unknown
    assert (_mask(tmp_path / "out2", "train/masks/2_11_0_0.png")[10:12, 10:13] == 255).all()


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_potsdam(src, as_zip=False)
    lab = src / "5_Labels_all_noBoundary" / "top_potsdam_2_10_label_noBoundary.tif"
    lab.write_bytes(tif_bytes(np.full((590, 600, 3), 255, np.uint8)))
    with pytest.raises(
        DataError, match=r"label_noBoundary\.tif: label is 600x590 px but its image .*2_10_RGB\.tif"
    ):
        prepare("potsdam", src, tmp_path / "out", "potsdam-paper", splits=TILES)


def test_missing_tiles_of_train_or_val_are_errors_of_test_a_warning(potsdam_zips, tmp_path: Path) -> None:
    src, _ = potsdam_zips
    with pytest.raises(
        DataError, match=r"train split of protocol potsdam-paper: missing 3_10 \(top_potsdam_3_10_RGB"
    ):
        prepare("potsdam", src, tmp_path / "a", "potsdam-paper", splits={**TILES, "train": ("2_11", "3_10")})
    with pytest.warns(UserWarning, match=r"test split .* absent \(7_13\)"):
        res = prepare(
            "potsdam", src, tmp_path / "b", "potsdam-paper", splits={**TILES, "test": ("2_13", "7_13")}
        )
    assert len(res.manifest.split("test")) == 4
    # the full 38-tile preset on 3 tiles: the missing training tiles are listed
    with pytest.raises(DataError, match=r"missing 2_12 .* and 18 more"):
        prepare("potsdam", src, tmp_path / "c", "potsdam-paper")


def test_missing_label_product_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_potsdam(src, as_zip=False)
    (src / "5_Labels_all_noBoundary" / "top_potsdam_2_13_label_noBoundary.tif").unlink()
    with pytest.raises(DataError, match=r"no 'eroded' label for 2_13"):
        prepare("potsdam", src, tmp_path / "out", "potsdam-paper", splits=TILES)


def test_potsdam_mmseg_tiling_uses_eroded_labels_everywhere(potsdam_zips, tmp_path: Path) -> None:
    src, truth = potsdam_zips
    res = prepare(
        "potsdam", src, tmp_path / "out", "potsdam-mmseg", splits=TILES, tile_size=256, tile_stride=256
    )
    m = res.manifest
    assert {t.extra["label_product"] for t in m.tiles} == {"eroded"}
    assert len(m.split("train")) == 9  # 600 at 256/256 → 3 x 3, no flips
    np.testing.assert_array_equal(
        _mask(tmp_path / "out", "train/masks/2_11_256_0.png"), truth["2_11"][2][256:512, :256]
    )


# --- Vaihingen ------------------------------------------------------------------------------------


def make_vaihingen(root: Path, areas=("area1", "area2", "area3"), size=(300, 260)) -> dict:
    rng = np.random.default_rng(1)
    truth = {}
    root.mkdir(parents=True, exist_ok=True)
    img_zip = zipfile.ZipFile(root / "ISPRS_semantic_labeling_Vaihingen.zip", "w")
    gt_zip = zipfile.ZipFile(root / "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip", "w")
    er_zip = zipfile.ZipFile(root / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip", "w")
    with img_zip, gt_zip, er_zip:
        for a in areas:
            image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            full = label_map(rng, *size, block=40)
            truth[a] = (image, full, erode(full))
            img_zip.writestr(f"top/top_mosaic_09cm_{a}.tif", tif_bytes(image))
            img_zip.writestr(f"dsm/dsm_09cm_matching_{a}.tif", tif_bytes(image[..., 0]))
            gt_zip.writestr(f"top_mosaic_09cm_{a}.tif", tif_bytes(to_rgb(full)))
            er_zip.writestr(f"top_mosaic_09cm_{a}_noBoundary.tif", tif_bytes(to_rgb(erode(full))))
    return truth


def test_vaihingen_tells_images_from_labels_of_the_same_name(tmp_path: Path) -> None:
    truth = make_vaihingen(tmp_path / "src")
    splits = {"train": ("area1",), "val": ("area3",), "test": ("area2",)}
    res = prepare(
        "vaihingen",
        tmp_path / "src",
        tmp_path / "out",
        "vaihingen-geoseg",
        splits=splits,
        tile_size=256,
        tile_stride=128,
        eval_tile_stride=256,
    )
    out = tmp_path / "out"
    # 300 x 260: train at 256/128 and val/test at 256/256 both give 2 x 2 windows
    assert [len(res.manifest.split(s)) for s in ("train", "val", "test")] == [4, 4, 4]
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "train/images/area1_0_0.png")), truth["area1"][0][:256, :256]
    )
    np.testing.assert_array_equal(_mask(out, "train/masks/area1_0_0.png"), truth["area1"][1][:256, :256])
    np.testing.assert_array_equal(_mask(out, "test/masks/area2_0_0.png"), truth["area2"][2][:256, :256])
    with pytest.raises(Exception, match="IRRG"):
        prepare(
            "vaihingen", tmp_path / "src", tmp_path / "o2", "vaihingen-geoseg", splits=splits, imagery="RGB"
        )
    assert [t.extra["x"] for t in res.manifest.split("train")] == [0, 128, 0, 128]


# --- the real ISPRS samples -------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["PotsdamRGB", "PotsdamIRRG", "Vaihingen"])
@pytest.mark.parametrize("name", ["train-0.png", "val-0.png"])
def test_real_geoseg_colour_labels_decode_to_their_index_maps(folder: str, name: str) -> None:
    path = shared_data_path("isprs_samples", "geoseg_examples", folder, "label_rgb", name)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    idx, bad = decode_colors(rgb, ISPRS_COLORS, [(0, 0, 0)], 255, path=path)
    assert bad == {}  # every pixel is an official ISPRS colour
    assert set(np.unique(idx).tolist()) <= set(range(6))
    proto = get_protocol("potsdam-paper")
    np.testing.assert_array_equal(colorize(idx, proto), rgb)  # index map ↔ colours, exactly
    # white = impervious (0), blue = building (1): RGB order, not GeoSeg's BGR constants
    assert (idx[(rgb == (255, 255, 255)).all(-1)] == 0).all()
    assert (idx[(rgb == (0, 0, 255)).all(-1)] == 1).all()


@pytest.mark.parametrize(
    "sample", ["potsdam/ann/2_10_0_0_512_512.png", "vaihingen/ann/area1_0_0_512_512.png"]
)
def test_real_mmseg_labels_after_the_documented_id_shift(sample: str) -> None:
    path = shared_data_path("isprs_samples", *sample.split("/"))
    ann = np.asarray(Image.open(path))
    mask = decode_mmseg_isprs(ann, path=path)
    assert MMSEG_ISPRS_ID_SHIFT[0] is None  # 0 = boundary → ignore
    np.testing.assert_array_equal(mask == 255, ann == 0)
    for k in range(6):
        np.testing.assert_array_equal(mask == k, ann == k + 1)
    assert (ann == 0).any() and (mask == 1).any()  # this crop really has boundary and buildings


def test_real_potsdam_crop_through_the_preparer(tmp_path: Path) -> None:
    """The real 2_10 crop and its eroded labels, written as an official-looking Potsdam folder."""
    img = np.asarray(
        Image.open(shared_data_path("isprs_samples", "potsdam", "img", "2_10_0_0_512_512.png")).convert("RGB")
    )
    ann = np.asarray(Image.open(shared_data_path("isprs_samples", "potsdam", "ann", "2_10_0_0_512_512.png")))
    expected = decode_mmseg_isprs(ann)
    src = tmp_path / "Potsdam"
    (src / "2_Ortho_RGB").mkdir(parents=True)
    (src / "5_Labels_all_noBoundary").mkdir()
    (src / "2_Ortho_RGB" / "top_potsdam_2_10_RGB.tif").write_bytes(tif_bytes(img))
    (src / "5_Labels_all_noBoundary" / "top_potsdam_2_10_label_noBoundary.tif").write_bytes(
        tif_bytes(to_rgb(expected))
    )
    res = prepare(
        "potsdam",
        src,
        tmp_path / "out",
        "potsdam-mmseg",
        splits={"train": ("2_10",)},
        tile_size=256,
        tile_stride=256,
    )
    assert len(res.manifest.split("train")) == 4
    out = tmp_path / "out"
    got = np.zeros_like(expected)
    for t in res.manifest.split("train"):
        y, x = t.extra["y"], t.extra["x"]
        got[y : y + 256, x : x + 256] = _mask(out, t.mask)
        np.testing.assert_array_equal(np.asarray(Image.open(out / t.image)), img[y : y + 256, x : x + 256])
    np.testing.assert_array_equal(got, expected)
    assert json.loads((out / "manifest.json").read_text())["extra"]["dataset"] == "potsdam"


def test_sources_that_disappear_lose_their_tiles(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_potsdam(src, as_zip=False)
    splits = {"train": ("2_10", "2_11"), "test": ("2_13",)}
    prepare("potsdam", src, tmp_path / "out", "potsdam-paper", splits=splits, resize=None)
    assert (tmp_path / "out/test/masks/2_13_0_0.png").is_file()
    for product, suffix in (("2_Ortho_RGB", "RGB"), ("5_Labels_all_noBoundary", "label_noBoundary")):
        (src / product / f"top_potsdam_2_13_{suffix}.tif").unlink()
    with pytest.warns(UserWarning) as caught:
        res = prepare("potsdam", src, tmp_path / "out", "potsdam-paper", splits=splits, resize=None)
    messages = " | ".join(str(w.message) for w in caught)
    assert "removed the tiles of 1 source images" in messages and "absent (2_13)" in messages
    assert not (tmp_path / "out/test/masks/2_13_0_0.png").exists() and not res.manifest.split("test")
    assert (res.written, res.skipped) == (0, 2)


def test_an_archive_of_archives_asks_to_be_extracted(potsdam_zips, tmp_path: Path) -> None:
    src, _ = potsdam_zips
    outer = tmp_path / "Potsdam.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        for z in sorted(src.glob("*.zip")):
            zf.write(z, f"Potsdam/{z.name}")
    with pytest.raises(DataError, match=r"archives inside an archive .*2_Ortho_RGB\.zip"):
        prepare("potsdam", outer, tmp_path / "out", "potsdam-paper", splits=TILES)
