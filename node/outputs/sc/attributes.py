"""Which attributes of the source a derived Secondary Capture copies, and what it makes of others.

Copied as they are: Patient and Clinical Trial Subject (PS3.3 C.7.1.1, C.7.1.3), General Study
and Clinical Trial Study (C.7.2.1, C.7.2.3), Patient Study (C.7.2.2), Specific Character Set,
Timezone Offset From UTC and Body Part Examined; the type 2 ones written empty when the source
lacks them.  Derived from the source's values: Laterality, Burned In Annotation, Recognizable
Visual Features, Lossy Image Compression and the De-identification Method of a de-identified
source.  Nothing else of the source is copied (no Frame of Reference, position, orientation,
pixel spacing, windows, private attributes, ...): those would describe a different series or be
invalid in an SC image.

:data:`HEADER_SOURCE_KEYWORDS` lists every source attribute the header reads: the series writer
(:mod:`node.outputs.sc.writer`) reuses one instance's header for another only when they agree
on all of them.
"""

from __future__ import annotations

import copy

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

__all__ = [
    "HEADER_SOURCE_KEYWORDS",
    "HEADER_SOURCE_TAGS",
    "complete_deidentification",
    "copy_anatomy",
    "copy_lossy_compression",
    "copy_patient",
    "copy_recognizable_visual_features",
    "copy_sop_common",
    "copy_study",
    "derived_burned_in_annotation",
    "derived_series_laterality",
    "source_laterality",
    "source_value",
]

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

# Every source attribute the header copies or reads, besides those whose result the series
# writer's key holds instead (Laterality: source_laterality; the source's transfer syntax) and
# the SOP / Series Instance UIDs (only the checks and the per-instance references use them).
# Keep in step with the functions below and node.outputs.sc.header: a source attribute they
# read that is missing here would let a series reuse a header built from another instance's value.
HEADER_SOURCE_KEYWORDS = (
    "SpecificCharacterSet",
    "TimezoneOffsetFromUTC",
    *_PATIENT_TYPE2,
    *_PATIENT_OPTIONAL,
    "StudyInstanceUID",
    *_STUDY_TYPE2,
    *_STUDY_OPTIONAL,
    *_PATIENT_STUDY_OPTIONAL,
    "Modality",
    "BodyPartExamined",
    "BurnedInAnnotation",
    "RecognizableVisualFeatures",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)
HEADER_SOURCE_TAGS = frozenset(Tag(keyword) for keyword in HEADER_SOURCE_KEYWORDS)


def source_value(source: Dataset, keyword: str) -> object:
    """The source's value of ``keyword`` or None if absent or empty."""
    value = source.get(keyword)
    if value is None or value == "" or (isinstance(value, list) and not value):
        return None
    return value


def _copy_attribute(source: Dataset, target: Dataset, keyword: str) -> bool:
    """Copy ``keyword`` from source to target (deep copy); False if absent."""
    if keyword not in source:
        return False
    element = source[keyword]
    target.add(DataElement(element.tag, element.VR, copy.deepcopy(element.value)))
    return True


def _copy_type2(source: Dataset, target: Dataset, keywords: tuple[str, ...]) -> None:
    """Copy *keywords*, each written empty when the source lacks it (type 2)."""
    for keyword in keywords:
        if not _copy_attribute(source, target, keyword):
            setattr(target, keyword, "")


def _copy_optional(source: Dataset, target: Dataset, keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        _copy_attribute(source, target, keyword)


def copy_sop_common(source: Dataset, ds: Dataset) -> None:
    """Specific Character Set and Timezone Offset From UTC (SOP Common), when the source has them."""
    _copy_optional(source, ds, ("SpecificCharacterSet", "TimezoneOffsetFromUTC"))


def copy_patient(source: Dataset, ds: Dataset) -> None:
    """Patient and Clinical Trial Subject modules; a De-identification Method where one is due."""
    _copy_type2(source, ds, _PATIENT_TYPE2)
    _copy_optional(source, ds, _PATIENT_OPTIONAL)
    complete_deidentification(ds)


def copy_study(source: Dataset, ds: Dataset) -> None:
    """General Study, Clinical Trial Study and Patient Study modules (Study Instance UID included).

    Patient Study sizes that some modalities fill with 0 for "unknown" are left out when not
    positive (a zero is not a measurement, and validators flag it).
    """
    ds.StudyInstanceUID = source_value(source, "StudyInstanceUID")
    _copy_type2(source, ds, _STUDY_TYPE2)
    _copy_optional(source, ds, _STUDY_OPTIONAL)
    for keyword in _PATIENT_STUDY_OPTIONAL:
        if keyword in _POSITIVE_ONLY and not _is_positive(source.get(keyword)):
            continue
        _copy_attribute(source, ds, keyword)


def copy_anatomy(source: Dataset, ds: Dataset) -> None:
    """Body Part Examined (the images show the same anatomy) and the series' Laterality.

    See :func:`derived_series_laterality`.
    """
    _copy_attribute(source, ds, "BodyPartExamined")
    laterality = derived_series_laterality(source)
    if laterality is not None:
        ds.Laterality = laterality


def copy_recognizable_visual_features(source: Dataset, ds: Dataset) -> None:
    """Recognizable Visual Features, when the source says ``YES`` or ``NO``."""
    recognizable = source_value(source, "RecognizableVisualFeatures")
    if recognizable in ("YES", "NO"):
        ds.RecognizableVisualFeatures = recognizable


def copy_lossy_compression(source: Dataset, ds: Dataset) -> None:
    """Lossy Image Compression "01" stays "01" in every derived image.

    The source says so itself (with its ratio and method), or its transfer syntax is a lossy one
    (the method is then that syntax's).
    """
    if source_value(source, "LossyImageCompression") == "01":
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


def complete_deidentification(ds: Dataset) -> None:
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


def derived_burned_in_annotation(source: Dataset) -> str:
    """Burned In Annotation (0028,0301) of an image derived from ``source``'s pixels.

    The source's own ``YES`` or ``NO`` is copied (a derived image shows what its source
    showed). Where the source does not say, or says something else, the answer is ``YES``:
    de-identification tools trust a ``NO`` and pass the pixels on unmasked, so a ``NO`` is
    written only when the source states it (an ultrasound or a screen capture with the
    patient's name in its pixels often carries no value at all).

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source image's data set (its pixels need not be loaded).

    Returns
    -------
    str
        ``"YES"`` or ``"NO"``.
    """
    stated = source_value(source, "BurnedInAnnotation")
    if isinstance(stated, str) and stated.strip().upper() == "NO":
        return "NO"
    return "YES"


def derived_series_laterality(source: Dataset) -> str | None:
    """General Series Laterality (0020,0060) of a new series made from ``source``.

    ``"R"``/``"L"`` when the source names the side (:func:`source_laterality`); None (leave it
    out) when Body Part Examined is an unpaired structure (e.g. ``HEAD``); else ``""``: type 2C,
    a possibly paired (or unknown) body part needs Laterality, and empty means unknown (dciodvfy
    warns about the empty value, but leaving it out is an error).
    """
    laterality = source_laterality(source)
    if laterality is not None:
        return laterality
    if source_value(source, "BodyPartExamined") in _UNPAIRED_BODY_PARTS:
        return None
    return ""


def source_laterality(source: Dataset) -> str | None:
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


def _is_positive(value: object) -> bool:
    try:
        return value is not None and value != "" and float(value) > 0
    except (TypeError, ValueError):
        return False
