"""`dicom-node process` end to end, as a user runs it, on real files; outputs checked by real tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from node.imaging import WINDOWS, to_hu
from node.imaging.voi import window_scaled
from tests.support import bundled, dciodvfy_errors, dry_run_config, env_without_config, run_cli, tool


def outputs(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{suffix}") if not p.name.startswith("."))


def test_ct_series_to_sc_valid_and_identical_to_dcm2pnm(ct_series_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("process", str(ct_series_dir), "--out", str(out), "--window", "brain")
    assert result.returncode == 0, result.stderr
    files = outputs(out, ".dcm")
    assert len(files) == 28
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in ct_series_dir.glob("*.dcm")}
    derived_series = set()
    for path in files[::9]:
        errors, report = dciodvfy_errors(path)
        assert not errors, report
    for path in files[::7]:
        sc = pydicom.dcmread(path)
        derived_series.add(sc.SeriesInstanceUID)
        source_path = sources[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]
        source = pydicom.dcmread(source_path)
        assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
        assert sc.SeriesInstanceUID != source.SeriesInstanceUID
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "brain window C=40 W=80" in sc.DerivationDescription
        # pixels identical to dcmtk rendering the source with the same window
        pgm = tmp_path / "ref.pgm"
        subprocess.run([tool("dcm2pnm"), "+op", "+Ww", "40", "80", str(source_path), str(pgm)], check=True)
        assert np.array_equal(sc.pixel_array, np.array(Image.open(pgm)))
    assert len(derived_series) == 1


def test_processing_twice_gives_the_same_uids(tmp_path: Path) -> None:
    src = bundled("CT_small.dcm")
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        assert run_cli("process", str(src), "--out", str(out), "--window=-600,1500").returncode == 0
    names = lambda root: sorted(p.relative_to(root) for p in outputs(root, ".dcm"))  # noqa: E731
    assert names(first) == names(second) and len(names(first)) == 1
    # a different pipeline derives a different series
    other = tmp_path / "c"
    assert run_cli("process", str(src), "--out", str(other), "--window", "lungs").returncode == 0
    assert names(other) != names(first)


def test_negative_window_centre_both_spellings(tmp_path: Path) -> None:
    src = bundled("CT_small.dcm")
    for args in (["--window=-600,1500"], ["--window", "-600,1500"]):
        out = tmp_path / str(len(args))
        result = run_cli("process", str(src), "--out", str(out), "--format", "png", *args)
        assert result.returncode == 0, result.stderr
        (png,) = outputs(out, ".png")
        hu = to_hu(pydicom.dcmread(src))
        expected = np.floor(window_scaled(hu, -600, 1500, out_max=255)).astype(np.uint8)
        assert np.array_equal(np.array(Image.open(png)), expected)


def test_png16_and_equalised_series(ct_series_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eq"
    result = run_cli("process", str(ct_series_dir), "--out", str(out), "--equalise", "--per", "series", "--format", "png16")
    assert result.returncode == 0, result.stderr
    pngs = outputs(out, ".png")
    assert len(pngs) == 28
    arrays = [np.array(Image.open(p)) for p in pngs]
    assert all(a.dtype == np.uint16 for a in arrays)
    volume = np.stack(arrays)
    counts, _ = np.histogram(volume, bins=10, range=(0, 65536))
    assert counts.min() > 0.04 * volume.size, counts  # spread over the whole range


def test_channels_sc_is_valid_rgb(ct_series_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rgb"
    result = run_cli("process", str(ct_series_dir / "10.dcm"), "--out", str(out),
                     "--window", "brain", "--window", "subdural", "--window", "brain_bone")
    assert result.returncode == 0, result.stderr
    (path,) = outputs(out, ".dcm")
    errors, report = dciodvfy_errors(path)
    assert not errors, report
    sc = pydicom.dcmread(path)
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == (512, 512, 3)
    hu = to_hu(pydicom.dcmread(ct_series_dir / "10.dcm"))
    for channel, name in enumerate(("brain", "subdural", "brain_bone")):
        w = WINDOWS[name]
        assert np.array_equal(sc.pixel_array[..., channel], np.floor(window_scaled(hu, w.center, w.width, out_max=255)))


def test_multiframe_to_sc_and_png_frames(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "multiframe" / "emri_small.dcm"
    result = run_cli("process", str(src), "--out", str(tmp_path / "sc"), "--equalise", "--format", "sc16")
    assert result.returncode == 0, result.stderr
    (path,) = outputs(tmp_path / "sc", ".dcm")
    errors, report = dciodvfy_errors(path)
    assert not errors, report
    sc = pydicom.dcmread(path)
    assert sc.NumberOfFrames == 10 and sc.BitsAllocated == 16
    result = run_cli("process", str(src), "--out", str(tmp_path / "png"), "--format", "png")
    assert result.returncode == 0, result.stderr
    assert len(outputs(tmp_path / "png", ".png")) == 10


def test_monochrome1_is_inverted_for_display(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "mono1" / "RG3_J2KR.dcm"
    result = run_cli("process", str(src), "--out", str(tmp_path), "--window", "file", "--format", "png")
    assert result.returncode == 0, result.stderr
    (png,) = outputs(tmp_path, ".png")
    ours = np.array(Image.open(png)).astype(int)
    ds = pydicom.dcmread(src)
    windowed = window_scaled(ds.pixel_array, 550, 1024, out_max=255)
    assert np.array_equal(ours, np.floor(255 - windowed))  # minimum stored value shown white
    # identical to dcm2pnm (which has no JPEG 2000 decoder: give it an uncompressed copy)
    ds.decompress()
    ds.save_as(tmp_path / "mono1_native.dcm")
    pgm = tmp_path / "ref.pgm"
    subprocess.run([tool("dcm2pnm"), "+op", "+Wi", "1", str(tmp_path / "mono1_native.dcm"), str(pgm)], check=True)
    assert np.array_equal(ours, np.array(Image.open(pgm)))


def test_colour_passes_through_or_turns_grey(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "color" / "US1_UNCR.dcm"
    result = run_cli("process", str(src), "--out", str(tmp_path / "rgb"))
    assert result.returncode == 0, result.stderr
    (path,) = outputs(tmp_path / "rgb", ".dcm")
    assert np.array_equal(pydicom.dcmread(path).pixel_array, pydicom.dcmread(src).pixel_array)
    errors, report = dciodvfy_errors(path)
    assert not errors, report
    result = run_cli("process", str(src), "--out", str(tmp_path / "grey"), "--grey", "--equalise", "--format", "png")
    assert result.returncode == 0, result.stderr
    (png,) = outputs(tmp_path / "grey", ".png")
    assert np.array(Image.open(png)).ndim == 2
    result = run_cli("process", str(src), "--out", str(tmp_path / "refused"), "--window", "brain")
    assert result.returncode == 1
    assert "colour image (RGB)" in result.stderr and "--grey" in result.stderr


def test_every_bad_file_gets_one_line_and_the_exit_code_says_so(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(bundled("CT_small.dcm"), folder / "good.dcm")
    shutil.copy(bundled("MR_truncated.dcm"), folder / "truncated.dcm")
    shutil.copy(bundled("rtplan.dcm"), folder / "plan.dcm")
    shutil.copy(data_dir / "broken" / "emri_small_jpeg_2k_lossless_too_short.dcm", folder / "j2k_short.dcm")
    (folder / "README.txt").write_text("not DICOM")
    result = run_cli("process", str(folder), "--out", str(tmp_path / "out"), "--window", "brain")
    assert result.returncode == 1
    assert len(outputs(tmp_path / "out", ".dcm")) == 1
    lines = result.stderr.splitlines()
    for name, why in (("truncated.dcm", "truncated"), ("plan.dcm", "is not an image"), ("j2k_short.dcm", "cut short")):
        matching = [line for line in lines if name in line and "ERROR" in line]
        assert len(matching) == 1 and why in matching[0], (name, result.stderr)
    assert "README.txt: not a DICOM file" in result.stderr
    assert "3 files failed" in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = run_cli("process", str(bundled("CT_small.dcm")), "--out", str(tmp_path), "--window", "nope")
    assert result.returncode == 2 and "not a preset" in result.stderr
    result = run_cli("process", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert result.returncode == 2 and "no such file or folder" in result.stderr
    result = run_cli("process", str(bundled("CT_small.dcm")), "--out", str(tmp_path), "--window", "brain",
                     "--window", "lungs", "--format", "png16")
    assert result.returncode == 2 and "8-bit only" in result.stderr


# --- configured pipelines: process --config / --pipeline (the routes and pipelines of serve, offline) ---


def run_cli_env(*args: str, config_variable: str | None = None) -> subprocess.CompletedProcess:
    """``dicom-node`` with ``$DICOM_NODE_CONFIG`` set to *config_variable*, or unset."""
    named = {} if config_variable is None else {"DICOM_NODE_CONFIG": config_variable}
    return run_cli(*args, env=env_without_config(**named))


def test_process_with_config_takes_each_series_route_as_serve_does(ct_series_dir: Path, tmp_path: Path) -> None:
    config = dry_run_config(tmp_path)
    ct_small, mr, rgb = bundled("CT_small.dcm"), bundled("MR_small.dcm"), bundled("SC_rgb_small_odd.dcm")
    out = tmp_path / "out"
    result = run_cli_env("process", "--config", str(config), "--out", str(out),
                         str(ct_small), str(mr), str(rgb), str(ct_series_dir))
    assert result.returncode == 0, result.stderr
    # the head CT through "brain": 28 SCs, pixels identical to the same window given on the command line
    head = pydicom.dcmread(next(ct_series_dir.glob("*.dcm")), stop_before_pixels=True)
    brain = tmp_path / "brain"
    assert run_cli_env("process", "--out", str(brain), "--window", "brain", str(ct_series_dir)).returncode == 0
    configured = {pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID: p for p in
                  outputs(out / head.StudyInstanceUID, ".dcm")}
    by_options = {pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID: p for p in outputs(brain, ".dcm")}
    assert len(configured) == 28 and configured.keys() == by_options.keys()
    for sop in sorted(configured)[::9]:
        sc = pydicom.dcmread(configured[sop])
        assert sc.DerivationDescription == pydicom.dcmread(by_options[sop]).DerivationDescription
        assert np.array_equal(sc.pixel_array, pydicom.dcmread(by_options[sop]).pixel_array)
    # CT_small (no BodyPartExamined) through "plainpng": one PNG; MR discarded, the RGB SC unrouted: nothing
    small = pydicom.dcmread(ct_small, stop_before_pixels=True)
    assert len(outputs(out / small.StudyInstanceUID, ".png")) == 1
    assert not (out / pydicom.dcmread(mr, stop_before_pixels=True).StudyInstanceUID).exists()
    assert not (out / pydicom.dcmread(rgb, stop_before_pixels=True).StudyInstanceUID).exists()
    assert len([p for p in outputs(out, "") if p.is_file()]) == 29
    mr_uid = pydicom.dcmread(mr, stop_before_pixels=True).SeriesInstanceUID
    assert f"{mr_uid}: nothing written -> discarded by route 1" in result.stderr
    assert "nothing written -> no route: kept unrouted; route 1: Modality 'OT' is not 'MR'" in result.stderr
    assert "2 series not processed" in result.stderr
    assert not (tmp_path / "data").exists()  # no spool, no job store, no delivery
    assert str(small.PatientName) not in result.stderr


def test_process_with_a_named_pipeline_and_usage_errors(tmp_path: Path) -> None:
    config = dry_run_config(tmp_path)
    mr = bundled("MR_small.dcm")
    # --pipeline, the config from $DICOM_NODE_CONFIG: the discard route does not apply
    out = tmp_path / "named"
    named = run_cli_env("process", "--pipeline", "plainpng", "--out", str(out), str(mr), config_variable=str(config))
    assert named.returncode == 0, named.stderr
    assert len(outputs(out, ".png")) == 1 and len([p for p in outputs(out, "") if p.is_file()]) == 1
    # $DICOM_NODE_CONFIG and no pipeline option: the routes (MR discarded)
    routed = run_cli_env("process", "--out", str(tmp_path / "routed"), str(mr), config_variable=str(config))
    assert routed.returncode == 0 and "discarded by route 1" in routed.stderr
    assert not (tmp_path / "routed").exists()
    # $DICOM_NODE_CONFIG and pipeline options: the options win (the variable is a default only)
    options = run_cli_env("process", "--out", str(tmp_path / "opt"), "--window", "brain", str(mr),
                          config_variable=str(config))
    assert options.returncode == 0 and len(outputs(tmp_path / "opt", ".dcm")) == 1
    unknown = run_cli_env("process", "--config", str(config), "--pipeline", "lungs", "--out", str(tmp_path / "u"),
                          str(mr))
    assert unknown.returncode == 2
    assert f"--pipeline 'lungs': no such pipeline in {config}; defined: brain, plainpng" in unknown.stderr
    for mixed in (["--config", str(config), "--window", "brain"], ["--pipeline", "brain", "--equalise"],
                  ["--config", str(config), "--format", "png"], ["--config", str(config), "--max-frame-mb", "8"]):
        refused = run_cli_env("process", *mixed, "--out", str(tmp_path / "m"), str(mr))
        assert refused.returncode == 2, (mixed, refused.stderr)
        assert "cannot be combined with --config/--pipeline" in refused.stderr
        assert not (tmp_path / "m").exists()
