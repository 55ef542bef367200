"""Tests for SecondaryCaptureSeriesWriter: a series' SCs, byte for byte those of the one-off path.

Every file the writer makes is compared with ``write_secondary_capture(path,
secondary_capture_header(...), frames)`` for the same arguments, for series built from pydicom's
bundled files: copies of CT_small.dcm with new SOP Instance UIDs and Instance Numbers, some of
them differing in a copied attribute (which must not reuse another instance's header), and
multi-frame instances. The writer's counters say whether a header was spliced into the kept
encoding or built in full, so a wrong splice cannot hide behind a fallback.
"""

from __future__ import annotations

import copy
import datetime
import io
import pathlib
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.outputs.sc import (
    DerivedImage,
    DerivedSeries,
    SecondaryCaptureSeriesWriter,
    SourceImage,
    secondary_capture_header,
    write_secondary_capture,
)
from node.outputs.sc.attributes import HEADER_SOURCE_KEYWORDS
from node.outputs.uids import derived_uid
from tests.support import bundled

CONTENT_DATETIME = datetime.datetime(2024, 5, 6, 7, 8, 9, 123000)
SERIES = DerivedSeries(
    series_instance_uid=derived_uid("test_sc_series", "series"),
    series_number=1001,
    series_description="dicom-node series writer test",
    derivation_description="rescale; window C=40 W=400 LINEAR",
)


def _ct_small() -> Dataset:
    return pydicom.dcmread(bundled("CT_small.dcm"), stop_before_pixels=True)


def _copy_of(source: Dataset, number: int) -> Dataset:
    """``source`` as instance ``number`` of its series: a new SOP Instance UID and number."""
    copied = copy.deepcopy(source)
    copied.SOPInstanceUID = derived_uid("test_sc_series", "source", str(number))
    copied.InstanceNumber = number
    return copied


