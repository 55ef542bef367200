"""Grayscale Softcopy Presentation State output (``output = "gsps"``) against the real tools.

dcmtk's ``dcmp2pgm -p GSPS SOURCE out.pgm`` renders each source image (``-f N``: each frame)
through the presentation state the node wrote; that must give the same 8-bit pixels as the node's
own PNG output of the same pipeline, at most 1 grey level apart.  dciodvfy must report no error.

Facts about dcmtk 3.6.7 the checks rely on (found here; see node/outputs/gsps.py):

* a LINEAR Window Center/Width is rendered exactly as the node does (0 pixels differ);
* dcmtk shows a 16-bit VOI LUT table entry ``e`` as the grey ``e >> 8`` (MONOCHROME2): a table
  holding the node's 16-bit display (its png16 output) gives ``png16 >> 8`` exactly, at most 1
  above the node's 8-bit ``floor(y * 255)``; that is asserted exactly, not just within 1.  Under
  Presentation LUT Shape INVERSE (MONOCHROME1) dcmtk maps a table onto 1..255, within 1 of the node;
* dcmtk's presentation state reader ignores VOI LUT Function (shown below: a SIGMOID window as
  Window Center/Width + VOI LUT Function renders as LINEAR), hence SIGMOID/LINEAR_EXACT as tables;
* dcmtk's reader refuses a presentation state with an empty Patient's Name (Type 2, empty is
  valid DICOM): for emri_small.dcm, whose name is empty, dcmp2pgm gets a copy named for it;
* dcmtk (free build) has no JPEG 2000 decoder: the MONOCHROME1 CR (JPEG 2000 lossless) is given
  to dcmp2pgm decompressed by pydicom (the same stored values, the same UIDs).
"""

from __future__ import annotations

import datetime
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.app.process_series import SeriesResult, process_series
from node.config import ConfigError, load_config
from node.config.pipeline import OutputFormat, Pipeline, PipelineError, parse_steps
from node.outputs.gsps import GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE
from node.outputs.uids import derived_uid
from node.process.series import InputSeries, group_series, open_images
from tests.support import dciodvfy_errors, run_cli, tool

NOW = datetime.datetime(2026, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)

RESCALE = {"op": "rescale"}
BRAIN = [RESCALE, {"op": "window", "preset": "brain"}]
SIGMOID_CT = [RESCALE, {"op": "window", "center": 40, "width": 80, "function": "SIGMOID"}]
EQUALISE_IMAGE = [RESCALE, {"op": "equalise"}]
EQUALISE_SERIES = [RESCALE, {"op": "equalise", "per": "series"}]


def _series(paths: list[Path]) -> InputSeries:
    images, failures = open_images(paths)
    assert not failures
    (series,) = group_series(images)
    return series


def _process(series: InputSeries, steps: list[dict], output: str, out: Path) -> SeriesResult:
    result = process_series(series, parse_steps("gsps-test", steps, output), out, now=NOW)
    assert not result.failures, result.failures
    return result


