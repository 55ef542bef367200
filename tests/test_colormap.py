"""Colour maps (issue 17, part 1): the 8-bit grey a pipeline writes, coloured through matplotlib's tables.

The definition checked here: each output pixel's RGB is ``matplotlib.colormaps[name](v, bytes=True)[:3]``
where ``v`` is the grey value the same pipeline writes without the colour map, computed by matplotlib
itself on the node's own grey output (never through the node's table).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pydicom
import pytest
from PIL import Image

from node.config import ConfigError, load_config
from node.config.pipeline import OutputFormat, Pipeline, PipelineError, WindowSpec, parse_steps, series_description
from node.imaging.colormap import UnknownColormap, apply_colormap, check_colormap, colormap_names, colormap_table
from node.imaging.voi import WINDOWS
from tests.support import HEAD, bundled, dciodvfy_errors, marked_line, run_cli


def outputs(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{suffix}") if not p.name.startswith("."))


def matplotlib_rgb(name: str, grey: np.ndarray) -> np.ndarray:
    """The definition, by matplotlib: integer grey indexes the colour map's table."""
    cmap = matplotlib.colormaps[name]
    assert cmap.N == 256, f"{name}: the integer definition is for 256-entry tables"
    return cmap(grey, bytes=True)[..., :3]


# --------------------------------------------------------------------------- the table


def test_every_256_entry_map_is_matplotlibs_integer_table() -> None:
    names = colormap_names()
    assert "ocean_r" in names and "bone" in names and "viridis_r" in names
    assert len(names) == len(list(matplotlib.colormaps)) >= 150
    checked = 0
    for name in names:
        cmap = matplotlib.colormaps[name]
        table = colormap_table(name)
        assert table.shape == (256, 3) and table.dtype == np.uint8 and not table.flags.writeable
        if cmap.N == 256:
            expected = np.array([cmap(v, bytes=True)[:3] for v in range(256)], dtype=np.uint8)
            checked += 1
        else:  # tab10, Set1, twilight (510) ...: the whole map spread over 0..255
            expected = cmap(np.arange(256) / 255, bytes=True)[:, :3]
        assert np.array_equal(table, expected), name
    assert checked >= 140


def test_apply_colormap_indexes_the_table() -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    table = colormap_table("ocean_r")
    rgb = apply_colormap(grey, table)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, matplotlib_rgb("ocean_r", grey))
    with pytest.raises(ValueError, match="8-bit grey"):
        apply_colormap(grey.astype(np.uint16), table)


def test_a_spread_qualitative_map_uses_all_its_colours() -> None:
    table = colormap_table("tab10")
    assert len({tuple(row) for row in table}) == 10  # integer indexing would give 10 + the last colour for 246


@pytest.mark.parametrize(("name", "close"), [("Bone", "bone"), ("ocean-r", "ocean_r"), ("virdis", "viridis"),
                                               ("oceanr", "ocean_r")])
def test_unknown_name_lists_close_names(name: str, close: str) -> None:
    with pytest.raises(UnknownColormap) as info:
        check_colormap(name)
    assert close in info.value.close
    assert f"unknown colour map {name!r}" in str(info.value) and repr(close) in str(info.value)


def test_no_close_name_still_says_what_is_allowed() -> None:
    with pytest.raises(UnknownColormap) as info:
        check_colormap("zzzzqqqq")
    assert info.value.close == [] and "matplotlib.colormaps" in str(info.value)
    with pytest.raises(UnknownColormap):
        check_colormap(7)


# --------------------------------------------------------------------------- the pipeline


def test_steps_take_a_colormap_after_the_display() -> None:
    pipeline = parse_steps("p", [{"op": "rescale"}, {"op": "window", "preset": "brain"},
                                 {"op": "colormap", "name": "ocean_r"}], "png")
    assert pipeline.colormap == "ocean_r"
    assert pipeline.describe().endswith("brain window C=40 W=80 LINEAR; colour map ocean_r; 8-bit")
    assert series_description(pipeline, "Head") == "Head: brain W80 L40, ocean_r [p]"
    alone = parse_steps("q", [{"op": "colormap", "name": "bone"}])
    assert alone.colormap == "bone" and alone.display is None
    # a colour map changes what is written: another derived series
    plain = parse_steps("p", [{"op": "rescale"}, {"op": "window", "preset": "brain"}], "png")
    assert plain.fingerprint() != pipeline.fingerprint()
    assert plain.fingerprint() == Pipeline("x", OutputFormat.PNG, rescale=True,
                                           display=WindowSpec(window=WINDOWS["brain"], name="brain")).fingerprint()


