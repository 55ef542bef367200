"""The header of a derived Secondary Capture: the whole data set but Pixel Data, with File Meta.

Two steps, as in highdicom: check everything (:class:`~node.outputs.sc.model.DerivedImage` checks
itself; :func:`check_source` what needs the source too), then build, one IOD module at a time.
"""

from __future__ import annotations

import datetime

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from node import MANUFACTURER, __version__
from node.outputs.sc.attributes import (
    copy_anatomy,
    copy_lossy_compression,
    copy_patient,
    copy_recognizable_visual_features,
    copy_sop_common,
    copy_study,
    derived_burned_in_annotation,
    source_value,
)
from node.outputs.sc.checks import check_type
from node.outputs.sc.model import DerivedImage, DerivedSeries, SourceImage
from node.outputs.uids import derived_uid

__all__ = ["check_header_arguments", "check_source", "secondary_capture_header", "set_instance_attributes"]

# File Meta: a fixed implementation UID for this software (derived, so stable).
_IMPLEMENTATION_CLASS_UID = derived_uid("dicom-node", "implementation class")

# The Multi-frame module's Frame Increment Pointer points at this vector
# (SC Multi-frame Vector module), which numbers the frames 1..N.
_FRAME_INCREMENT_KEYWORD = "PageNumberVector"


def secondary_capture_header(
    source: Dataset,
    image: DerivedImage,
    *,
    series: DerivedSeries,
    content_datetime: datetime.datetime,
) -> FileDataset:
    """Build a derived Secondary Capture data set, everything but Pixel Data.

    The result has File Meta Information for Explicit VR Little Endian and is
    meant for :func:`~node.outputs.sc.write_secondary_capture`.

    What is written:

    * Patient, Clinical Trial Subject, General Study, Clinical Trial Study and
      Patient Study attributes, Specific Character Set and Timezone Offset From
      UTC are copied from ``source`` (the type 2 ones written empty when the
      source lacks them; zero Patient Size/Weight-like values, which mean
      "unknown", are left out). A source marked Patient Identity Removed
      ``YES`` without a De-identification Method (type 1C then) gets the
      method ``"unspecified in source"``. No other series- or image-level
      attribute is copied (see :mod:`node.outputs.sc.attributes`).
    * General Series: a new series from ``series``; Modality is the source's
      Modality (the SC Equipment module lets it name the original modality),
      ``"OT"`` when the source has none. Series Date/Time are
      ``content_datetime``. Body Part Examined is copied (the images show the
      same anatomy). Laterality (type 2C) is written as ``"R"``/``"L"`` when
      the source names the side (its Laterality, Image Laterality or shared
      Frame Laterality), left out when Body Part Examined is an unpaired
      structure (e.g. ``HEAD``), and written empty (unknown) otherwise;
      dciodvfy warns about the empty value, but leaving it out is an error.
    * General Equipment / SC Equipment: Manufacturer ``"dicom-node"``,
      Conversion Type ``"WSD"`` (workstation), software version.
    * General Image: Image Type ``DERIVED\\SECONDARY``, Instance Number,
      empty Patient Orientation, Content Date/Time, Burned In Annotation (the
      source's ``NO`` or ``YES``, else ``"YES"``), and Lossy Image Compression ``"01"`` (with
      ratio/method) when the source was lossy compressed.
    * General Reference: Derivation Description and Source Image Sequence (one
      item per ``image.source_images`` entry).
    * Common Instance Reference: Referenced Series Sequence, one item per
      source series (Series Instance UID + Referenced Instance Sequence). The
      SC IODs do not contain a module with a top-level Referenced Series
      Sequence other than this one, so the source series is referenced here.
    * Image Pixel: MONOCHROME2 (grey) or RGB with Planar Configuration 0,
      unsigned, Bits Stored = Bits Allocated, High Bit = Bits Stored - 1.
    * Multi-frame SOP classes only: Number of Frames; Frame Increment Pointer
      to Page Number Vector (1..N, SC Multi-frame Vector module); for grey,
      Presentation LUT Shape ``IDENTITY`` and an identity Rescale (0, 1,
      ``"US"``), as the SC Multi-frame Image module requires.
    * SC Image: Date/Time of Secondary Capture; SOP Common: Instance Creation
      Date/Time. All dates and times come from ``content_datetime``.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        A source instance's data set (its header suffices: read with
        ``stop_before_pixels=True``). Must have a Study Instance UID.
    image : DerivedImage
        The new instance: its frames' size and format, SOP Instance UID, Instance Number and
        source images (all in the source's study).
    series : DerivedSeries
        The new series.
    content_datetime : datetime.datetime
        When the content was made (Content, Series, Instance Creation and
        Secondary Capture Date/Time). A timezone-aware value is converted to
        the source's Timezone Offset From UTC when the source has one
        (that offset is copied and applies to every date/time in the data
        set); otherwise its wall-clock date and time are written.

    Returns
    -------
    pydicom.dataset.FileDataset
        The header, with ``file_meta`` (Explicit VR Little Endian) and a
        128-byte zero preamble; no Pixel Data.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If the source lacks a Study Instance UID, the series or instance UID is the
        source's, or a description is not ASCII for a source without Specific Character Set
        (:class:`DerivedImage` and :class:`DerivedSeries` refuse their own bad values).
    """
    check_header_arguments(source, image, series, content_datetime)
    when = _local_datetime(source, content_datetime)
    version = __version__
    ds = Dataset()
    copy_sop_common(source, ds)
    ds.SOPClassUID = image.sop_class_uid
    set_instance_attributes(ds, image, source_value(source, "SeriesInstanceUID"))
    ds.InstanceCreationDate, ds.InstanceCreationTime = _da(when), _tm(when)
    copy_patient(source, ds)
    copy_study(source, ds)
    _general_series(ds, source, series, when)
    _equipment(ds, version)
    _general_image(ds, source, when)
    if series.derivation_description:  # General Reference
        ds.DerivationDescription = series.derivation_description
    _image_pixel(ds, image)
    if image.is_multi_frame:
        _multi_frame(ds, image)
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = _da(when), _tm(when)  # SC Image
    return FileDataset(
        "", ds, preamble=b"\x00" * 128, file_meta=_file_meta(image, version),
        is_implicit_VR=False, is_little_endian=True,
    )


