"""Derived Secondary Capture (SC) writer.

dicom-node turns source images (e.g. a CT series) into windowed or equalised
8/16-bit grey or 8-bit RGB frames and stores them as *derived* Secondary
Capture instances in the source's study, in a new series.

Two steps, as in highdicom: validate everything, then build.

Why not highdicom's ``SCImage`` itself: highdicom 0.28 writes single-frame Secondary Capture only
(a 3-D array is taken as colour, so the Multi-frame Grayscale Byte/Word SC IODs cannot be made
with it), it holds the whole pixel array in memory to build Pixel Data (a 1,000-frame cine would
be held decoded), and dciodvfy reported an error in its output from a CT slice (Laterality, type
2C, copied from a source where it does not apply).  This writer streams frames into the file.

* :func:`secondary_capture_header` builds the whole data set except Pixel Data
  (with its File Meta Information, Explicit VR Little Endian).
* :func:`write_secondary_capture` writes that header and streams the frames
  into the Pixel Data element one frame at a time, then moves the finished
  file onto its path atomically.

SOP classes written:

============  ================  ===============================================
grey/colour   bits allocated    SOP Class
============  ================  ===============================================
single frame  8 or 16 grey,     Secondary Capture Image Storage
              8 RGB             (1.2.840.10008.5.1.4.1.1.7)
multi-frame   8 grey            Multi-frame Grayscale Byte SC Image Storage
                                (1.2.840.10008.5.1.4.1.1.7.2)
multi-frame   16 grey           Multi-frame Grayscale Word SC Image Storage
                                (1.2.840.10008.5.1.4.1.1.7.3)
multi-frame   8 RGB             Multi-frame True Color SC Image Storage
                                (1.2.840.10008.5.1.4.1.1.7.4)
============  ================  ===============================================

Grey is MONOCHROME2 (unsigned, all allocated bits stored); colour is RGB with
Planar Configuration 0 (``R G B R G B ...``).
"""

from __future__ import annotations

import copy
import datetime
import os
import pathlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import RE_VALID_UID, UID, ExplicitVRLittleEndian

from node.fsutil import atomic_output
from node.writers.uids import derived_uid

__all__ = [
    "SECONDARY_CAPTURE_IMAGE_STORAGE",
    "MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE",
    "MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE",
    "MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE",
    "SourceImage",
    "DerivedSeries",
    "secondary_capture_header",
    "write_secondary_capture",
]

SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.2")
MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.3")
MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.4")

#: Manufacturer / model written into General Equipment and SC Equipment.
MANUFACTURER = "dicom-node"

# File Meta: a fixed implementation UID for this software (derived, so stable).
_IMPLEMENTATION_CLASS_UID = derived_uid("dicom-node", "implementation class")

# (samples per pixel, bits allocated) -> multi-frame SOP class.
_MULTIFRAME_SOP_CLASSES = {
    (1, 8): MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE,
    (1, 16): MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE,
    (3, 8): MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE,
}

# The Multi-frame module's Frame Increment Pointer points at this vector
# (SC Multi-frame Vector module), which numbers the frames 1..N.
_FRAME_INCREMENT_KEYWORD = "PageNumberVector"

# Pixel Data must fit a 32-bit explicit length (0xFFFFFFFF means "undefined").
_MAX_PIXEL_DATA_LENGTH = 0xFFFFFFFE

_PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)

# --- what is copied from the source --------------------------------------

# Patient module (PS3.3 C.7.1.1) and Clinical Trial Subject module (C.7.1.3).
# Type 2 attributes are written empty when the source lacks them.
_PATIENT_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_PATIENT_OPTIONAL = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "EthnicGroupCodeSequence",
    "PatientComments",
    "QualityControlSubject",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "StrainDescription",
    "StrainNomenclature",
    "StrainCodeSequence",
    "StrainAdditionalInformation",
    "StrainStockSequence",
    "GeneticModificationsSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
)