@pytest.mark.parametrize(("steps", "output", "message"), [
    ([{"op": "colormap", "name": "bone"}, {"op": "window", "preset": "brain"}], "sc",
     "step 2: window must come before colormap"),
    ([{"op": "colormap", "name": "bone"}, {"op": "colormap", "name": "bone"}], "sc", "only one colormap step"),
    ([{"op": "channels", "windows": ["brain", "subdural"]}, {"op": "colormap", "name": "bone"}], "sc",
     "channels are already RGB"),
    ([{"op": "colormap", "name": "bone"}], "png16", "8-bit only"),
    ([{"op": "colormap", "name": "bone"}], "sc16", "8-bit only"),
    ([{"op": "colormap", "name": "bone"}], "gsps", "colormap: a colour map makes a colour image, and a Grayscale"),
    ([{"op": "rescale"}, {"op": "window", "preset": "brain"}, {"op": "colormap", "name": "bone"}], "nifti",
     "volume outputs (nifti, npz) keep values"),
    ([{"op": "colormap"}], "sc", "give name = a matplotlib colour map"),
    ([{"op": "colormap", "name": "bone", "reverse": True}], "sc", "unknown key(s) reverse"),
    ([{"op": "colormap", "name": "ocean-r"}], "sc", "did you mean 'ocean_r'"),
])
def test_steps_refuse_colormaps_that_cannot_work(steps: list, output: str, message: str) -> None:
    with pytest.raises(PipelineError) as info:
        parse_steps("p", steps, output)
    assert message in str(info.value)


def test_config_check_points_at_the_colormap_name(tmp_path: Path) -> None:
    text = HEAD + """\
[[pipelines]]
name = "ct"
steps = [
    { op = "rescale" },
    { op = "window", preset = "brain" },
    { op = "colormap", name = "Ocean_r" }, # <-
]

[[destinations]]
name = "folder"
kind = "folder"
path = "out"

[[routes]]
match = {}
pipeline = "ct"
destinations = ["folder"]
"""
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = str(info.value)
    prefix = f"{path}:{marked_line(text)}: pipelines[1] (name \"ct\").steps[3].name: "
    assert error.startswith(prefix), error
    assert "unknown colour map 'Ocean_r'; did you mean 'ocean_r'" in error


def test_shipped_config_example_has_a_colormap_pipeline() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "config" / "node.toml")
    assert config.pipelines["ct-brain-bone"].colormap == "bone"


# --------------------------------------------------------------------------- end to end


def test_cli_cmap_sc_is_valid_rgb_of_the_grey_the_pipeline_writes(ct_series_dir: Path, tmp_path: Path) -> None:
    source = ct_series_dir / "10.dcm"
    grey_out, rgb_out = tmp_path / "grey", tmp_path / "rgb"
    assert run_cli("process", str(source), "--out", str(grey_out), "--window", "brain").returncode == 0
    result = run_cli("process", str(source), "--out", str(rgb_out), "--window", "brain", "--cmap", "ocean_r")
    assert result.returncode == 0, result.stderr
    (grey_path,), (rgb_path,) = outputs(grey_out, ".dcm"), outputs(rgb_out, ".dcm")
    errors, report = dciodvfy_errors(rgb_path)
    assert not errors, report
    sc = pydicom.dcmread(rgb_path)
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
    assert "colour map ocean_r" in sc.DerivationDescription and "ocean_r" in sc.SeriesDescription
    grey = pydicom.dcmread(grey_path).pixel_array
    assert grey.dtype == np.uint8 and len(np.unique(grey)) > 50
    assert np.array_equal(sc.pixel_array, matplotlib_rgb("ocean_r", grey))
    assert sc.SeriesInstanceUID != pydicom.dcmread(grey_path).SeriesInstanceUID