def _frames(count: int, shape: tuple[int, ...], dtype: type, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    high = np.iinfo(dtype).max
    return [rng.integers(0, high, size=shape, dtype=dtype, endpoint=True) for _ in range(count)]


class SeriesCase:
    """Writes instances with the writer and with the one-off path, and compares the files."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.writer = SecondaryCaptureSeriesWriter(SERIES, CONTENT_DATETIME)
        self.written = 0

    def arguments(self, source: Dataset, **overrides: object) -> dict[str, object]:
        source_uid = str(source.get("SOPInstanceUID", "1.2.3.4"))
        class_uid = str(source.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"))
        reference = SourceImage(class_uid, source_uid)
        arguments: dict[str, object] = dict(
            rows=int(source.get("Rows", 4)),
            columns=int(source.get("Columns", 5)),
            number_of_frames=1,
            samples_per_pixel=1,
            bits_allocated=8,
            sop_instance_uid=derived_uid(source_uid, "derived"),
            instance_number=int(source.get("InstanceNumber", 1)),
            source_images=[reference],
            multi_frame=None,
        )
        arguments.update(overrides)
        return arguments

    def write_both(self, source: Dataset, **overrides: object) -> tuple[bytes, bytes]:
        """(the writer's file, the one-off path's file) for ``source``."""
        arguments = self.arguments(source, **overrides)
        rows, columns = int(arguments["rows"]), int(arguments["columns"])
        samples = int(arguments["samples_per_pixel"])
        shape = (rows, columns) if samples == 1 else (rows, columns, samples)
        dtype = np.uint8 if arguments["bits_allocated"] == 8 else np.uint16
        frames = _frames(int(arguments["number_of_frames"]), shape, dtype, self.written)
        self.written += 1
        fast = self.writer.write(
            self.folder / f"fast-{self.written}.dcm", source, DerivedImage(**arguments), frames=iter(frames)
        )
        header = secondary_capture_header(
            source, DerivedImage(**arguments), series=SERIES, content_datetime=CONTENT_DATETIME
        )
        slow = write_secondary_capture(
            self.folder / f"slow-{self.written}.dcm", header, iter(frames)
        )
        return fast.read_bytes(), slow.read_bytes()

    def assert_identical(self, source: Dataset, **overrides: object) -> bytes:
        fast, slow = self.write_both(source, **overrides)
        assert fast == slow, _first_difference(fast, slow)
        return fast

    def counts(self) -> tuple[int, int]:
        """(headers built in full, headers spliced)."""
        return self.writer.headers_built, self.writer.headers_spliced


def _first_difference(fast: bytes, slow: bytes) -> str:
    index = next(
        (i for i, (a, b) in enumerate(zip(fast, slow)) if a != b), min(len(fast), len(slow))
    )
    return (
        f"files differ at byte {index} (lengths {len(fast)} and {len(slow)}): "
        f"{fast[index - 8:index + 24]!r} vs {slow[index - 8:index + 24]!r}"
    )


@pytest.fixture
def case(tmp_path: pathlib.Path) -> SeriesCase:
    return SeriesCase(tmp_path)


# --- byte identity ---------------------------------------------------------


def test_copies_of_one_slice_share_one_header(case: SeriesCase) -> None:
    source = _ct_small()
    files = [case.assert_identical(_copy_of(source, number)) for number in range(1, 7)]
    assert case.counts() == (1, 5)
    assert len(set(files)) == 6
    read = pydicom.dcmread(case.folder / "fast-6.dcm")
    assert read.InstanceNumber == 6
    assert read.SOPInstanceUID == read.file_meta.MediaStorageSOPInstanceUID
    referenced = read.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert referenced == _copy_of(source, 6).SOPInstanceUID


def test_uids_of_other_lengths_change_the_meta_group_length(case: SeriesCase) -> None:
    source = _ct_small()
    for number, uid in enumerate(["1.2.3", "1.2.3.4", "1.2.826.0.1." + "9" * 40], start=1):
        copied = _copy_of(source, number)
        copied.SOPInstanceUID = f"{uid}.{number}"
        case.assert_identical(
            copied, sop_instance_uid=f"{uid}.{number}.1", instance_number=number * 1000
        )
    assert case.counts() == (1, 2)


def test_instance_differing_in_a_copied_attribute_gets_its_own_header(case: SeriesCase) -> None:
    source = _ct_small()
    renamed = _copy_of(source, 2)
    renamed.PatientName = "Other^Patient"
    lossy = _copy_of(source, 3)
    lossy.LossyImageCompression = "01"
    lossy.LossyImageCompressionRatio = "10"
    burned_in = _copy_of(source, 4)
    burned_in.BurnedInAnnotation = "NO"  # the others say nothing: YES
    right = _copy_of(source, 5)
    right.Laterality = "R"
    for instance in (_copy_of(source, 1), renamed, lossy, _copy_of(source, 6), burned_in, right):
        case.assert_identical(instance)
    # 1 and 6 share a header; the others each differ from it and from each other.
    assert case.counts() == (5, 1)
    assert pydicom.dcmread(case.folder / "fast-2.dcm").PatientName == "Other^Patient"
    assert pydicom.dcmread(case.folder / "fast-3.dcm").LossyImageCompression == "01"
    assert pydicom.dcmread(case.folder / "fast-1.dcm").BurnedInAnnotation == "YES"
    assert pydicom.dcmread(case.folder / "fast-5.dcm").BurnedInAnnotation == "NO"


@pytest.mark.parametrize(
    ("keyword", "first", "second"),
    [
        ("PatientSize", "1.8", "1.80"),  # equal DS values, different text written
        ("PatientAge", "040Y", "041Y"),
        ("OtherPatientIDsSequence", None, None),  # an item's value changes
        ("TimezoneOffsetFromUTC", "-0500", "+0100"),
    ],
)
def test_equal_looking_or_nested_differences_get_their_own_header(
    case: SeriesCase, keyword: str, first: object, second: object
) -> None:
    source = _ct_small()
    one, two = _copy_of(source, 1), _copy_of(source, 2)
    if keyword == "OtherPatientIDsSequence":
        two.OtherPatientIDsSequence[0].PatientID = "another id"
    else:
        setattr(one, keyword, first)
        setattr(two, keyword, second)
    case.assert_identical(one)
    fast = case.assert_identical(two)
    case.assert_identical(_copy_of(one, 3))
    assert case.counts() == (2, 1)
    assert fast != (case.folder / "fast-1.dcm").read_bytes()


def test_character_set_and_non_ascii_names(case: SeriesCase) -> None:
    source = _ct_small()
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "Müller^Jürgen"
    latin1 = [case.assert_identical(_copy_of(source, number)) for number in (1, 2)]
    utf8 = _copy_of(source, 3)
    utf8.SpecificCharacterSet = "ISO_IR 192"
    case.assert_identical(utf8)
    assert case.counts() == (2, 1)
    assert "Müller".encode("latin-1") in latin1[1]


def test_multi_frame_series(case: SeriesCase) -> None:
    source = _ct_small()
    for number in range(1, 4):
        case.assert_identical(_copy_of(source, number), number_of_frames=3, bits_allocated=16)
    for number in range(4, 6):
        case.assert_identical(
            _copy_of(source, number), rows=16, columns=9, number_of_frames=2, samples_per_pixel=3
        )
    # a single frame forced into a multi-frame SOP class, and the size changing back
    case.assert_identical(_copy_of(source, 6), number_of_frames=1, multi_frame=True)
    case.assert_identical(_copy_of(source, 7), number_of_frames=3, bits_allocated=16)
    assert case.counts() == (3, 4)
    read = pydicom.dcmread(case.folder / "fast-5.dcm")
    assert read.NumberOfFrames == 2 and read.pixel_array.shape == (2, 16, 9, 3)


def test_other_bundled_sources(case: SeriesCase) -> None:
    for name in ("693_J2KI.dcm", "JPEG-lossy.dcm", "MR_small.dcm"):
        source = pydicom.dcmread(bundled(name), stop_before_pixels=True)
        for number in (1, 2):
            case.assert_identical(_copy_of(source, number), bits_allocated=16)
    assert case.counts() == (3, 3)


def test_every_source_attribute_removed_in_one_instance(case: SeriesCase) -> None:
    """Whatever attribute an instance lacks, the writer's file is the one-off path's."""
    source = _ct_small()
    case.assert_identical(_copy_of(source, 1), rows=4, columns=5)
    for number, tag in enumerate(source.keys(), start=2):
        instance = _copy_of(source, number)
        if tag in instance:
            del instance[tag]
        arguments = case.arguments(instance, rows=4, columns=5)
        try:
            secondary_capture_header(
                instance, DerivedImage(**arguments), series=SERIES, content_datetime=CONTENT_DATETIME
            )
        except ValueError as exc:  # e.g. no Study Instance UID: the writer refuses it too
            with pytest.raises(ValueError, match=re.escape(str(exc))):
                case.writer.write(
                    case.folder / "refused.dcm", instance, DerivedImage(**arguments),
                    frames=[np.zeros((4, 5), np.uint8)],
                )
            continue
        case.assert_identical(instance, rows=4, columns=5)
    built, spliced = case.counts()
    assert spliced > 50  # attributes the header does not read change nothing


def _encoded(header: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, header, enforce_file_format=True)
    return buffer.getvalue()


def test_key_names_every_source_attribute_the_header_reads() -> None:
    """A header from a source cut down to the writer's key attributes is the full one.

    If secondary_capture_header starts reading a source attribute the writer's key does not
    hold, instances differing in it would reuse each other's header: this fails first.
    """
    kept = {
        *HEADER_SOURCE_KEYWORDS,
        "Laterality", "ImageLaterality", "SharedFunctionalGroupsSequence",  # source_laterality
        "SOPInstanceUID", "SeriesInstanceUID",  # checks and per-instance references only
    }
    rich = _ct_small()
    rich.PatientIdentityRemoved = "YES"
    rich.LossyImageCompression = "01"
    rich.LossyImageCompressionRatio = "12"
    rich.LossyImageCompressionMethod = "ISO_10918_1"
    rich.BurnedInAnnotation = "YES"
    rich.RecognizableVisualFeatures = "NO"
    rich.PatientSize = "1.75"
    rich.StudyDescription = "study"
    sources = [rich] + [
        pydicom.dcmread(bundled(name), stop_before_pixels=True)
        for name in ("CT_small.dcm", "693_J2KI.dcm", "JPEG-lossy.dcm", "MR_small.dcm")
    ]
    for source in sources:
        cut = Dataset()
        for element in source:
            if element.keyword in kept:
                cut.add(copy.deepcopy(element))
        cut.file_meta = copy.deepcopy(source.file_meta)
        image = DerivedImage(
            rows=4, columns=5, number_of_frames=1, samples_per_pixel=1, bits_allocated=8,
            sop_instance_uid=derived_uid("cut"), instance_number=1,
            source_images=[SourceImage(str(source.SOPClassUID), str(source.SOPInstanceUID))],
        )
        arguments = dict(series=SERIES, content_datetime=CONTENT_DATETIME)
        full = _encoded(secondary_capture_header(source, image, **arguments))
        assert _encoded(secondary_capture_header(cut, image, **arguments)) == full, source.filename


def test_threads_writing_at_once(case: SeriesCase) -> None:
    source = _ct_small()
    renamed = copy.deepcopy(source)
    renamed.PatientName = "Other^Patient"
    instances = [_copy_of(renamed if n % 5 == 0 else source, n) for n in range(1, 41)]

    def fast(instance: Dataset) -> pathlib.Path:
        arguments = case.arguments(instance)
        frames = _frames(1, (128, 128), np.uint8, int(instance.InstanceNumber))
        path = case.folder / f"threaded-{instance.InstanceNumber}.dcm"
        return case.writer.write(path, instance, DerivedImage(**arguments), frames=iter(frames))

    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(fast, instances))
    for instance, path in zip(instances, paths):
        arguments = case.arguments(instance)
        frames = _frames(1, (128, 128), np.uint8, int(instance.InstanceNumber))
        header = secondary_capture_header(
            instance, DerivedImage(**arguments), series=SERIES, content_datetime=CONTENT_DATETIME
        )
        slow = write_secondary_capture(case.folder / "slow.dcm", header, iter(frames))
        assert path.read_bytes() == slow.read_bytes()
    built, spliced = case.counts()
    # Two different headers; each thread may miss a template another is still building.
    assert built + spliced == 40 and built <= 8


# --- the writer's checks, streaming and atomicity ----------------------------


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([np.zeros((4, 5), np.int16)] * 2, "frame 0 has dtype int16"),
        ([np.zeros((4, 5), np.uint16), np.zeros((5, 4), np.uint16)], "frame 1 has shape"),
        ([np.zeros((4, 5), np.uint16)], "got 1 frames"),
        ([np.zeros((4, 5), np.uint16)] * 3, "frame 2: more frames"),
    ],
)
def test_bad_frames_are_refused_and_leave_nothing(
    case: SeriesCase, frames: list[np.ndarray], message: str
) -> None:
    source = _ct_small()
    size = dict(rows=4, columns=5, number_of_frames=2, bits_allocated=16)
    for number in (1, 2):  # 1: the header is built in full (and kept); 2: spliced into it
        instance = _copy_of(source, number)
        with pytest.raises(ValueError, match=message):
            case.writer.write(
                case.folder / "out.dcm", instance, DerivedImage(**case.arguments(instance, **size)),
                frames=iter(frames),
            )
    assert list(case.folder.iterdir()) == []
    assert case.counts() == (1, 1)


def test_bad_arguments_are_refused_as_by_the_header(case: SeriesCase) -> None:
    source = _ct_small()
    frames = [np.zeros((4, 5), np.uint8)]
    arguments = case.arguments(source, rows=4, columns=5)
    case.writer.write(case.folder / "a.dcm", source, DerivedImage(**arguments), frames=frames)
    bad = [
        (dict(samples_per_pixel=3, bits_allocated=16), ValueError),
        (dict(sop_instance_uid=str(source.SOPInstanceUID)), ValueError),
        (dict(instance_number=2**31), ValueError),
        (dict(rows="4"), TypeError),
        (dict(source_images=[]), ValueError),
    ]
    for overrides, error in bad:
        arguments = case.arguments(source, **{"rows": 4, "columns": 5, **overrides})
        with pytest.raises(error):
            secondary_capture_header(
                source, DerivedImage(**arguments), series=SERIES, content_datetime=CONTENT_DATETIME
            )
        with pytest.raises(error):
            case.writer.write(case.folder / "b.dcm", source, DerivedImage(**arguments), frames=frames)
    assert {p.name for p in case.folder.iterdir()} == {"a.dcm"}


def test_spliced_instance_streams_one_frame_at_a_time(case: SeriesCase) -> None:
    count, rows, columns = 4, 256, 128  # frames larger than any write buffer
    frame_bytes = rows * columns * 2
    source = _ct_small()
    arguments = dict(rows=rows, columns=columns, number_of_frames=count, bits_allocated=16)
    case.assert_identical(_copy_of(source, 1), **arguments)
    sizes: list[int] = []

    def frames() -> Iterator[np.ndarray]:
        for index in range(count):
            (temp,) = case.folder.glob(".streamed.dcm.*.tmp")
            sizes.append(temp.stat().st_size)
            yield np.full((rows, columns), index * 1000, np.uint16)

    second = _copy_of(source, 2)
    path = case.writer.write(
        case.folder / "streamed.dcm", second, DerivedImage(**case.arguments(second, **arguments)), frames=frames()
    )
    assert case.counts() == (1, 1)
    assert [b - a for a, b in zip(sizes[1:], sizes[2:])] == [frame_bytes] * (count - 2)
    assert [int(f[0, 0]) for f in pydicom.dcmread(path).pixel_array] == [0, 1000, 2000, 3000]


def test_failed_write_keeps_existing_file(case: SeriesCase) -> None:
    source = _ct_small()
    target = case.folder / "out.dcm"
    target.write_bytes(b"previous")

    def frames() -> Iterator[np.ndarray]:
        yield np.zeros((4, 5), np.uint8)
        raise RuntimeError("processing failed mid-series")

    for number in (1, 2):
        instance = _copy_of(source, number)
        arguments = case.arguments(instance, rows=4, columns=5, number_of_frames=2)
        with pytest.raises(RuntimeError, match="mid-series"):
            case.writer.write(target, instance, DerivedImage(**arguments), frames=frames())
    assert target.read_bytes() == b"previous"
    assert {p.name for p in case.folder.iterdir()} == {"out.dcm"}