# General Study module (C.7.2.1) and Clinical Trial Study module (C.7.2.3).
_STUDY_TYPE2 = (
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_STUDY_OPTIONAL = (
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingService",
    "RequestingServiceCodeSequence",
    "ReferencedStudySequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Clinical Trial Study
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "ConsentForClinicalTrialUseSequence",
)

# Patient Study module (C.7.2.2): describes the patient at the time of the
# study, so it stays true for every instance of the study.
_PATIENT_STUDY_OPTIONAL = (
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "Occupation",
    "AdditionalPatientHistory",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "IssuerOfServiceEpisodeIDSequence",
    "ServiceEpisodeDescription",
    "PatientSexNeutered",
    "MedicalAlerts",
    "Allergies",
    "SmokingStatus",
    "PregnancyStatus",
    "LastMenstrualDate",
    "PatientState",
)

# Body Part Examined defined terms of unpaired structures (PS3.16 Annex L,
# "Laterality" column): for these, General Series Laterality is not required.
_UNPAIRED_BODY_PARTS = frozenset(
    """
    ABDOMEN ABDOMENPELVIS AORTA BACK BLADDER BRAIN CEREBELLUM CERVIX CHEST
    CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS COCCYX COLON CORONARYARTERY
    CSPINE CTSPINE DUODENUM ESOPHAGUS FACE GALLBLADDER HEAD HEADNECK HEART
    ILEUM ILIUM JAW JEJUNUM LARYNX LIVER LSPINE LSSPINE MAXILLA MEDIASTINUM
    MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE PANCREAS
    PELVIS PENIS PHARYNX PROSTATE RECTUM SCALP SKULL SPINE SPLEEN SSPINE
    STERNUM STOMACH THYMUS THYROID TLSPINE TONGUE TRACHEA TSPINE URETER
    URETHRA UTERUS VAGINA VULVA WHOLEBODY
    """.split()
)

# Patient Study sizes that some modalities fill with 0 for "unknown": a zero
# is not copied (it is not a measurement, and validators flag it).
_POSITIVE_ONLY = frozenset(
    {
        "PatientSize",
        "PatientWeight",
        "PatientBodyMassIndex",
        "MeasuredAPDimension",
        "MeasuredLateralDimension",
    }
)

# De-identification Method written when a de-identified source does not say.
_UNSPECIFIED_DEIDENTIFICATION_METHOD = "unspecified in source"

# Lossy transfer syntaxes -> Lossy Image Compression Method (CID 7205 terms),
# for sources that do not say themselves that they were lossy compressed.
_LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.100": "ISO_13818_2",  # MPEG2
    "1.2.840.10008.1.2.4.101": "ISO_13818_2",
    "1.2.840.10008.1.2.4.102": "ISO_14496_10",  # MPEG-4 AVC/H.264
    "1.2.840.10008.1.2.4.103": "ISO_14496_10",
    "1.2.840.10008.1.2.4.104": "ISO_14496_10",
    "1.2.840.10008.1.2.4.105": "ISO_14496_10",
    "1.2.840.10008.1.2.4.106": "ISO_14496_10",
    "1.2.840.10008.1.2.4.107": "ISO_23008_2",  # HEVC/H.265
    "1.2.840.10008.1.2.4.108": "ISO_23008_2",
}


@dataclass(frozen=True)
class SourceImage:
    """One source instance that a derived image was made from.

    Parameters
    ----------
    sop_class_uid : str
        SOP Class UID of the source instance.
    sop_instance_uid : str
        SOP Instance UID of the source instance.
    series_instance_uid : str or None, optional
        Series Instance UID of the source instance, for the Common Instance
        Reference module; ``None`` (default) means the series of the
        ``source`` data set given to :func:`secondary_capture_header`.
        Every source image must belong to the same study as ``source``.

    Raises
    ------
    TypeError
        If a UID is not a ``str``.
    ValueError
        If a UID is not a valid DICOM UID.
    """

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str | None = None

    def __post_init__(self) -> None:
        _check_uid("SourceImage.sop_class_uid", self.sop_class_uid)
        _check_uid("SourceImage.sop_instance_uid", self.sop_instance_uid)
        if self.series_instance_uid is not None:
            _check_uid("SourceImage.series_instance_uid", self.series_instance_uid)