def check_header_arguments(
    source: Dataset, image: DerivedImage, series: DerivedSeries, content_datetime: datetime.datetime
) -> None:
    """Every check of :func:`secondary_capture_header` (its Raises), before anything is built."""
    check_type("source", source, Dataset)
    check_type("image", image, DerivedImage)
    check_type("series", series, DerivedSeries)
    check_type("content_datetime", content_datetime, datetime.datetime)
    check_source(source, image, series)


def check_source(source: Dataset, image: DerivedImage, series: DerivedSeries) -> None:
    """Raise ValueError unless *image* of *series* can be derived from *source* (see the header's Raises)."""
    if source_value(source, "StudyInstanceUID") is None:
        raise ValueError("source has no Study Instance UID")
    source_series_uid = source_value(source, "SeriesInstanceUID")
    if series.series_instance_uid == source_series_uid:
        raise ValueError(
            "series.series_instance_uid is the source's Series Instance UID; "
            "derived images go into a new series"
        )
    if image.sop_instance_uid == source_value(source, "SOPInstanceUID") or any(
        image.sop_instance_uid == source_image.sop_instance_uid for source_image in image.source_images
    ):
        raise ValueError("sop_instance_uid is the UID of a source instance")
    if source_series_uid is None and any(
        source_image.series_instance_uid is None for source_image in image.source_images
    ):
        raise ValueError(
            "source has no Series Instance UID, so every SourceImage needs "
            "series_instance_uid"
        )
    if not source.get("SpecificCharacterSet"):
        for name, text in (
            ("series.series_description", series.series_description),
            ("series.derivation_description", series.derivation_description),
        ):
            if not text.isascii():
                raise ValueError(
                    f"{name} is not ASCII but the source has no Specific "
                    "Character Set (default repertoire)"
                )


def set_instance_attributes(ds: Dataset, image: DerivedImage, source_series_uid: object) -> None:
    """Set the attributes that differ between the instances of one derived series.

    SOP Instance UID (SOP Common), Instance Number (General Image), Source
    Image Sequence (General Reference) and Referenced Series Sequence (Common
    Instance Reference: one item per source series, in first-seen order).
    :class:`~node.outputs.sc.SecondaryCaptureSeriesWriter` encodes just these per instance, so
    every attribute set here is one it splices into the shared header.
    """
    ds.SOPInstanceUID = image.sop_instance_uid
    ds.InstanceNumber = image.instance_number
    ds.SourceImageSequence = DicomSequence(
        [_referenced_sop(source_image) for source_image in image.source_images]
    )
    by_series: dict[str, list[SourceImage]] = {}
    for source_image in image.source_images:
        by_series.setdefault(
            source_image.series_instance_uid or str(source_series_uid), []
        ).append(source_image)
    series_items = []
    for series_uid, images in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = DicomSequence(
            [_referenced_sop(source_image) for source_image in images]
        )
        series_items.append(item)
    ds.ReferencedSeriesSequence = DicomSequence(series_items)


