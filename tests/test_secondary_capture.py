"""Tests for the derived Secondary Capture writer (real files, real dciodvfy).

Sources: pydicom's bundled CT_small.dcm / 693_J2KI.dcm / JPEG-lossy.dcm, and,
when $DICOM_NODE_TEST_DATA points at the shared data folder, a 10-frame
Enhanced MR and a real head CT series from it (those cases are skipped when
the variable is unset).

Every written file is checked twice: read back with pydicom (pixels, copied
Patient/Study, new series, SOP class, references) and validated with
dicom3tools' ``dciodvfy``, which must report no error and no warning beyond
the few each case expects (see ``Case.allowed_warnings``).
"""

from __future__ import annotations

import copy
import datetime
import pathlib
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.outputs.sc import (
    MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE,
    MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE,
    MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    DerivedImage,
    DerivedSeries,
    SourceImage,
    derived_burned_in_annotation,
    secondary_capture_header,
    write_secondary_capture,
)
from node.outputs.uids import derived_uid
from tests.support import bundled, require_test_data, tool

CONTENT_DATETIME = datetime.datetime(2024, 5, 6, 7, 8, 9, 123000)

# dciodvfy's warning for an empty Laterality, written when the source names
# no side and no unpaired Body Part Examined (the body part is unknown).
LATERALITY_UNKNOWN_WARNING = (
    "Warning - is only permitted to be empty when actually unknown; should be "
    "absent (not empty) if an unpaired body part, and have a value if a paired "
    "body part - attribute <Laterality>"
)


# --- sources and deterministic pixel mappings -----------------------------


