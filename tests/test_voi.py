"""Windowing against dcmtk's dcm2pnm, the standard's formulas, presets and the file's own window."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_voi

from node.imaging import WINDOWS, file_window, floor_levels, to_hu, window, window_scaled
from node.imaging.voi import apply_voi_lut_sequence
from tests.support import bundled, tool

WINDOWS_TO_CHECK = [(40, 80), (-600, 1500), (50, 350), (763, 1639), (0.5, 2), (1000, 1), (37.3, 99.9), (400, 1800)]


def dcm2pnm(path: Path, tmp_path: Path, *args: str) -> np.ndarray:
    out = tmp_path / "dcm2pnm.pgm"
    result = subprocess.run([tool("dcm2pnm"), "+op", *args, str(path), str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return np.array(Image.open(out))


def real_images(data_dir: Path | None) -> list[Path]:
    files = [bundled("CT_small.dcm"), bundled("MR_small.dcm")]
    if data_dir is not None:
        files += sorted((data_dir / "ct_series" / "ge_head_tilt").glob("*.dcm"))[::9]
        files += [data_dir / "transfer_syntaxes" / "1.dcm", data_dir / "transfer_syntaxes" / "3.dcm"]
    return files


@pytest.mark.parametrize("center,width", WINDOWS_TO_CHECK)
def test_8bit_window_identical_to_dcm2pnm(center: float, width: float, tmp_path: Path) -> None:
    from tests.support import test_data_dir

    for path in real_images(test_data_dir()):
        hu = to_hu(pydicom.dcmread(path))
        ours = floor_levels(window_scaled(hu, center, width, out_max=255), 8)
        theirs = dcm2pnm(path, tmp_path, "+Ww", str(center), str(width))
        mismatched = int((ours != theirs).sum())
        assert mismatched == 0, f"{path.name} C={center} W={width}: {mismatched} pixels differ from dcm2pnm"
        # the [0, 1] function agrees with it, up to float rounding on exact integers
        assert np.abs(np.floor(window(hu, center, width) * 255.0).astype(int) - theirs).max() <= 1


def test_file_window_identical_to_dcm2pnm(ct_series_dir: Path, tmp_path: Path) -> None:
    path = ct_series_dir / "01.dcm"
    ds = pydicom.dcmread(path)
    win = file_window(ds)
    assert (win.center, win.width) == (35.0, 100.0)  # the values the data README gives
    ours = floor_levels(window_scaled(to_hu(ds), win.center, win.width, out_max=255), 8)
    assert np.array_equal(ours, dcm2pnm(path, tmp_path, "+Wi", "1"))


def test_standard_formulas_at_their_borders() -> None:
    x = np.array([-1000.0, 9.5, 10.0, 10.5, 59.5, 60.0, 1000.0])
    # LINEAR, C=35 W=50: 0 at or below c - 0.5 - (w-1)/2 = 10, 1 above c - 0.5 + (w-1)/2 = 59
    y = window(x, 35, 50)
    assert y[0] == 0 and y[1] == 0 and y[2] == 0 and y[-1] == 1 and y[-2] == 1
    assert y[3] == pytest.approx(0.5 / 49)
    # LINEAR_EXACT: (x - c) / w + 0.5
    assert window(np.array([10.0, 35.0, 60.0]), 35, 50, "LINEAR_EXACT").tolist() == [0.0, 0.5, 1.0]
    # SIGMOID: 1 / (1 + exp(-4 (x - c) / w)), 0.5 at the centre
    s = window(np.array([35.0, 60.0]), 35, 50, "SIGMOID")
    assert s[0] == pytest.approx(0.5) and s[1] == pytest.approx(1 / (1 + np.exp(-2)), rel=1e-6)
    # width 1 is a threshold
    assert window(np.array([34.0, 34.5, 34.6]), 35, 1).tolist() == [0.0, 0.0, 1.0]


def test_bad_widths_and_functions_are_refused() -> None:
    with pytest.raises(ValueError, match="Width must be >= 1 for LINEAR"):
        window(np.zeros(3), 0, 0.5)
    with pytest.raises(ValueError, match="> 0 for SIGMOID"):
        window(np.zeros(3), 0, 0, "SIGMOID")
    with pytest.raises(ValueError, match="unknown VOI LUT Function"):
        window(np.zeros(3), 0, 10, "CUBIC")


def test_presets_are_fastai_values_as_center_width() -> None:
    # fastai.medical.imaging.dicom_windows stores (width, level)
    fastai = {"brain": (80, 40), "subdural": (254, 100), "stroke": (8, 32), "brain_bone": (2800, 600),
              "brain_soft": (375, 40), "lungs": (1500, -600), "mediastinum": (350, 50),
              "abdomen_soft": (400, 50), "liver": (150, 30), "spine_soft": (250, 50), "spine_bone": (1800, 400)}
    assert {name: (w.width, w.center) for name, w in WINDOWS.items()} == fastai


def test_multi_valued_file_window_and_index() -> None:
    ds = Dataset()
    ds.WindowCenter = [40, 400]
    ds.WindowWidth = [80, 2000]
    ds.VOILUTFunction = "SIGMOID"
    assert file_window(ds, 1).center == 400 and file_window(ds, 1).width == 2000
    assert file_window(ds).function.value == "SIGMOID"
    with pytest.raises(ValueError, match="2 window"):
        file_window(ds, 2)
    with pytest.raises(ValueError, match=r"Window Center \(0028,1050\)"):
        file_window(Dataset())


def test_enhanced_frame_voi_group(data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "multiframe" / "siemens_xa10_enhanced_mr_6frames.dcm")
    for frame in (0, 3):
        expected = ds.PerFrameFunctionalGroupsSequence[frame].FrameVOILUTSequence[0]
        win = file_window(ds, frame=frame)
        assert (win.center, win.width) == (float(expected.WindowCenter), float(expected.WindowWidth))
    assert file_window(ds, frame=0).center != file_window(ds, frame=3).center  # really per frame


def test_voi_lut_sequence_matches_pydicom_and_dcm2pnm(tmp_path: Path) -> None:
    # A real CT slice given a VOI LUT: a 12-bit ramp over HU -200..+300 (LUT Descriptor [500, -200, 12]).
    src = bundled("CT_small.dcm")
    ds = pydicom.dcmread(src)
    item = Dataset()
    item.LUTDescriptor = [500, -200, 12]
    item.LUTData = [int(i * 4095 / 499) for i in range(500)]
    ds.VOILUTSequence = [item]
    item["LUTData"].VR = "US"
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            del ds[keyword]
    path = tmp_path / "ct_voi_lut.dcm"
    ds.save_as(path)
    ds = pydicom.dcmread(path)
    hu = to_hu(ds)
    ours = apply_voi_lut_sequence(hu, ds)
    assert ours.max() <= 1.0 and ours.min() >= 0.0
    assert np.allclose(ours * 4095, apply_voi(np.rint(hu).astype(np.int32), ds).astype(np.float32))
    theirs = dcm2pnm(path, tmp_path, "+Wl", "1")
    diff = np.abs(np.floor(ours.astype(np.float64) * 255).astype(int) - theirs.astype(int))
    assert diff.max() <= 1, f"VOI LUT output differs from dcm2pnm by up to {diff.max()}"