def _referenced_sop(image: SourceImage) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = image.sop_class_uid
    item.ReferencedSOPInstanceUID = image.sop_instance_uid
    return item


# --- the modules -------------------------------------------------------------


def _general_series(ds: Dataset, source: Dataset, series: DerivedSeries, when: datetime.datetime) -> None:
    """General Series: the new series (Modality also SC Equipment's), Body Part and Laterality."""
    ds.Modality = source_value(source, "Modality") or "OT"
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = series.series_number
    if series.series_description:
        ds.SeriesDescription = series.series_description
    ds.SeriesDate, ds.SeriesTime = _da(when), _tm(when)
    copy_anatomy(source, ds)


def _equipment(ds: Dataset, version: str) -> None:
    """General Equipment and SC Equipment: this software, a workstation conversion."""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = version
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = MANUFACTURER
    ds.SecondaryCaptureDeviceSoftwareVersions = version


def _general_image(ds: Dataset, source: Dataset, when: datetime.datetime) -> None:
    """General Image, but the Instance Number (per instance)."""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = _da(when), _tm(when)
    ds.BurnedInAnnotation = derived_burned_in_annotation(source)
    copy_recognizable_visual_features(source, ds)
    copy_lossy_compression(source, ds)


def _image_pixel(ds: Dataset, image: DerivedImage) -> None:
    """Image Pixel: MONOCHROME2 or RGB (planar configuration 0), unsigned, all allocated bits stored."""
    ds.SamplesPerPixel = image.samples_per_pixel
    ds.PhotometricInterpretation = "MONOCHROME2" if image.samples_per_pixel == 1 else "RGB"
    if image.samples_per_pixel == 3:
        ds.PlanarConfiguration = 0
    ds.Rows = image.rows
    ds.Columns = image.columns
    ds.BitsAllocated = image.bits_allocated
    ds.BitsStored = image.bits_allocated
    ds.HighBit = image.bits_allocated - 1
    ds.PixelRepresentation = 0


def _multi_frame(ds: Dataset, image: DerivedImage) -> None:
    """Multi-frame, SC Multi-frame Image and SC Multi-frame Vector."""
    ds.NumberOfFrames = image.number_of_frames
    if image.number_of_frames > 1:  # 1C: not permitted for a single frame
        ds.FrameIncrementPointer = Tag(_FRAME_INCREMENT_KEYWORD)
        setattr(ds, _FRAME_INCREMENT_KEYWORD, list(range(1, image.number_of_frames + 1)))
    if image.samples_per_pixel == 1:
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"


def _file_meta(image: DerivedImage, version: str) -> FileMetaDataset:
    file_meta = FileMetaDataset()
    file_meta.FileMetaInformationVersion = b"\x00\x01"
    file_meta.MediaStorageSOPClassUID = image.sop_class_uid
    file_meta.MediaStorageSOPInstanceUID = image.sop_instance_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    file_meta.ImplementationVersionName = _implementation_version_name(version)
    return file_meta


# --- dates, times and versions --------------------------------------------------


def _local_datetime(source: Dataset, content_datetime: datetime.datetime) -> datetime.datetime:
    """*content_datetime* in the source's Timezone Offset From UTC when both have a zone, else as it is."""
    offset_text = source_value(source, "TimezoneOffsetFromUTC")
    if content_datetime.tzinfo is None or content_datetime.utcoffset() is None or not offset_text:
        return content_datetime
    offset = _parse_utc_offset(str(offset_text))
    if offset is None:
        return content_datetime
    return content_datetime.astimezone(datetime.timezone(offset))


def _parse_utc_offset(text: str) -> datetime.timedelta | None:
    """``"+0100"``/``"-0500"`` -> timedelta, None if malformed."""
    text = text.strip()
    if len(text) != 5 or text[0] not in "+-" or not text[1:].isdigit():
        return None
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        return None
    delta = datetime.timedelta(hours=hours, minutes=minutes)
    return -delta if text[0] == "-" else delta


def _da(value: datetime.datetime) -> str:
    return value.strftime("%Y%m%d")


def _tm(value: datetime.datetime) -> str:
    text = value.strftime("%H%M%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text


def _implementation_version_name(version: str) -> str:
    """SH, at most 16 characters: "DICOMNODE" plus the version if it fits."""
    name = f"DICOMNODE{version}"
    return name if len(name) <= 16 and version != "unknown" else "DICOMNODE"