def test_cli_cmap_png_series_equalised_per_series(ct_series_dir: Path, tmp_path: Path) -> None:
    common = ("--equalise", "--per", "series", "--format", "png")
    grey_out, rgb_out = tmp_path / "grey", tmp_path / "rgb"
    assert run_cli("process", str(ct_series_dir), "--out", str(grey_out), *common).returncode == 0
    result = run_cli("process", str(ct_series_dir), "--out", str(rgb_out), *common, "--cmap", "bone_r")
    assert result.returncode == 0, result.stderr
    greys, rgbs = outputs(grey_out, ".png"), outputs(rgb_out, ".png")
    assert len(greys) == len(rgbs) == 28
    # names are derived UIDs of the pipeline: pair the slices by their source SOP UID (a PNG text chunk)
    by_source = {Image.open(p).text["SourceSOPInstanceUID"]: p for p in greys}
    for rgb_path in rgbs:
        picture = Image.open(rgb_path)
        assert picture.mode == "RGB"
        grey = np.array(Image.open(by_source[picture.text["SourceSOPInstanceUID"]]))
        assert np.array_equal(np.array(picture), matplotlib_rgb("bone_r", grey))


def test_cli_cmap_after_monochrome1_inversion(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "mono1" / "RG3_J2KR.dcm"
    grey_out, rgb_out = tmp_path / "grey", tmp_path / "rgb"
    assert run_cli("process", str(source), "--out", str(grey_out), "--format", "png").returncode == 0
    result = run_cli("process", str(source), "--out", str(rgb_out), "--format", "png", "--cmap", "viridis")
    assert result.returncode == 0, result.stderr
    (grey_path,), (rgb_path,) = outputs(grey_out, ".png"), outputs(rgb_out, ".png")
    grey = np.array(Image.open(grey_path))
    assert np.array_equal(np.array(Image.open(rgb_path)), matplotlib_rgb("viridis", grey))


def test_cli_cmap_multiframe_sc(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "multiframe" / "siemens_xa10_enhanced_mr_6frames.dcm"
    grey_out, rgb_out = tmp_path / "grey", tmp_path / "rgb"
    assert run_cli("process", str(source), "--out", str(grey_out), "--equalise").returncode == 0
    result = run_cli("process", str(source), "--out", str(rgb_out), "--equalise", "--cmap", "magma")
    assert result.returncode == 0, result.stderr
    (grey_path,), (rgb_path,) = outputs(grey_out, ".dcm"), outputs(rgb_out, ".dcm")
    errors, report = dciodvfy_errors(rgb_path)
    assert not errors, report
    sc = pydicom.dcmread(rgb_path)
    assert sc.NumberOfFrames == 6 and sc.pixel_array.shape == (6, 64, 64, 3)
    assert np.array_equal(sc.pixel_array, matplotlib_rgb("magma", pydicom.dcmread(grey_path).pixel_array))


def test_cli_cmap_refuses_colour_sources_without_grey(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "color" / "US1_UNCR.dcm"
    result = run_cli("process", str(source), "--out", str(tmp_path / "a"), "--cmap", "bone")
    assert result.returncode == 1 and "add the grey step (--grey)" in result.stderr
    result = run_cli("process", str(source), "--out", str(tmp_path / "b"), "--cmap", "bone", "--grey", "--format", "png")
    assert result.returncode == 0, result.stderr
    (path,) = outputs(tmp_path / "b", ".png")
    assert Image.open(path).mode == "RGB"


def test_cli_cmap_usage_errors(tmp_path: Path) -> None:
    source = str(bundled("CT_small.dcm"))
    result = run_cli("process", source, "--out", str(tmp_path / "a"), "--cmap", "Ocean_R")
    assert result.returncode == 2
    assert "argument --cmap: unknown colour map 'Ocean_R'; did you mean 'ocean_r'" in result.stderr
    result = run_cli("process", source, "--out", str(tmp_path / "b"), "--cmap", "bone", "--format", "png16")
    assert result.returncode == 2 and "8-bit only" in result.stderr
    result = run_cli("process", source, "--out", str(tmp_path / "c"), "--cmap", "bone",
                     "--window", "brain", "--window", "subdural")
    assert result.returncode == 2 and "channels are already RGB" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