@dataclass(frozen=True)
class DerivedSeries:
    """The new series the derived Secondary Captures go into.

    Parameters
    ----------
    series_instance_uid : str
        Series Instance UID of the new series (must differ from the source's).
    series_number : int
        Series Number (IS, a signed 32-bit integer).
    series_description : str
        Series Description (LO: at most 64 characters, no backslash).
    derivation_description : str
        Derivation Description of every image of the series (ST: at most
        1024 characters), e.g. ``"rescale; window C=40 W=80 LINEAR"``.

    Raises
    ------
    TypeError
        If a field has the wrong type.
    ValueError
        If a field's value cannot be encoded in its DICOM attribute.
    """

    series_instance_uid: str
    series_number: int
    series_description: str
    derivation_description: str

    def __post_init__(self) -> None:
        _check_uid("DerivedSeries.series_instance_uid", self.series_instance_uid)
        _check_is("DerivedSeries.series_number", self.series_number)
        _check_text("DerivedSeries.series_description", self.series_description, 64)
        _check_text(
            "DerivedSeries.derivation_description",
            self.derivation_description,
            1024,
            free_text=True,
        )


# --- validation helpers -----------------------------------------------------


def _check_type(name: str, value: object, types: type | tuple[type, ...]) -> None:
    if not isinstance(value, types):
        expected = (
            types.__name__
            if isinstance(types, type)
            else " or ".join(t.__name__ for t in types)
        )
        raise TypeError(f"{name} must be {expected}, not {type(value).__name__}")


def _check_int(name: str, value: object) -> None:
    # bool is an int subclass; True rows is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")


def _check_uid(name: str, value: object) -> None:
    _check_type(name, value, str)
    # Not UID(value).is_valid: constructing a UID warns (or raises) when invalid.
    if len(value) > 64 or not RE_VALID_UID.match(value):
        raise ValueError(f"{name} is not a valid DICOM UID: {value!r}")


def _check_is(name: str, value: object) -> None:
    _check_int(name, value)
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{name} must fit a signed 32-bit integer (IS), got {value}")


def _check_text(
    name: str, value: object, max_length: int, *, free_text: bool = False
) -> None:
    """LO-like (one line, no backslash) unless ``free_text`` (ST)."""
    _check_type(name, value, str)
    if len(value) > max_length:
        raise ValueError(
            f"{name} is {len(value)} characters long, at most {max_length} allowed"
        )
    if free_text:
        return
    if "\\" in value:
        raise ValueError(f"{name} must not contain a backslash: {value!r}")
    if any(ch in value for ch in "\r\n\f"):
        raise ValueError(f"{name} must be a single line: {value!r}")


# --- formatting helpers -----------------------------------------------------


def _da(value: datetime.datetime) -> str:
    return value.strftime("%Y%m%d")


