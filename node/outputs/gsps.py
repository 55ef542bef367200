"""Grayscale Softcopy Presentation State output (``output = "gsps"``): how to show the sources.

Instead of new pixels, a Grayscale Softcopy Presentation State (GSPS, PS3.3 A.33.1), in a new
series of the source study, tells any viewer or PACS how to display the source images as the
pipeline would: it references every source image and copies no pixel data.  What it says - the
Modality LUT, each frame's window or table - is decided by :mod:`node.process.presentation`; this
module writes it: the Modality LUT module, one Softcopy VOI LUT item per distinct window or table
(referencing the images, or frames, it applies to; none when one item serves all), Presentation
LUT Shape ``INVERSE`` for MONOCHROME1 sources (in a presentation state the Presentation LUT, not
the image's Photometric Interpretation, decides polarity: dcmtk shows a MONOCHROME1 image under
``IDENTITY`` with its grey scale reversed), ``IDENTITY`` otherwise.

highdicom 0.28's :class:`highdicom.pr.GrayscaleSoftcopyPresentationState` and
:class:`highdicom.pr.SoftcopyVOILUTTransformation` build the object; what they cannot do, and
what is done about it:

* it reads Type 2 patient/study attributes (Patient's Birth Date, Sex, Accession Number, Study
  ID, Study Date/Time, Referring Physician) from the first image and raises AttributeError when a
  real source lacks one: it is given copies of the headers with the missing ones empty (PS3.5:
  an empty Type 2 value means unknown); the copies are deep, as highdicom puts the copied
  elements themselves into the presentation state;
* copying the Modality LUT from the images fails for multi-frame images without shared
  functional groups (AttributeError) or with a per-frame Pixel Value Transformation (ValueError)
  and copies only slope/intercept: the Modality LUT is always given to it;
* :class:`highdicom.VOILUT` refuses a negative first mapped value, but a CT table starts at
  negative HU: the LUT Descriptor is written as SS then (PS3.3 C.11.2.1.1 allows US or SS);
* all referenced images must have the same Rows/Columns (one Displayed Area Selection for all):
  :mod:`node.process.presentation` makes one presentation state per size (and per polarity);
* ``check_person_name`` warns with the patient's name in the message: its warnings are silenced,
  so no name reaches the logs;
* it turns a Window Center & Width Explanation given as one string into a list of its letters
  (VM 29 for ``brain window C=40 W=80 LINEAR``): the explanation is set afterwards;
* dciodvfy reported two errors on its object from the shared CT: Laterality missing (General
  Series, Type 2C) and an empty De-identification Method copied from a source that says Patient
  Identity Removed: both are set as for the node's Secondary Captures
  (:func:`~node.outputs.sc.attributes.derived_series_laterality`,
  :func:`~node.outputs.sc.attributes.complete_deidentification`);
* it stamps creation dates with the clock: they are set from the processing time given.

dcmtk's presentation state reader refuses one whose Patient's Name is empty (dcmpstat's read
check), though the name is Type 2 and empty is valid: the source's name is copied as it is (an
invented one would not match the study's), so such a presentation state does not open in
dcmtk-based viewers.
"""

from __future__ import annotations

import copy
import datetime
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node import MANUFACTURER, __version__
from node.imaging.modality import Rescale
from node.imaging.source import ImageFile
from node.imaging.voi import VOITable, VOIWindow
from node.outputs.sc import DerivedSeries
from node.outputs.sc.attributes import complete_deidentification, derived_series_laterality
from node.store.fsutil import atomic_output

__all__ = ["GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE", "content_label", "write_presentation_state"]

GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.11.1")

_MAX_LUT_ENTRIES = 1 << 16
#: Type 2 attributes highdicom reads from the first referenced image (empty when absent).
_TYPE2_READ_BY_HIGHDICOM = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                            "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_LO_MAX = 64


def write_presentation_state(
    path: Path,
    images: Sequence[ImageFile],
    voi: Mapping[tuple[int, int], VOIWindow | VOITable],
    rescale: Rescale,
    *,
    derived: DerivedSeries,
    sop_instance_uid: str,
    instance_number: int,
    label: str,
    description: str,
    now: datetime.datetime,
) -> Path:
    """Write the presentation state showing *images* (one size, one polarity) to *path*, atomically.

    Parameters
    ----------
    path : pathlib.Path
        The file to write (its folder is made).
    images : sequence of ImageFile
        The grey source images it references, all of the same Rows/Columns and polarity.
    voi : mapping
        ``(index into images, 0-based frame) -> VOIWindow | VOITable`` for every frame.
    rescale : Rescale
        Its Modality LUT.
    derived : DerivedSeries
        The new series it goes into (UID, number, description).
    sop_instance_uid : str
        Its SOP Instance UID (derived: writing again replaces it).
    instance_number : int
        Its Instance Number in the new series.
    label : str
        Content Label (:func:`content_label`).
    description : str
        Content Description (cut to 64 characters).
    now : datetime.datetime
        Presentation, instance and series creation date/time (injected: output is reproducible).

    Returns
    -------
    pathlib.Path
        *path*.

    Raises
    ------
    ValueError, TypeError, AttributeError
        highdicom refused what it was given.
    OSError
        The file cannot be written.
    """
    references = [_reference(image.header) for image in images]
    shape = (hd.PresentationLUTShapeValues.INVERSE if images[0].is_monochrome1
             else hd.PresentationLUTShapeValues.IDENTITY)
    with warnings.catch_warnings():
        # highdicom's check_person_name warns with the patient's name in the message
        warnings.simplefilter("ignore")
        state = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=references,
            series_instance_uid=derived.series_instance_uid,
            series_number=derived.series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=__version__,
            device_serial_number="",
            content_label=label,
            content_description=_lo(description) or None,
            modality_lut_transformation=hd.ModalityLUTTransformation(
                rescale_intercept=rescale.intercept, rescale_slope=rescale.slope, rescale_type=rescale.type
            ),
            voi_lut_transformations=_voi_items(references, images, voi),
            presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape=shape),
            series_description=derived.series_description or None,
            series_date=now.date(),
            series_time=now.time(),
        )
    _finish(state, images[0].header, now)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as handle:
        pydicom.dcmwrite(handle, state, enforce_file_format=True)
    return path