def _dcmp2pgm(state: Path, image: Path, frame: int, out: Path) -> np.ndarray:
    result = subprocess.run([tool("dcmp2pgm"), "-f", str(frame), "-p", str(state), str(image), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as picture:
        return np.asarray(picture).astype(np.int64)


def _png(folder: Path, result: SeriesResult, steps: list[dict], output: str, sop_uid: str, frame: int,
         frames: int) -> np.ndarray:
    stem = derived_uid(sop_uid, "instance", parse_steps("gsps-test", steps, output).fingerprint())
    name = f"{stem}_{frame:04d}.png" if frames > 1 else f"{stem}.png"
    with Image.open(folder / result.study_uid / result.derived_series_uid / name) as picture:
        return np.asarray(picture).astype(np.int64)


def _for_dcmtk(state: Path, folder: Path) -> Path:
    """The presentation state as dcmtk can load it: with a Patient's Name when the source has none."""
    ds = pydicom.dcmread(state)
    if str(ds.PatientName):
        return state
    ds.PatientName = "EMPTY^FOR DCMTK"  # dcmpstat refuses an empty name (module docstring)
    path = folder / "named-for-dcmtk.dcm"
    ds.save_as(path)
    return path


@dataclass
class Rendered:
    state: pydicom.Dataset
    largest_difference: int
    differing: int
    pixels: int
    off_png16: int  # pixels where dcmtk differs from png16 >> 8


def _render_and_compare(series: InputSeries, steps: list[dict], tmp: Path,
                        dcmtk_sources: dict[str, Path] | None = None) -> Rendered:
    """Write the series' presentation state and PNGs (8 and 16-bit); render every source frame
    through the presentation state with dcmp2pgm and compare with the PNGs."""
    gsps = _process(series, steps, "gsps", tmp / "gsps")
    png8 = _process(series, steps, "png", tmp / "png")
    png16 = _process(series, steps, "png16", tmp / "png16")
    (state_path,) = gsps.outputs
    errors, output = dciodvfy_errors(state_path)
    assert errors == [], output
    loadable = _for_dcmtk(state_path, tmp)
    largest = differing = pixels = off16 = 0
    for image in series.images:
        sop = str(image.header.SOPInstanceUID)
        source = (dcmtk_sources or {}).get(sop, image.path)
        for frame in range(1, image.number_of_frames + 1):
            dcmtk = _dcmp2pgm(loadable, source, frame, tmp / "frame.pgm")
            node = _png(tmp / "png", png8, steps, "png", sop, frame, image.number_of_frames)
            node16 = _png(tmp / "png16", png16, steps, "png16", sop, frame, image.number_of_frames)
            assert dcmtk.shape == node.shape
            difference = np.abs(dcmtk - node)
            largest = max(largest, int(difference.max()))
            differing += int(np.count_nonzero(difference))
            pixels += difference.size
            off16 += int(np.count_nonzero((node16 >> 8) != dcmtk))
    return Rendered(pydicom.dcmread(state_path), largest, differing, pixels, off16)


def _referenced_sops(state: pydicom.Dataset) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for series in state.ReferencedSeriesSequence
            for item in series.ReferencedImageSequence]


def _tables(state: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [item for item in state.SoftcopyVOILUTSequence if "VOILUTSequence" in item]


def _assert_shows_the_series(state: pydicom.Dataset, series: InputSeries) -> None:
    assert state.SOPClassUID == GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE
    assert state.Modality == "PR"
    assert state.StudyInstanceUID == series.study_uid
    assert state.SeriesInstanceUID != series.series_uid
    assert "PixelData" not in state
    assert sorted(_referenced_sops(state)) == sorted(str(i.header.SOPInstanceUID) for i in series.images)


# --- the shared real CT series ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ct(data_dir_module: Path) -> InputSeries:
    return _series(sorted((data_dir_module / "ct_series" / "ge_head_tilt").glob("*.dcm")))


@pytest.fixture(scope="module")
def data_dir_module() -> Path:
    from tests.support import require_test_data

    return require_test_data()


def test_ct_window_renders_exactly_as_the_node(ct: InputSeries, tmp_path: Path) -> None:
    rendered = _render_and_compare(ct, BRAIN, tmp_path)
    _assert_shows_the_series(rendered.state, ct)
    assert rendered.pixels == 28 * 512 * 512
    assert (rendered.largest_difference, rendered.differing) == (0, 0)
    (item,) = rendered.state.SoftcopyVOILUTSequence
    assert (float(item.WindowCenter), float(item.WindowWidth)) == (40.0, 80.0)
    assert "VOILUTFunction" not in item and "ReferencedImageSequence" not in item
    assert item.WindowCenterWidthExplanation == "brain window C=40 W=80 LINEAR"
    assert (rendered.state.RescaleSlope, rendered.state.RescaleIntercept, rendered.state.RescaleType) == (1, 0, "HU")
    assert rendered.state.PresentationLUTShape == "IDENTITY"


@pytest.mark.parametrize(("steps", "tables"), [
    (SIGMOID_CT, 1),
    (EQUALISE_IMAGE, 28),
    (EQUALISE_SERIES, 1),
    ([RESCALE, {"op": "clip", "min": 0, "max": 60}, {"op": "window", "preset": "brain"}], 1),
], ids=["sigmoid", "equalise-per-image", "equalise-per-series", "clip-then-window"])
def test_ct_tables_render_within_one_grey_level(ct: InputSeries, tmp_path: Path, steps: list[dict],
                                                 tables: int) -> None:
    rendered = _render_and_compare(ct, steps, tmp_path)
    _assert_shows_the_series(rendered.state, ct)
    assert rendered.largest_difference == 1  # the table is 16-bit: some pixels land one level higher
    assert rendered.off_png16 == 0  # ... exactly the node's 16-bit display, as dcmtk quantises it
    assert len(_tables(rendered.state)) == len(rendered.state.SoftcopyVOILUTSequence) == tables
    for item in _tables(rendered.state):
        lut = item.VOILUTSequence[0]
        assert lut.LUTDescriptor[2] == 16
        assert lut["LUTDescriptor"].VR == ("SS" if lut.LUTDescriptor[1] < 0 else "US")
        assert lut.LUTDescriptor[1] < 0  # CT tables start at negative HU (highdicom alone refuses that)
    if tables > 1:  # one per image, each referencing its image
        referenced = [item.ReferencedImageSequence[0].ReferencedSOPInstanceUID for item in _tables(rendered.state)]
        assert sorted(referenced) == sorted(_referenced_sops(rendered.state))
    if steps is SIGMOID_CT:
        assert _tables(rendered.state)[0].VOILUTSequence[0].LUTExplanation == "window C=40 W=80 SIGMOID"


def test_dcmtk_renders_a_voi_lut_function_as_linear_hence_tables(ct: InputSeries, tmp_path: Path) -> None:
    """Why SIGMOID is a table: the same window as Window Center/Width + VOI LUT Function SIGMOID
    is rendered by dcmp2pgm exactly like the LINEAR window (if dcmtk learns the function, this fails)."""
    (state_path,) = _process(ct, BRAIN, "gsps", tmp_path / "gsps").outputs
    state = pydicom.dcmread(state_path)
    state.SoftcopyVOILUTSequence[0].VOILUTFunction = "SIGMOID"
    sigmoid_state = tmp_path / "sigmoid-function.dcm"
    state.save_as(sigmoid_state)
    png = _process(ct, SIGMOID_CT, "png", tmp_path / "png")
    image = ct.images[14]
    sop = str(image.header.SOPInstanceUID)
    linear = _dcmp2pgm(state_path, image.path, 1, tmp_path / "linear.pgm")
    as_function = _dcmp2pgm(sigmoid_state, image.path, 1, tmp_path / "function.pgm")
    node_sigmoid = _png(tmp_path / "png", png, SIGMOID_CT, "png", sop, 1, 1)
    assert np.array_equal(as_function, linear)
    assert np.abs(as_function - node_sigmoid).max() > 16


def test_ct_sources_lacking_type2_attributes_and_deidentified(ct: InputSeries, tmp_path: Path) -> None:
    """highdicom alone raises AttributeError on these sources; dciodvfy flagged Laterality and the
    empty De-identification Method of its object."""
    first = ct.images[0].header
    assert "PatientBirthDate" not in first and "PatientSex" not in first
    assert first.PatientIdentityRemoved == "YES" and first.DeidentificationMethod == ""
    (path,) = _process(ct, BRAIN, "gsps", tmp_path).outputs
    assert first.DeidentificationMethod == "" and "PatientBirthDate" not in first  # the source is left as it was
    state = pydicom.dcmread(path)
    assert state.PatientBirthDate == "" and state.PatientSex == ""
    assert state.PatientID == first.PatientID
    assert state.DeidentificationMethod == "unspecified in source"
    assert state.BodyPartExamined == "HEAD" and "Laterality" not in state  # HEAD is unpaired
    assert state.SeriesDescription == "brain W80 L40 [gsps-test]"
    assert state.ContentLabel == "GSPS_TEST"
    assert (state.PresentationCreationDate, state.PresentationCreationTime) == ("20260203", "040506.000000")


def test_processing_again_replaces_the_same_object(ct: InputSeries, tmp_path: Path) -> None:
    first = _process(ct, EQUALISE_SERIES, "gsps", tmp_path)
    content = first.outputs[0].read_bytes()
    again = _process(ct, EQUALISE_SERIES, "gsps", tmp_path)
    assert again.outputs == first.outputs and again.outputs[0].read_bytes() == content
    assert again.derived_series_uid == derived_uid(ct.series_uid, "series", parse_steps(
        "gsps-test", EQUALISE_SERIES, "gsps").fingerprint())
    other = _process(ct, EQUALISE_IMAGE, "gsps", tmp_path)
    assert other.derived_series_uid != first.derived_series_uid  # another pipeline, another series
    sc = _process(ct, EQUALISE_SERIES, "sc", tmp_path)
    assert sc.derived_series_uid != first.derived_series_uid  # the SCs of the same steps are another series
    assert len(list(tmp_path.rglob("*.dcm"))) == 2 + 28


# --- enhanced multi-frame MR ----------------------------------------------------------------------


MR_STEPS = [
    ([RESCALE, {"op": "window", "center": 300, "width": 600}], True),
    ([RESCALE, {"op": "window", "center": 300, "width": 600, "function": "SIGMOID"}], False),
    (EQUALISE_IMAGE, False),
    (EQUALISE_SERIES, False),
]
MR_IDS = ["window", "sigmoid", "equalise-per-image", "equalise-per-series"]


@pytest.mark.parametrize(("steps", "window"), MR_STEPS, ids=MR_IDS)
@pytest.mark.parametrize("name", ["siemens_xa10_enhanced_mr_6frames.dcm", "emri_small.dcm"])
def test_enhanced_multiframe_mr_every_frame(data_dir: Path, tmp_path: Path, name: str, steps: list[dict],
                                            window: bool) -> None:
    """Per-frame tables reference their frame (dcmp2pgm -f N applies them); highdicom alone fails on both
    files (per-frame Pixel Value Transformation; no shared functional groups)."""
    series = _series([data_dir / "multiframe" / name])
    frames = series.images[0].number_of_frames
    rendered = _render_and_compare(series, steps, tmp_path)
    _assert_shows_the_series(rendered.state, series)
    assert rendered.pixels == frames * 64 * 64
    assert rendered.largest_difference <= 1
    if window:
        assert rendered.differing == 0
    else:
        assert rendered.off_png16 == 0 and rendered.differing > 0
    items = rendered.state.SoftcopyVOILUTSequence
    if steps is EQUALISE_IMAGE:  # one table per frame of the image
        assert len(items) == frames
        assert sorted(int(item.ReferencedImageSequence[0].ReferencedFrameNumber) for item in items) == list(
            range(1, frames + 1))
    else:
        assert len(items) == 1


# --- the MONOCHROME1 CR -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cr(data_dir_module: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[InputSeries, dict[str, Path]]:
    path = data_dir_module / "mono1" / "RG3_J2KR.dcm"
    native = pydicom.dcmread(path)
    native.decompress(generate_instance_uid=False)  # for dcmtk, which has no JPEG 2000 decoder; same UIDs
    copy = tmp_path_factory.mktemp("cr") / "RG3_native.dcm"
    native.save_as(copy)
    series = _series([path])
    return series, {str(native.SOPInstanceUID): copy}


@pytest.mark.parametrize(("steps", "window"), [
    ([RESCALE, {"op": "window", "from": "file"}], True),
    ([RESCALE, {"op": "window", "center": 500, "width": 800, "function": "SIGMOID"}], False),
    (EQUALISE_IMAGE, False),
    (EQUALISE_SERIES, False),
], ids=["file-window", "sigmoid", "equalise-per-image", "equalise-per-series"])
def test_monochrome1_keeps_its_inversion(cr: tuple[InputSeries, dict[str, Path]], tmp_path: Path,
                                         steps: list[dict], window: bool) -> None:
    series, natives = cr
    assert series.images[0].is_monochrome1
    rendered = _render_and_compare(series, steps, tmp_path, natives)
    _assert_shows_the_series(rendered.state, series)
    assert rendered.state.PresentationLUTShape == "INVERSE"
    assert rendered.largest_difference == (0 if window else 1)
    assert rendered.differing > 0 or window


# --- what a presentation state cannot show -------------------------------------------------------


def test_a_colour_source_is_refused_with_why(data_dir: Path, tmp_path: Path) -> None:
    series = _series([data_dir / "color" / "US1_UNCR.dcm"])
    result = process_series(series, parse_steps("gsps-test", [{"op": "window", "preset": "brain"}], "gsps"),
                            tmp_path, now=NOW)
    assert result.outputs == []
    (failure,) = result.failures
    assert "colour image (RGB)" in failure.reason and "grey images only" in failure.reason


CONFIG = """\
[node]
data_dir = "var"
[[pipelines]]
name = "bad"
output = "gsps"
steps = [{{ op = "rescale" }}, {step}] # <-
[[destinations]]
name = "pacs"
kind = "dicom"
host = "127.0.0.1"
port = 4242
ae_title = "PACS"
[[destinations]]
name = "web"
kind = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"
[[destinations]]
name = "folder"
kind = "folder"
path = "out"
[[routes]]
match = {{}}
pipeline = "bad"
destinations = ["pacs", "web", "folder"]
"""


@pytest.mark.parametrize(("step", "why"), [
    ('{ op = "channels", windows = ["brain", "subdural"] }', "channels make an RGB image"),
    ('{ op = "colormap", name = "ocean_r" }', "a colour map makes a colour image"),
], ids=["channels", "colormap"])
def test_config_check_refuses_what_a_gsps_cannot_express(tmp_path: Path, step: str, why: str) -> None:
    text = CONFIG.format(step=step)
    path = tmp_path / "node.toml"
    path.write_text(text)
    line = next(n for n, row in enumerate(text.splitlines(), start=1) if "# <-" in row)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: pipelines[1] (name \"bad\").steps: "), message
    assert why in message and "use output sc or png" in message


def test_config_grey_step_refused_and_gsps_routes_to_every_destination_kind(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(CONFIG.format(step='{ op = "window", preset = "brain" }').replace(
        'steps = [{ op = "rescale" }', 'steps = [{ op = "grey" }, { op = "rescale" }'))
    with pytest.raises(ConfigError, match=r"steps: pipeline 'bad' step 1: grey: .*grey images only"):
        load_config(path)
    path.write_text(CONFIG.format(step='{ op = "equalise", per = "series" }'))
    config = load_config(path)
    assert config.pipelines["bad"].output is OutputFormat.GSPS
    assert config.routes[0].destinations == ("pacs", "web", "folder")


def test_pipeline_refuses_channels_and_grey_for_gsps() -> None:
    from node.config.pipeline import Channels, WindowSpec

    windows = (WindowSpec(name="a", from_file=True), WindowSpec(name="b", from_file=True))
    with pytest.raises(PipelineError, match="channels make an RGB image"):
        Pipeline(name="x", output=OutputFormat.GSPS, display=Channels(windows))
    with pytest.raises(PipelineError, match="grey images only"):
        Pipeline(name="x", output=OutputFormat.GSPS, grey=True)


def test_cli_format_gsps_and_its_refusals(data_dir: Path, tmp_path: Path) -> None:
    ct = data_dir / "ct_series" / "ge_head_tilt" / "05.dcm"
    assert str(pydicom.dcmread(ct, stop_before_pixels=True).PatientName) == "REMOVED"  # highdicom warns naming it
    result = run_cli("process", str(ct), "--out", str(tmp_path / "out"), "--window", "brain", "--format", "gsps")
    assert result.returncode == 0, result.stderr
    (written,) = list((tmp_path / "out").rglob("*.dcm"))
    state = pydicom.dcmread(written)
    assert state.SOPClassUID == GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE
    assert _referenced_sops(state) == [pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID]
    errors, output = dciodvfy_errors(written)
    assert errors == [], output
    assert "REMOVED" not in result.stderr  # highdicom's person-name warning is silenced
    for extra, why in ((["--grey"], "grey images only"),
                       (["--window", "subdural"], "channels make an RGB image")):
        refused = run_cli("process", str(ct), "--out", str(tmp_path / "no"), "--window", "brain", *extra,
                          "--format", "gsps")
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr
    assert not (tmp_path / "no").exists()


def test_the_documented_example_pipeline_is_a_presentation_state() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "config" / "node.toml")
    example = config.pipelines["ct-brain-view"]
    assert example.output is OutputFormat.GSPS and example.display is not None


@pytest.mark.parametrize(("name", "label"), [
    ("ct-brain view", "CT_BRAIN_VIEW"), ("2d_eq", "P_2D_EQ"), ("_x_", "X"), ("ü", "DICOM_NODE"),
    ("a-very-long-pipeline-name", "A_VERY_LONG_PIPE"), ("abcdefghijklmno-p", "ABCDEFGHIJKLMNO"),
])
def test_content_label_is_a_code_string_highdicom_accepts(name: str, label: str) -> None:
    from highdicom.valuerep import _check_code_string

    from node.outputs.gsps import content_label

    assert content_label(name) == label
    _check_code_string(label)  # raises for what highdicom would refuse


# --- Modality LUTs a presentation state cannot carry once, and series of several sizes -------------


def test_modality_lut_sequence_is_folded_into_tables_over_stored_values(data_dir: Path, tmp_path: Path) -> None:
    series = _series([data_dir / "lut" / "mlut_18.dcm"])
    assert series.images[0].header.get("ModalityLUTSequence")
    for number, steps in enumerate(([RESCALE, {"op": "window", "center": 0, "width": 2000}], EQUALISE_IMAGE)):
        rendered = _render_and_compare(series, steps, tmp_path / str(number))
        state = rendered.state
        assert (state.RescaleSlope, state.RescaleIntercept) == (1, 0)  # identity: the LUT is in the table
        assert len(_tables(state)) == 1
        assert rendered.largest_difference == 1 and rendered.off_png16 == 0


def test_non_integral_rescale_carried_for_a_window_folded_for_a_table(data_dir: Path, tmp_path: Path) -> None:
    path = data_dir / "compressed" / "MR2_J2KI.dcm"
    native = pydicom.dcmread(path)
    native.decompress(generate_instance_uid=False)  # dcmtk has no JPEG 2000 decoder
    native.save_as(tmp_path / "native.dcm")
    natives = {str(native.SOPInstanceUID): tmp_path / "native.dcm"}
    series = _series([path])
    slope = float(series.images[0].header.RescaleSlope)
    assert not slope.is_integer()
    window = _render_and_compare(series, [RESCALE, {"op": "window", "center": 1000, "width": 2000}],
                                 tmp_path / "window", natives)
    assert float(window.state.RescaleSlope) == pytest.approx(slope) and not _tables(window.state)
    assert window.largest_difference <= 1  # dcmtk rescales from the DS text: a few pixels one level off
    table = _render_and_compare(series, EQUALISE_IMAGE, tmp_path / "table", natives)
    assert (table.state.RescaleSlope, table.state.RescaleIntercept) == (1, 0) and len(_tables(table.state)) == 1
    assert table.largest_difference == 1 and table.off_png16 == 0


def test_a_series_of_two_sizes_gets_one_presentation_state_per_size(ct: InputSeries, tmp_path: Path) -> None:
    from tests.support import bundled
    from tests.support import copy_as_series

    paths = copy_as_series([ct.images[3].path, bundled("CT_small.dcm"), ct.images[4].path], tmp_path / "in")
    series = _series(paths)
    result = _process(series, BRAIN, "gsps", tmp_path / "out")
    assert len(result.outputs) == 2 and result.instances == 3
    states = [pydicom.dcmread(path) for path in result.outputs]
    assert {s.SeriesInstanceUID for s in states} == {result.derived_series_uid}
    assert sorted(s.InstanceNumber for s in states) == [1, 2]
    sizes = {tuple(s.DisplayedAreaSelectionSequence[0].DisplayedAreaBottomRightHandCorner): len(_referenced_sops(s))
             for s in states}
    assert sizes == {(512, 512): 2, (128, 128): 1}
    png = _process(series, BRAIN, "png", tmp_path / "png")
    for state_path, state in zip(result.outputs, states):
        for sop in _referenced_sops(state):
            image = next(i for i in series.images if i.header.SOPInstanceUID == sop)
            dcmtk = _dcmp2pgm(state_path, image.path, 1, tmp_path / "o.pgm")
            assert np.array_equal(dcmtk, _png(tmp_path / "png", png, BRAIN, "png", sop, 1, 1))