def _tm(value: datetime.datetime) -> str:
    text = value.strftime("%H%M%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text


def _software_version() -> str:
    try:
        return metadata.version("dicom-node")
    except metadata.PackageNotFoundError:  # running from a checkout
        return "unknown"


def _implementation_version_name(version: str) -> str:
    """SH, at most 16 characters: "DICOMNODE" plus the version if it fits."""
    name = f"DICOMNODE{version}"
    return name if len(name) <= 16 and version != "unknown" else "DICOMNODE"


def _copy_attribute(source: Dataset, target: Dataset, keyword: str) -> bool:
    """Copy ``keyword`` from source to target (deep copy); False if absent."""
    if keyword not in source:
        return False
    element = source[keyword]
    target.add(DataElement(element.tag, element.VR, copy.deepcopy(element.value)))
    return True


def _source_value(source: Dataset, keyword: str) -> object:
    """The source's value of ``keyword`` or None if absent or empty."""
    value = source.get(keyword)
    if value is None or value == "" or (isinstance(value, list) and not value):
        return None
    return value


# --- the header -------------------------------------------------------------


def _select_sop_class(
    number_of_frames: int,
    samples_per_pixel: int,
    bits_allocated: int,
    multi_frame: bool | None,
) -> tuple[UID, bool]:
    if samples_per_pixel not in (1, 3):
        raise ValueError(
            f"samples_per_pixel must be 1 (grey) or 3 (RGB), got {samples_per_pixel}"
        )
    if bits_allocated not in (8, 16):
        raise ValueError(f"bits_allocated must be 8 or 16, got {bits_allocated}")
    if (samples_per_pixel, bits_allocated) not in _MULTIFRAME_SOP_CLASSES:
        raise ValueError(
            "no Secondary Capture SOP class for "
            f"samples_per_pixel={samples_per_pixel} with "
            f"bits_allocated={bits_allocated}: RGB must be 8-bit "
            "(grey may be 8 or 16-bit)"
        )
    if multi_frame is None:
        multi_frame = number_of_frames > 1
    if not multi_frame and number_of_frames != 1:
        raise ValueError(
            f"multi_frame=False needs number_of_frames=1, got {number_of_frames}"
        )
    if multi_frame:
        return _MULTIFRAME_SOP_CLASSES[(samples_per_pixel, bits_allocated)], True
    return SECONDARY_CAPTURE_IMAGE_STORAGE, False


def secondary_capture_header(
    source: Dataset,
    *,
    rows: int,
    columns: int,
    number_of_frames: int,
    samples_per_pixel: int,
    bits_allocated: int,
    series: DerivedSeries,
    sop_instance_uid: str,
    instance_number: int,
    source_images: Sequence[SourceImage],
    content_datetime: datetime.datetime,
    multi_frame: bool | None = None,
) -> FileDataset:
    """Build a derived Secondary Capture data set, everything but Pixel Data.

    The result has File Meta Information for Explicit VR Little Endian and is
    meant for :func:`write_secondary_capture`.

    What is written:

    * Patient, Clinical Trial Subject, General Study, Clinical Trial Study and
      Patient Study attributes, Specific Character Set and Timezone Offset From
      UTC are copied from ``source`` (the type 2 ones written empty when the
      source lacks them; zero Patient Size/Weight-like values, which mean
      "unknown", are left out). A source marked Patient Identity Removed
      ``YES`` without a De-identification Method (type 1C then) gets the
      method ``"unspecified in source"``. No other series- or image-level
      attribute is copied (no Frame of Reference, position, orientation,
      pixel spacing, windows, private attributes, ...): they would describe a
      different series or be invalid in an SC image.
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
      source's, else ``"NO"``), and Lossy Image Compression ``"01"`` (with
      ratio/method) when the source was lossy compressed.
    * General Reference: Derivation Description and Source Image Sequence (one
      item per ``source_images`` entry).
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
    rows, columns : int
        Size of each frame, 1..65535.
    number_of_frames : int
        Number of frames, at least 1.
    samples_per_pixel : int
        1 for grey (MONOCHROME2), 3 for RGB.
    bits_allocated : int
        8 or 16 for grey, 8 for RGB.
    series : DerivedSeries
        The new series.
    sop_instance_uid : str
        SOP Instance UID of the new instance (see
        :func:`node.writers.uids.derived_uid`).
    instance_number : int
        Instance Number within the new series.
    source_images : Sequence[SourceImage]
        The instances the image was derived from, at least one, all in the
        source's study.
    content_datetime : datetime.datetime
        When the content was made (Content, Series, Instance Creation and
        Secondary Capture Date/Time). A timezone-aware value is converted to
        the source's Timezone Offset From UTC when the source has one
        (that offset is copied and applies to every date/time in the data
        set); otherwise its wall-clock date and time are written.
    multi_frame : bool or None, optional
        ``None`` (default): multi-frame SOP class when ``number_of_frames``
        > 1. ``True`` forces a multi-frame SOP class even for one frame;
        ``False`` forces Secondary Capture Image Storage (one frame only).

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
        If a value is out of range, the combination of samples per pixel and
        bits allocated has no SC SOP class (e.g. 16-bit RGB), the source
        lacks a Study Instance UID, the series or instance UID is the
        source's, or Pixel Data would exceed 2**32 - 2 bytes.
    """
    # ---- validate ----
    _check_type("source", source, Dataset)
    for name, value in (
        ("rows", rows),
        ("columns", columns),
        ("number_of_frames", number_of_frames),
        ("samples_per_pixel", samples_per_pixel),
        ("bits_allocated", bits_allocated),
    ):
        _check_int(name, value)
    _check_type("series", series, DerivedSeries)
    _check_uid("sop_instance_uid", sop_instance_uid)
    _check_is("instance_number", instance_number)
    if isinstance(source_images, str | bytes) or not isinstance(source_images, Sequence):
        raise TypeError(
            "source_images must be a sequence of SourceImage, "
            f"not {type(source_images).__name__}"
        )
    for index, image in enumerate(source_images):
        _check_type(f"source_images[{index}]", image, SourceImage)
    _check_type("content_datetime", content_datetime, datetime.datetime)
    if multi_frame is not None:
        _check_type("multi_frame", multi_frame, bool)

    for name, value in (("rows", rows), ("columns", columns)):
        if not 1 <= value <= 65535:
            raise ValueError(f"{name} must be 1..65535, got {value}")
    if number_of_frames < 1:
        raise ValueError(f"number_of_frames must be at least 1, got {number_of_frames}")
    rows, columns, number_of_frames = int(rows), int(columns), int(number_of_frames)
    samples_per_pixel, bits_allocated = int(samples_per_pixel), int(bits_allocated)
    sop_class_uid, is_multi_frame = _select_sop_class(
        number_of_frames, samples_per_pixel, bits_allocated, multi_frame
    )
    pixel_bytes = rows * columns * samples_per_pixel * (bits_allocated // 8)
    total = pixel_bytes * number_of_frames
    if total + (total % 2) > _MAX_PIXEL_DATA_LENGTH:
        raise ValueError(
            f"Pixel Data of {number_of_frames} frames of {rows}x{columns}x"
            f"{samples_per_pixel} {bits_allocated}-bit pixels is {total} bytes, "
            f"more than the {_MAX_PIXEL_DATA_LENGTH} a native encoding can hold"
        )
    if not source_images:
        raise ValueError("source_images must name at least one source instance")

    study_uid = _source_value(source, "StudyInstanceUID")
    if study_uid is None:
        raise ValueError("source has no Study Instance UID")
    source_series_uid = _source_value(source, "SeriesInstanceUID")
    if series.series_instance_uid == source_series_uid:
        raise ValueError(
            "series.series_instance_uid is the source's Series Instance UID; "
            "derived images go into a new series"
        )
    if sop_instance_uid == _source_value(source, "SOPInstanceUID") or any(
        sop_instance_uid == image.sop_instance_uid for image in source_images
    ):
        raise ValueError("sop_instance_uid is the UID of a source instance")
    if any(
        image.series_instance_uid is None for image in source_images
    ) and source_series_uid is None:
        raise ValueError(
            "source has no Series Instance UID, so every SourceImage needs "
            "series_instance_uid"
        )
    charset = source.get("SpecificCharacterSet")
    if not charset:
        for name, text in (
            ("series.series_description", series.series_description),
            ("series.derivation_description", series.derivation_description),
        ):
            if not text.isascii():
                raise ValueError(
                    f"{name} is not ASCII but the source has no Specific "
                    "Character Set (default repertoire)"
                )

    # ---- build ----
    ds = Dataset()

    # SOP Common
    for keyword in ("SpecificCharacterSet", "TimezoneOffsetFromUTC"):
        _copy_attribute(source, ds, keyword)
    when = content_datetime
    offset_text = _source_value(source, "TimezoneOffsetFromUTC")
    if when.tzinfo is not None and when.utcoffset() is not None and offset_text:
        offset = _parse_utc_offset(str(offset_text))
        if offset is not None:
            when = when.astimezone(datetime.timezone(offset))
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = _da(when)
    ds.InstanceCreationTime = _tm(when)

    # Patient, Clinical Trial Subject
    for keyword in _PATIENT_TYPE2:
        if not _copy_attribute(source, ds, keyword):
            setattr(ds, keyword, "")
    for keyword in _PATIENT_OPTIONAL:
        _copy_attribute(source, ds, keyword)
    _complete_deidentification(ds)

    # General Study, Clinical Trial Study, Patient Study
    ds.StudyInstanceUID = study_uid
    for keyword in _STUDY_TYPE2:
        if not _copy_attribute(source, ds, keyword):
            setattr(ds, keyword, "")
    for keyword in _STUDY_OPTIONAL:
        _copy_attribute(source, ds, keyword)
    for keyword in _PATIENT_STUDY_OPTIONAL:
        if keyword in _POSITIVE_ONLY and not _is_positive(source.get(keyword)):
            continue
        _copy_attribute(source, ds, keyword)

    # General Series (Modality also SC Equipment's)
    ds.Modality = _source_value(source, "Modality") or "OT"
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = series.series_number
    if series.series_description:
        ds.SeriesDescription = series.series_description
    ds.SeriesDate = _da(when)
    ds.SeriesTime = _tm(when)
    _copy_attribute(source, ds, "BodyPartExamined")
    laterality = _source_laterality(source)
    if laterality is not None:
        ds.Laterality = laterality
    elif _source_value(source, "BodyPartExamined") not in _UNPAIRED_BODY_PARTS:
        # Type 2C: a possibly paired (or unknown) body part needs Laterality;
        # empty means unknown.
        ds.Laterality = ""

    # General Equipment, SC Equipment
    version = _software_version()
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = version
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = MANUFACTURER
    ds.SecondaryCaptureDeviceSoftwareVersions = version

    # General Image
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate = _da(when)
    ds.ContentTime = _tm(when)
    burned_in = _source_value(source, "BurnedInAnnotation")
    ds.BurnedInAnnotation = burned_in if burned_in in ("YES", "NO") else "NO"
    recognizable = _source_value(source, "RecognizableVisualFeatures")
    if recognizable in ("YES", "NO"):
        ds.RecognizableVisualFeatures = recognizable
    _set_lossy_compression(source, ds)

    # General Reference
    if series.derivation_description:
        ds.DerivationDescription = series.derivation_description
    ds.SourceImageSequence = DicomSequence(
        [_referenced_sop(image) for image in source_images]
    )

    # Common Instance Reference: one item per source series, in first-seen order
    by_series: dict[str, list[SourceImage]] = {}
    for image in source_images:
        by_series.setdefault(
            image.series_instance_uid or str(source_series_uid), []
        ).append(image)
    series_items = []
    for series_uid, images in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = DicomSequence(
            [_referenced_sop(image) for image in images]
        )
        series_items.append(item)
    ds.ReferencedSeriesSequence = DicomSequence(series_items)

    # Image Pixel
    ds.SamplesPerPixel = samples_per_pixel
    ds.PhotometricInterpretation = "MONOCHROME2" if samples_per_pixel == 1 else "RGB"
    if samples_per_pixel == 3:
        ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_allocated
    ds.HighBit = bits_allocated - 1
    ds.PixelRepresentation = 0

    # Multi-frame, SC Multi-frame Image, SC Multi-frame Vector
    if is_multi_frame:
        ds.NumberOfFrames = number_of_frames
        if number_of_frames > 1:  # 1C: not permitted for a single frame
            ds.FrameIncrementPointer = Tag(_FRAME_INCREMENT_KEYWORD)
            setattr(
                ds, _FRAME_INCREMENT_KEYWORD, list(range(1, number_of_frames + 1))
            )
        if samples_per_pixel == 1:
            ds.PresentationLUTShape = "IDENTITY"
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = "1"
            ds.RescaleType = "US"

    # SC Image
    ds.DateOfSecondaryCapture = _da(when)
    ds.TimeOfSecondaryCapture = _tm(when)

    file_meta = FileMetaDataset()
    file_meta.FileMetaInformationVersion = b"\x00\x01"
    file_meta.MediaStorageSOPClassUID = sop_class_uid
    file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    file_meta.ImplementationVersionName = _implementation_version_name(version)

    header = FileDataset(
        "", ds, preamble=b"\x00" * 128, file_meta=file_meta,
        is_implicit_VR=False, is_little_endian=True,
    )
    return header


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


def _complete_deidentification(ds: Dataset) -> None:
    """Keep Patient Identity Removed YES valid when the source omits how.

    De-identified sources often say YES without De-identification Method or
    its code sequence (one of them is type 1C then). The flag matters more
    than the method, so it is kept and the method is said to be unknown.
    """
    if ds.get("PatientIdentityRemoved") != "YES":
        return
    if ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence"):
        return
    ds.DeidentificationMethod = _UNSPECIFIED_DEIDENTIFICATION_METHOD


def _is_positive(value: object) -> bool:
    try:
        return value is not None and value != "" and float(value) > 0
    except (TypeError, ValueError):
        return False


def _source_laterality(source: Dataset) -> str | None:
    """"R" or "L" when the source says which side it shows, else None.

    The derived image shows the same anatomy, so a known side stays true:
    the series Laterality, else Image Laterality, else the Frame Laterality of
    an enhanced multi-frame source's shared functional groups. "B" (both) and
    "U" (unpaired) have no series-level equivalent and are not used.
    """
    candidates = [source.get("Laterality"), source.get("ImageLaterality")]
    shared = source.get("SharedFunctionalGroupsSequence")
    if shared:
        anatomy = shared[0].get("FrameAnatomySequence")
        if anatomy:
            candidates.append(anatomy[0].get("FrameLaterality"))
    for value in candidates:
        if value in ("R", "L"):
            return str(value)
    return None


def _referenced_sop(image: SourceImage) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = image.sop_class_uid
    item.ReferencedSOPInstanceUID = image.sop_instance_uid
    return item


def _set_lossy_compression(source: Dataset, ds: Dataset) -> None:
    """Lossy Image Compression "01" stays "01" in every derived image."""
    if _source_value(source, "LossyImageCompression") == "01":
        ds.LossyImageCompression = "01"
        _copy_attribute(source, ds, "LossyImageCompressionRatio")
        _copy_attribute(source, ds, "LossyImageCompressionMethod")
        return
    file_meta = getattr(source, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    method = _LOSSY_TRANSFER_SYNTAXES.get(str(syntax)) if syntax else None
    if method:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = method


# --- the writer -------------------------------------------------------------


def _header_int(header: Dataset, keyword: str, default: int | None = None) -> int:
    value = header.get(keyword, default)
    if value is None or value == "":
        raise ValueError(f"header has no {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"header {keyword} is not an integer: {value!r}") from None


def write_secondary_capture(
    path: str | os.PathLike, header: Dataset, frames: Iterable[np.ndarray]
) -> pathlib.Path:
    """Write ``header`` plus the frames as Pixel Data to ``path``, atomically.

    The header (see :func:`secondary_capture_header`) is written by pydicom
    to a temporary file in the destination folder; then the Pixel Data
    element (7FE0,0010) is appended by hand (Explicit VR Little Endian, OB for
    8-bit, OW for 16-bit, 4-byte length, padded to even length), one frame at
    a time, so memory stays O(one frame) whatever the number of frames. The
    file is fsync'ed and moved onto ``path`` with :func:`os.replace` (see
    :func:`node.fsutil.atomic_output`); on any error the temporary file is
    removed and ``path`` is left untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file (its folder is created if missing); an existing file
        is replaced.
    header : pydicom.dataset.Dataset
        Everything but Pixel Data, with ``file_meta`` whose Transfer Syntax is
        Explicit VR Little Endian; must hold Rows, Columns, Samples per Pixel,
        Bits Allocated and (for multi-frame) Number of Frames. Not modified.
    frames : Iterable[numpy.ndarray]
        Exactly Number of Frames (1 if absent) arrays, each of shape
        ``(rows, columns)`` for grey or ``(rows, columns, 3)`` for RGB, dtype
        ``uint8`` for 8-bit or ``uint16`` (either byte order) for 16-bit.
        Consumed lazily: a generator keeps one frame in memory at a time.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError
        If ``header`` is not a Dataset or a frame is not a numpy array.
    ValueError
        If the header is unusable (missing pixel description or file meta,
        not Explicit VR Little Endian, already holds Pixel Data or elements
        after it), a frame has the wrong shape or dtype or values above Bits
        Stored (the message names the frame index), or the number of frames
        differs from Number of Frames.
    """
    _check_type("header", header, Dataset)
    destination = pathlib.Path(path)

    rows = _header_int(header, "Rows")
    columns = _header_int(header, "Columns")
    samples = _header_int(header, "SamplesPerPixel")
    bits_allocated = _header_int(header, "BitsAllocated")
    bits_stored = _header_int(header, "BitsStored", bits_allocated)
    number_of_frames = _header_int(header, "NumberOfFrames", 1)
    if samples not in (1, 3):
        raise ValueError(f"header SamplesPerPixel must be 1 or 3, got {samples}")
    if bits_allocated not in (8, 16):
        raise ValueError(f"header BitsAllocated must be 8 or 16, got {bits_allocated}")
    if not 1 <= bits_stored <= bits_allocated:
        raise ValueError(
            f"header BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}"
        )
    if rows < 1 or columns < 1 or number_of_frames < 1:
        raise ValueError(
            f"header Rows/Columns/NumberOfFrames must be positive, got "
            f"{rows}/{columns}/{number_of_frames}"
        )
    file_meta = getattr(header, "file_meta", None)
    if file_meta is None or "TransferSyntaxUID" not in file_meta:
        raise ValueError("header has no file_meta with a Transfer Syntax UID")
    if file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise ValueError(
            "header Transfer Syntax must be Explicit VR Little Endian, got "
            f"{file_meta.TransferSyntaxUID}"
        )
    late = [tag for tag in header.keys() if tag >= _PIXEL_DATA_TAG]
    if late:
        raise ValueError(
            "header must not hold Pixel Data or elements after it, has "
            + ", ".join(str(Tag(tag)) for tag in late)
        )

    item_bytes = bits_allocated // 8
    frame_shape = (rows, columns) if samples == 1 else (rows, columns, samples)
    frame_length = rows * columns * samples * item_bytes
    length = frame_length * number_of_frames
    padding = length % 2
    if length + padding > _MAX_PIXEL_DATA_LENGTH:
        raise ValueError(
            f"Pixel Data of {length} bytes exceeds the {_MAX_PIXEL_DATA_LENGTH} "
            "bytes a native encoding can hold"
        )
    vr = b"OB" if bits_allocated == 8 else b"OW"
    out_dtype = np.dtype("u1") if bits_allocated == 8 else np.dtype("<u2")
    max_value = (1 << bits_stored) - 1

    with atomic_output(destination) as out:
        pydicom.dcmwrite(out, header, enforce_file_format=True)
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length + padding))
        written = 0
        for index, frame in enumerate(frames):
            if index >= number_of_frames:
                raise ValueError(
                    f"frame {index}: more frames than NumberOfFrames ({number_of_frames})"
                )
            _check_frame(index, frame, frame_shape, bits_allocated)
            data = np.ascontiguousarray(frame, dtype=out_dtype)
            if bits_stored < bits_allocated and data.size and int(data.max()) > max_value:
                raise ValueError(
                    f"frame {index} has values above {max_value} (BitsStored {bits_stored})"
                )
            out.write(memoryview(data).cast("B"))
            written += 1
        if written != number_of_frames:
            raise ValueError(
                f"got {written} frames, header NumberOfFrames is {number_of_frames}"
            )
        if padding:
            out.write(b"\x00")
    return destination


def _check_frame(
    index: int, frame: object, shape: tuple[int, ...], bits_allocated: int
) -> None:
    if not isinstance(frame, np.ndarray):
        raise TypeError(
            f"frame {index} must be a numpy array, not {type(frame).__name__}"
        )
    if frame.shape != shape:
        raise ValueError(f"frame {index} has shape {frame.shape}, expected {shape}")
    if frame.dtype.kind != "u" or frame.dtype.itemsize * 8 != bits_allocated:
        raise ValueError(
            f"frame {index} has dtype {frame.dtype}, expected uint{bits_allocated}"
        )