def _header(path: pathlib.Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _modality_values(path: pathlib.Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return ds.pixel_array.astype(np.float64) * slope + intercept


def _window8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window to 0..255 (deterministic, like the node's mapping)."""
    low = center - width / 2
    scaled = np.rint((values - low) / width * 255.0)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _stretch16(values: np.ndarray) -> np.ndarray:
    """Full-range 16-bit stretch of the values."""
    low, high = float(values.min()), float(values.max())
    scaled = np.rint((values - low) / max(high - low, 1.0) * 65535.0)
    return scaled.astype(np.uint16)


def _rgb(grey: np.ndarray) -> np.ndarray:
    """A deterministic false-colour RGB image from an 8-bit grey one."""
    return np.stack([grey, 255 - grey, grey // 2], axis=-1).astype(np.uint8)


def _header_of(
    source: Dataset, *, series: DerivedSeries, content_datetime: datetime.datetime, **image: object
) -> Dataset:
    """secondary_capture_header of the DerivedImage those keywords describe."""
    return secondary_capture_header(
        source, DerivedImage(**image), series=series, content_datetime=content_datetime
    )


def _source_image(ds: Dataset) -> SourceImage:
    return SourceImage(str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def _series(source: Dataset, name: str) -> DerivedSeries:
    return DerivedSeries(
        series_instance_uid=derived_uid(str(source.SeriesInstanceUID), name, "series"),
        series_number=1000 + int(source.get("SeriesNumber") or 0),
        series_description=f"dicom-node {name}",
        derivation_description=f"{name}; window C=40 W=400 LINEAR",
    )


# --- the cases --------------------------------------------------------------


@dataclass
class Built:
    path: pathlib.Path
    header: Dataset
    source: Dataset  # the header the SC was built from (first source)
    source_images: list[SourceImage]
    frames: np.ndarray  # (frames, rows, cols[, 3]) as written
    sop_class_uid: str
    series: DerivedSeries


@dataclass
class Case:
    name: str
    build: Callable[[pathlib.Path], Built]
    allowed_warnings: frozenset[str] = field(default_factory=frozenset)


def _write(
    out_dir: pathlib.Path,
    name: str,
    source: Dataset,
    source_images: list[SourceImage],
    frames: np.ndarray,
    sop_class_uid: str,
    *,
    multi_frame: bool | None = None,
) -> Built:
    samples = 3 if frames.ndim == 4 else 1
    series = _series(source, name)
    header = _header_of(
        source,
        rows=frames.shape[1],
        columns=frames.shape[2],
        number_of_frames=frames.shape[0],
        samples_per_pixel=samples,
        bits_allocated=frames.dtype.itemsize * 8,
        series=series,
        sop_instance_uid=derived_uid(series.series_instance_uid, "1"),
        instance_number=1,
        source_images=source_images,
        content_datetime=CONTENT_DATETIME,
        multi_frame=multi_frame,
    )
    # A generator: the writer must consume frames lazily.
    path = write_secondary_capture(
        out_dir / f"{name}.dcm", header, (frame for frame in frames)
    )
    return Built(path, header, source, source_images, frames, sop_class_uid, series)


def _ct_small(out_dir: pathlib.Path, name: str, kind: str) -> Built:
    path = bundled("CT_small.dcm")
    source = _header(path)
    hu = _modality_values(path)
    grey = _window8(hu, 40, 400)
    frames, multi_frame, sop_class = {
        "8": (grey[None], None, SECONDARY_CAPTURE_IMAGE_STORAGE),
        "16": (_stretch16(hu)[None], None, SECONDARY_CAPTURE_IMAGE_STORAGE),
        "rgb": (_rgb(grey)[None], None, SECONDARY_CAPTURE_IMAGE_STORAGE),
        "mf1": (grey[None], True, MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE),
    }[kind]
    return _write(
        out_dir, name, source, [_source_image(source)], frames, sop_class,
        multi_frame=multi_frame,
    )


def _lossy_ct(out_dir: pathlib.Path, name: str) -> Built:
    path = bundled("693_J2KI.dcm")  # CT, lossy JPEG 2000, LossyImageCompression 01
    source = _header(path)
    frames = _window8(_modality_values(path), 40, 400)[None]
    return _write(
        out_dir, name, source, [_source_image(source)], frames,
        SECONDARY_CAPTURE_IMAGE_STORAGE,
    )


def _ultrasound(out_dir: pathlib.Path, name: str) -> Built:
    # A real ultrasound (RGB) with no Burned In Annotation: its SC must say YES, not NO.
    path = require_test_data() / "color" / "US1_UNCR.dcm"
    source = _header(path)
    frames = pydicom.dcmread(path).pixel_array[None]  # (1, 480, 640, 3) uint8
    return _write(
        out_dir, name, source, [_source_image(source)], frames,
        SECONDARY_CAPTURE_IMAGE_STORAGE,
    )


def _emri(out_dir: pathlib.Path, name: str, kind: str) -> Built:
    path = require_test_data() / "multiframe" / "emri_small.dcm"
    source = _header(path)
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)  # (10, 64, 64)
    grey = _window8(pixels, 250, 500)
    frames, sop_class = {
        "byte": (grey, MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE),
        "word": (_stretch16(pixels), MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE),
        "rgb": (_rgb(grey), MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE),
    }[kind]
    return _write(out_dir, name, source, [_source_image(source)], frames, sop_class)


def _ge_head_slices(count: int) -> list[pathlib.Path]:
    folder = require_test_data() / "ct_series" / "ge_head_tilt"
    paths = sorted(folder.glob("*.dcm"))[:count]
    assert len(paths) == count, f"expected {count} slices in {folder}"
    return paths


def _ge_head(out_dir: pathlib.Path, name: str, count: int) -> Built:
    paths = _ge_head_slices(count)
    sources = [_header(p) for p in paths]
    frames = np.stack(
        [
            _window8(_modality_values(p), float(s.WindowCenter), float(s.WindowWidth))
            for p, s in zip(paths, sources)
        ]
    )
    sop_class = (
        SECONDARY_CAPTURE_IMAGE_STORAGE
        if count == 1
        else MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE
    )
    return _write(
        out_dir, name, sources[0], [_source_image(s) for s in sources], frames,
        sop_class,
    )


CASES = [
    Case("ct_small_8bit", lambda d: _ct_small(d, "ct_small_8bit", "8"),
         frozenset({LATERALITY_UNKNOWN_WARNING})),
    Case("ct_small_16bit", lambda d: _ct_small(d, "ct_small_16bit", "16"),
         frozenset({LATERALITY_UNKNOWN_WARNING})),
    Case("ct_small_rgb", lambda d: _ct_small(d, "ct_small_rgb", "rgb"),
         frozenset({LATERALITY_UNKNOWN_WARNING})),
    Case("ct_small_multiframe_one", lambda d: _ct_small(d, "ct_small_mf1", "mf1"),
         frozenset({LATERALITY_UNKNOWN_WARNING})),
    Case("lossy_ct_693_J2KI", lambda d: _lossy_ct(d, "lossy_ct"),
         frozenset({LATERALITY_UNKNOWN_WARNING})),
    Case("ultrasound_rgb", lambda d: _ultrasound(d, "ultrasound_rgb"),
         frozenset({LATERALITY_UNKNOWN_WARNING})),
    Case("emri_byte", lambda d: _emri(d, "emri_byte", "byte")),
    Case("emri_word", lambda d: _emri(d, "emri_word", "word")),
    Case("emri_true_color", lambda d: _emri(d, "emri_rgb", "rgb")),
    Case("ge_head_tilt_slice", lambda d: _ge_head(d, "ge_head_slice", 1)),
    Case("ge_head_tilt_series", lambda d: _ge_head(d, "ge_head_series", 5)),
]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("sc")


@pytest.fixture(scope="module")
def built_cache() -> dict[str, Built]:
    return {}


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture
def built(case: Case, out_dir: pathlib.Path, built_cache: dict[str, Built]) -> Built:
    if case.name not in built_cache:
        built_cache[case.name] = case.build(out_dir)
    return built_cache[case.name]


# --- read-back -------------------------------------------------------------


def test_read_back(built: Built) -> None:
    ds = pydicom.dcmread(built.path)
    source = built.source

    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == built.sop_class_uid
    assert ds.file_meta.MediaStorageSOPClassUID == built.sop_class_uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    # pixels exactly as written
    # pydicom drops the frame axis when there is one frame
    expected = built.frames if built.frames.shape[0] > 1 else built.frames[0]
    assert ds.pixel_array.dtype == built.frames.dtype
    np.testing.assert_array_equal(ds.pixel_array, expected)
    assert ds.BitsStored == ds.BitsAllocated == built.frames.dtype.itemsize * 8
    assert ds.PixelRepresentation == 0
    if built.frames.ndim == 4:
        assert ds.PhotometricInterpretation == "RGB"
        assert ds.PlanarConfiguration == 0
    else:
        assert ds.PhotometricInterpretation == "MONOCHROME2"
    if built.sop_class_uid == SECONDARY_CAPTURE_IMAGE_STORAGE:
        assert "NumberOfFrames" not in ds
    else:
        assert ds.NumberOfFrames == built.frames.shape[0]

    # same patient and study, copied from the source
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
        "AccessionNumber", "ReferringPhysicianName",
    ):
        assert ds.get(keyword) == source.get(keyword, ""), keyword
    assert ds.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
    # a new series, nothing image-level from the source
    assert ds.SeriesInstanceUID == built.series.series_instance_uid
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID not in {s.sop_instance_uid for s in built.source_images}
    assert ds.SeriesNumber == built.series.series_number
    assert ds.SeriesDescription == built.series.series_description
    assert ds.Modality == source.Modality
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient",
                    "FrameOfReferenceUID", "PixelSpacing", "SliceLocation"):
        assert keyword not in ds, keyword
    assert not any(elem.tag.is_private for elem in ds)

    # derived, with references to every source instance
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.DerivationDescription == built.series.derivation_description
    assert ds.ConversionType == "WSD"
    assert [
        (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID)
        for item in ds.SourceImageSequence
    ] == [(s.sop_class_uid, s.sop_instance_uid) for s in built.source_images]
    assert len(ds.ReferencedSeriesSequence) == 1
    series_item = ds.ReferencedSeriesSequence[0]
    assert series_item.SeriesInstanceUID == source.SeriesInstanceUID
    assert [
        item.ReferencedSOPInstanceUID for item in series_item.ReferencedInstanceSequence
    ] == [s.sop_instance_uid for s in built.source_images]

    # dates and times from content_datetime
    assert ds.ContentDate == "20240506"
    assert ds.ContentTime == "070809.123000"
    assert ds.InstanceCreationDate == "20240506"
    assert ds.InstanceCreationTime == "070809.123000"


# --- dciodvfy --------------------------------------------------------------


def _dciodvfy(path: pathlib.Path) -> str:
    """dciodvfy's whole output (it reports on stderr; its exit code is not used)."""
    result = subprocess.run(
        [tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    return result.stdout + result.stderr


def _source_value_warnings(source: Dataset) -> set[str]:
    """dciodvfy warnings caused by the source's own (copied) values.

    Patient and study attributes are copied as they are; when the source has
    them empty (type 2) or has a one-component Patient's Name, the derived
    instance inherits dciodvfy's remarks about them.
    """
    warnings = set()
    for keyword, label in (
        ("PatientID", "Patient ID"),
        ("StudyDate", "Study Date"),
        ("StudyTime", "Study Time"),
        ("StudyID", "Study ID"),
    ):
        if not source.get(keyword):
            warnings.add(
                "Warning - Missing attribute or value that would be needed to "
                f"build DICOMDIR - {label}"
            )
    name = str(source.get("PatientName", ""))
    if name and "^" not in name:
        warnings.add(
            "Warning - Value dubious for this VR - (0x0010,0x0010) PN Patient's "
            f"Name  PN [1] = <{name}> - Retired Person Name form"
        )
    return warnings


@pytest.mark.peers
def test_dciodvfy(case: Case, built: Built) -> None:
    output = _dciodvfy(built.path)
    errors = [line for line in output.splitlines() if "Error" in line]
    assert not errors, f"dciodvfy {built.path}:\n{output}"
    warnings = {line.strip() for line in output.splitlines() if "Warning" in line}
    unexpected = warnings - case.allowed_warnings - _source_value_warnings(built.source)
    assert not unexpected, f"dciodvfy {built.path}:\n{output}"


# --- header content details -----------------------------------------------


def _ct_small_header(**overrides: object) -> Dataset:
    source = _header(bundled("CT_small.dcm"))
    kwargs: dict[str, object] = dict(
        rows=4, columns=5, number_of_frames=1, samples_per_pixel=1,
        bits_allocated=8, series=_series(source, "unit"),
        sop_instance_uid=derived_uid("unit", "instance"), instance_number=7,
        source_images=[_source_image(source)], content_datetime=CONTENT_DATETIME,
    )
    kwargs.update(overrides)
    return _header_of(source, **kwargs)


def test_header_laterality_from_source_side_and_body_part() -> None:
    source = _header(bundled("CT_small.dcm"))
    assert source.Laterality == ""  # empty in the source: unknown
    kwargs = dict(
        rows=4, columns=5, number_of_frames=1, samples_per_pixel=1,
        bits_allocated=8, series=_series(source, "lat"),
        sop_instance_uid=derived_uid("lat"), instance_number=1,
        source_images=[_source_image(source)], content_datetime=CONTENT_DATETIME,
    )
    assert _header_of(source, **kwargs).Laterality == ""

    right = copy.deepcopy(source)
    right.Laterality = "R"
    assert _header_of(right, **kwargs).Laterality == "R"

    image_left = copy.deepcopy(source)
    del image_left.Laterality
    image_left.ImageLaterality = "L"
    header = _header_of(image_left, **kwargs)
    assert header.Laterality == "L"
    assert "ImageLaterality" not in header

    head = copy.deepcopy(source)
    head.BodyPartExamined = "HEAD"
    header = _header_of(head, **kwargs)
    assert "Laterality" not in header
    assert header.BodyPartExamined == "HEAD"


def test_header_patient_study_cleanups() -> None:
    source = _header(bundled("CT_small.dcm"))
    assert float(source.PatientWeight) == 0  # "unknown" written as 0
    header = _ct_small_header()
    assert "PatientWeight" not in header
    assert header.PatientAge == source.PatientAge
    assert header.OtherPatientIDsSequence == source.OtherPatientIDsSequence

    deidentified = copy.deepcopy(source)
    deidentified.PatientIdentityRemoved = "YES"
    kwargs = dict(
        rows=1, columns=1, number_of_frames=1, samples_per_pixel=1,
        bits_allocated=8, series=_series(source, "deid"),
        sop_instance_uid=derived_uid("deid"), instance_number=1,
        source_images=[_source_image(source)], content_datetime=CONTENT_DATETIME,
    )
    header = _header_of(deidentified, **kwargs)
    assert header.PatientIdentityRemoved == "YES"
    assert header.DeidentificationMethod == "unspecified in source"
    deidentified.DeidentificationMethod = "DICOM PS3.15 Basic Profile"
    header = _header_of(deidentified, **kwargs)
    assert header.DeidentificationMethod == "DICOM PS3.15 Basic Profile"


def test_header_timezone_aware_datetime_uses_source_offset() -> None:
    # CT_small has TimezoneOffsetFromUTC -0500: 12:00 UTC is 07:00 there.
    utc_noon = datetime.datetime(2024, 5, 6, 12, 0, 0, tzinfo=datetime.timezone.utc)
    header = _ct_small_header(content_datetime=utc_noon)
    assert header.TimezoneOffsetFromUTC == "-0500"
    assert (header.ContentDate, header.ContentTime) == ("20240506", "070000")


def test_header_lossy_source_stays_lossy() -> None:
    lossy_source = _header(bundled("693_J2KI.dcm"))
    header = _header_of(
        lossy_source, rows=2, columns=2, number_of_frames=1,
        samples_per_pixel=1, bits_allocated=8,
        series=_series(lossy_source, "lossy"),
        sop_instance_uid=derived_uid("lossy"), instance_number=1,
        source_images=[_source_image(lossy_source)],
        content_datetime=CONTENT_DATETIME,
    )
    assert header.LossyImageCompression == "01"
    assert header.LossyImageCompressionRatio == lossy_source.LossyImageCompressionRatio

    # A JPEG-lossy source that does not say so itself: the transfer syntax does.
    jpeg = _header(bundled("JPEG-lossy.dcm"))
    del jpeg.LossyImageCompression
    header = _header_of(
        jpeg, rows=2, columns=2, number_of_frames=1, samples_per_pixel=1,
        bits_allocated=16, series=_series(jpeg, "jpeg"),
        sop_instance_uid=derived_uid("jpeg"), instance_number=1,
        source_images=[_source_image(jpeg)], content_datetime=CONTENT_DATETIME,
    )
    assert header.LossyImageCompression == "01"
    assert header.LossyImageCompressionMethod == "ISO_10918_1"

    # A lossless source gets no Lossy Image Compression at all.
    assert "LossyImageCompression" not in _ct_small_header()


def test_header_burned_in_annotation_is_copied_or_yes() -> None:
    # The ultrasound states nothing: a guessed NO would be trusted by de-identification tools.
    ultrasound = _header(require_test_data() / "color" / "US1_UNCR.dcm")
    assert "BurnedInAnnotation" not in ultrasound
    assert derived_burned_in_annotation(ultrasound) == "YES"
    assert "BurnedInAnnotation" not in _header(bundled("CT_small.dcm"))
    assert _ct_small_header().BurnedInAnnotation == "YES"
    for stated, expected in (("NO", "NO"), ("YES", "YES"), ("", "YES"), ("UNKNOWN", "YES")):
        source = _header(bundled("CT_small.dcm"))
        source.BurnedInAnnotation = stated
        assert derived_burned_in_annotation(source) == expected, stated
        header = _header_of(
            source, rows=2, columns=2, number_of_frames=1, samples_per_pixel=1,
            bits_allocated=8, series=_series(source, "burned"),
            sop_instance_uid=derived_uid("burned", stated), instance_number=1,
            source_images=[_source_image(source)], content_datetime=CONTENT_DATETIME,
        )
        assert header.BurnedInAnnotation == expected, stated


def test_header_multiframe_attributes() -> None:
    header = _ct_small_header(number_of_frames=3, bits_allocated=16)
    assert header.SOPClassUID == MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE
    assert header.NumberOfFrames == 3
    assert header.FrameIncrementPointer == pydicom.tag.Tag("PageNumberVector")
    assert list(header.PageNumberVector) == [1, 2, 3]
    assert (header.BitsStored, header.HighBit) == (16, 15)
    assert (header.RescaleIntercept, header.RescaleSlope, header.RescaleType) == (0, 1, "US")
    assert header.PresentationLUTShape == "IDENTITY"

    rgb = _ct_small_header(number_of_frames=2, samples_per_pixel=3)
    assert rgb.SOPClassUID == MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE
    assert "RescaleSlope" not in rgb and "PresentationLUTShape" not in rgb

    single = _ct_small_header()
    assert single.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
    assert "NumberOfFrames" not in single and "RescaleSlope" not in single


# --- validation: TypeError / ValueError ----------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(samples_per_pixel=3, bits_allocated=16), "samples_per_pixel=3.*bits_allocated=16"),
        (dict(samples_per_pixel=2), "samples_per_pixel"),
        (dict(bits_allocated=12), "bits_allocated"),
        (dict(number_of_frames=2, multi_frame=False), "multi_frame=False"),
        (dict(number_of_frames=0), "number_of_frames"),
        (dict(rows=0), "rows"),
        (dict(columns=70000), "columns"),
        (dict(source_images=[]), "source_images"),
        (dict(sop_instance_uid="1.2.03"), "sop_instance_uid"),
        (dict(instance_number=2**31), "instance_number"),
        (dict(rows=65535, columns=65535, number_of_frames=2), "Pixel Data"),
    ],
)
def test_header_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _ct_small_header(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(rows="4"),
        dict(rows=True),
        dict(bits_allocated=8.0),
        dict(series="series"),
        dict(source_images=[("1.2.3", "1.2.4")]),
        dict(source_images=_source_image),
        dict(content_datetime=datetime.date(2024, 5, 6)),
        dict(multi_frame=1),
        dict(sop_instance_uid=123),
    ],
)
def test_header_rejects_bad_types(overrides: dict) -> None:
    with pytest.raises(TypeError):
        _ct_small_header(**overrides)


def test_header_rejects_source_series_and_missing_study() -> None:
    source = _header(bundled("CT_small.dcm"))
    same_series = DerivedSeries(str(source.SeriesInstanceUID), 1, "x", "y")
    with pytest.raises(ValueError, match="new series"):
        _ct_small_header(series=same_series)
    with pytest.raises(ValueError, match="source instance"):
        _ct_small_header(sop_instance_uid=str(source.SOPInstanceUID))
    no_study = copy.deepcopy(source)
    del no_study.StudyInstanceUID
    with pytest.raises(ValueError, match="Study Instance UID"):
        _header_of(
            no_study, rows=1, columns=1, number_of_frames=1, samples_per_pixel=1,
            bits_allocated=8, series=_series(source, "x"),
            sop_instance_uid=derived_uid("x"), instance_number=1,
            source_images=[_source_image(source)], content_datetime=CONTENT_DATETIME,
        )


def test_dataclasses_validate() -> None:
    with pytest.raises(ValueError):
        SourceImage("1.2.840.10008.5.1.4.1.1.2", "not a uid")
    with pytest.raises(TypeError):
        SourceImage("1.2.840.10008.5.1.4.1.1.2", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="64"):
        DerivedSeries(derived_uid("s"), 1, "x" * 65, "")
    with pytest.raises(ValueError, match="backslash"):
        DerivedSeries(derived_uid("s"), 1, "a\\b", "")
    with pytest.raises(TypeError):
        DerivedSeries(derived_uid("s"), "1", "x", "")  # type: ignore[arg-type]


# --- the writer: validation and atomicity --------------------------------


def _no_leftovers(folder: pathlib.Path, expected: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == expected


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([np.zeros((4, 5), np.int16)], "frame 0 has dtype int16"),
        ([np.zeros((4, 5), np.uint8)], "frame 0 has dtype uint8"),
        ([np.zeros((4, 5), np.uint16), np.zeros((5, 4), np.uint16)], "frame 1 has shape"),
        ([np.zeros((4, 5, 3), np.uint16)] * 2, "frame 0 has shape"),
        ([np.zeros((4, 5), np.uint16)], "got 1 frames"),
        ([np.zeros((4, 5), np.uint16)] * 3, "frame 2: more frames"),
    ],
)
def test_write_rejects_bad_frames_and_leaves_nothing(
    tmp_path: pathlib.Path, frames: list[np.ndarray], message: str
) -> None:
    header = _ct_small_header(number_of_frames=2, bits_allocated=16)
    with pytest.raises(ValueError, match=message):
        write_secondary_capture(tmp_path / "out.dcm", header, iter(frames))
    _no_leftovers(tmp_path, set())


def test_write_rejects_non_array_frame(tmp_path: pathlib.Path) -> None:
    header = _ct_small_header()
    with pytest.raises(TypeError, match="frame 0"):
        write_secondary_capture(tmp_path / "out.dcm", header, [[[0] * 5] * 4])
    _no_leftovers(tmp_path, set())


def test_failed_write_keeps_existing_file(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "out.dcm"
    target.write_bytes(b"previous")

    def frames() -> Iterator[np.ndarray]:
        yield np.zeros((4, 5), np.uint8)
        raise RuntimeError("processing failed mid-series")

    header = _ct_small_header(number_of_frames=2)
    with pytest.raises(RuntimeError, match="mid-series"):
        write_secondary_capture(target, header, frames())
    assert target.read_bytes() == b"previous"
    _no_leftovers(tmp_path, {"out.dcm"})


def test_write_rejects_unusable_header(tmp_path: pathlib.Path) -> None:
    header = _ct_small_header()
    with_pixels = copy.deepcopy(header)
    with_pixels.PixelData = b"\x00" * 20
    with pytest.raises(ValueError, match="Pixel Data"):
        write_secondary_capture(tmp_path / "a.dcm", with_pixels, [np.zeros((4, 5), np.uint8)])

    implicit = copy.deepcopy(header)
    implicit.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    with pytest.raises(ValueError, match="Explicit VR Little Endian"):
        write_secondary_capture(tmp_path / "b.dcm", implicit, [np.zeros((4, 5), np.uint8)])

    plain = Dataset()
    plain.update(header)
    with pytest.raises(ValueError, match="file_meta"):
        write_secondary_capture(tmp_path / "c.dcm", plain, [np.zeros((4, 5), np.uint8)])

    with pytest.raises(TypeError):
        write_secondary_capture(tmp_path / "d.dcm", {"Rows": 4}, [])  # type: ignore[arg-type]
    _no_leftovers(tmp_path, set())


def test_write_streams_one_frame_at_a_time(tmp_path: pathlib.Path) -> None:
    """Each frame is in the file before the next one is asked for."""
    count, rows, columns = 4, 256, 128  # frames larger than any write buffer
    frame_bytes = rows * columns * 2
    header = _ct_small_header(
        rows=rows, columns=columns, number_of_frames=count, bits_allocated=16
    )
    sizes: list[int] = []

    def frames() -> Iterator[np.ndarray]:
        for index in range(count):
            (temp,) = tmp_path.glob(".out.dcm.*.tmp")
            sizes.append(temp.stat().st_size)
            yield np.full((rows, columns), index * 1000, np.uint16)

    path = write_secondary_capture(tmp_path / "out.dcm", header, frames())
    # Before frame k is asked for, frames 0..k-1 are in the file (the header
    # may still sit in the write buffer before frame 0).
    assert sizes[1] >= frame_bytes
    assert [b - a for a, b in zip(sizes[1:], sizes[2:])] == [frame_bytes] * (count - 2)
    assert path.stat().st_size >= sizes[-1] + frame_bytes
    ds = pydicom.dcmread(path)
    assert [int(frame[0, 0]) for frame in ds.pixel_array] == [0, 1000, 2000, 3000]
    _no_leftovers(tmp_path, {"out.dcm"})


def test_write_odd_length_is_padded(tmp_path: pathlib.Path) -> None:
    header = _ct_small_header(rows=3, columns=3)
    frame = np.arange(9, dtype=np.uint8).reshape(3, 3)
    path = write_secondary_capture(tmp_path / "odd.dcm", header, [frame])
    ds = pydicom.dcmread(path)
    assert len(ds.PixelData) == 10
    np.testing.assert_array_equal(ds.pixel_array, frame)


def test_write_accepts_big_endian_uint16(tmp_path: pathlib.Path) -> None:
    header = _ct_small_header(bits_allocated=16)
    frame = np.arange(20, dtype=">u2").reshape(4, 5) * 1000
    path = write_secondary_capture(tmp_path / "be.dcm", header, [frame])
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, frame.astype(np.uint16))


# --- derived_uid ---------------------------------------------------------


def test_derived_uid_is_deterministic_and_valid() -> None:
    a = derived_uid("1.2.840.113619.2.1", "window-ct", "series")
    assert a == derived_uid("1.2.840.113619.2.1", "window-ct", "series")
    assert a.startswith("2.25.")
    assert UID(a).is_valid
    assert len(a) <= 64
    assert a != derived_uid("1.2.840.113619.2.1", "window-ct", "instance")
    # parts are not simply concatenated
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    assert derived_uid("abc") != derived_uid("ab", "c")
    for index in range(200):
        uid = derived_uid("x", str(index))
        assert UID(uid).is_valid, uid


def test_derived_uid_rejects_bad_parts() -> None:
    with pytest.raises(ValueError):
        derived_uid()
    with pytest.raises(TypeError):
        derived_uid("a", 1)  # type: ignore[arg-type]