def _reference(header: Dataset) -> Dataset:
    """A copy of a source header for highdicom: public attributes before Pixel Data, the Type 2
    ones it reads present (empty when the source lacks them).  Deep: highdicom puts the copied
    elements themselves into the presentation state, which is changed afterwards."""
    ref = Dataset()
    for tag in header.keys():
        if tag.is_private or tag.group >= 0x7FE0 or 0x6000 <= tag.group <= 0x60FF:
            continue  # pixel data, overlays (large, never read), private attributes
        ref.add(copy.deepcopy(header[tag]))
    for keyword in _TYPE2_READ_BY_HIGHDICOM:
        if keyword not in ref or ref[keyword].value is None:
            setattr(ref, keyword, "")
    return ref


def _voi_items(
    references: Sequence[Dataset], images: Sequence[ImageFile], voi: Mapping[tuple[int, int], VOIWindow | VOITable]
) -> list[hd.pr.SoftcopyVOILUTTransformation]:
    """One Softcopy VOI LUT item per distinct VOI LUT, referencing the images/frames it applies to."""
    by_voi: dict[VOIWindow | VOITable, list[tuple[int, int]]] = {}
    for unit, item in voi.items():
        by_voi.setdefault(item, []).append(unit)
    if len(by_voi) == 1:
        return [_voi_item(next(iter(by_voi)), None)]
    items = []
    for item, units in by_voi.items():
        frames: dict[int, list[int]] = {}
        for index, frame in units:
            frames.setdefault(index, []).append(frame + 1)
        whole = [i for i, numbers in frames.items() if len(numbers) == images[i].number_of_frames]
        if whole:
            items.append(_voi_item(item, hd.ReferencedImageSequence(referenced_images=[references[i] for i in whole])))
        for index, numbers in frames.items():
            if index not in whole:
                items.append(_voi_item(item, hd.ReferencedImageSequence(
                    referenced_images=[references[index]], referenced_frame_number=numbers)))
    return items


def _voi_item(
    item: VOIWindow | VOITable, referenced: hd.ReferencedImageSequence | None
) -> hd.pr.SoftcopyVOILUTTransformation:
    if isinstance(item, VOIWindow):
        transformation = hd.pr.SoftcopyVOILUTTransformation(
            window_center=item.window.center, window_width=item.window.width, referenced_images=referenced
        )
        if item.explanation:  # not through highdicom: it makes a one-string explanation a list of its letters
            transformation.WindowCenterWidthExplanation = item.explanation
        return transformation
    data = item.entries
    lut = hd.VOILUT(first_mapped_value=max(item.first, 0), lut_data=data, lut_explanation=item.explanation or None)
    if item.first < 0:  # highdicom refuses a negative first value; the standard allows SS
        entries = 0 if len(data) == _MAX_LUT_ENTRIES else len(data)
        lut["LUTDescriptor"] = DataElement(0x00283002, "SS", [entries, item.first, VOITable.BITS])
    return hd.pr.SoftcopyVOILUTTransformation(voi_luts=[lut], referenced_images=referenced)


def _finish(state: Dataset, first: Dataset, now: datetime.datetime) -> None:
    """What highdicom leaves out or stamps with the clock (see the module docstring)."""
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    state.InstanceCreationDate, state.InstanceCreationTime = date, time
    state.PresentationCreationDate, state.PresentationCreationTime = date, time
    for item in state.get("ContributingEquipmentSequence") or []:
        item.ContributionDateTime = f"{date}{time}"
    if first.get("BodyPartExamined"):
        state.BodyPartExamined = first.BodyPartExamined
    laterality = derived_series_laterality(first)
    if laterality is not None:
        state.Laterality = laterality
    complete_deidentification(state)


def content_label(name: str) -> str:
    """Content Label (CS) from a pipeline's name: at most 16 of A-Z 0-9 _, starting with a letter
    and not ending with ``_`` (what highdicom accepts), e.g. ``ct-brain view`` -> ``CT_BRAIN_VIEW``."""
    label = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")
    if not label:
        return "DICOM_NODE"
    if not label[0].isalpha():
        label = f"P_{label}"
    return label[:16].rstrip("_")


def _lo(text: str) -> str:
    """*text* as LO: one line, no backslash, at most 64 characters."""
    return " ".join(text.replace("\\", "/").split())[:_LO_MAX].rstrip()
