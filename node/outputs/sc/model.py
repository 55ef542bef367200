"""What a derived Secondary Capture is made from: its sources, its series, and the image itself.

Each is a frozen dataclass that checks its values when it is made (TypeError for a wrong type,
ValueError for a value its DICOM attribute cannot hold), so a header is never half built from a
bad one.  The checks that need the source data set as well are the header's
(:func:`node.outputs.sc.header.check_source`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.uid import UID

from node.outputs.sc.checks import check_int, check_is, check_text, check_type, check_uid
from node.outputs.sc.pixels import PixelLayout

__all__ = [
    "MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE",
    "MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE",
    "MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE",
    "SECONDARY_CAPTURE_IMAGE_STORAGE",
    "DerivedImage",
    "DerivedSeries",
    "SourceImage",
]

SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.2")
MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.3")
MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.4")

# (samples per pixel, bits allocated) -> multi-frame SOP class.
_MULTIFRAME_SOP_CLASSES = {
    (1, 8): MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE,
    (1, 16): MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE,
    (3, 8): MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE,
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
        ``source`` data set given to :func:`~node.outputs.sc.secondary_capture_header`.
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
        check_uid("SourceImage.sop_class_uid", self.sop_class_uid)
        check_uid("SourceImage.sop_instance_uid", self.sop_instance_uid)
        if self.series_instance_uid is not None:
            check_uid("SourceImage.series_instance_uid", self.series_instance_uid)


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
        check_uid("DerivedSeries.series_instance_uid", self.series_instance_uid)
        check_is("DerivedSeries.series_number", self.series_number)
        check_text("DerivedSeries.series_description", self.series_description, 64)
        check_text(
            "DerivedSeries.derivation_description",
            self.derivation_description,
            1024,
            free_text=True,
        )


@dataclass(frozen=True, kw_only=True)
class DerivedImage:
    """One derived Secondary Capture instance: its frames' size and format, its identity, its sources.

    Parameters
    ----------
    rows, columns : int
        Size of each frame, 1..65535.
    number_of_frames : int
        Number of frames, at least 1.
    samples_per_pixel : int
        1 for grey (MONOCHROME2), 3 for RGB.
    bits_allocated : int
        8 or 16 for grey, 8 for RGB.
    sop_instance_uid : str
        SOP Instance UID of the new instance (see :func:`node.outputs.uids.derived_uid`).
    instance_number : int
        Instance Number within the new series (IS).
    source_images : Sequence[SourceImage]
        The instances the image was derived from, at least one, all in the source's study
        (kept as a tuple).
    multi_frame : bool or None, optional
        ``None`` (default): multi-frame SOP class when ``number_of_frames`` > 1. ``True``
        forces a multi-frame SOP class even for one frame; ``False`` forces Secondary Capture
        Image Storage (one frame only).

    Raises
    ------
    TypeError
        If a field has the wrong type.
    ValueError
        If a value is out of range, the combination of samples per pixel and bits allocated
        has no SC SOP class (e.g. 16-bit RGB), there is no source image, or Pixel Data would
        exceed 2**32 - 2 bytes.
    """

    rows: int
    columns: int
    number_of_frames: int
    samples_per_pixel: int
    bits_allocated: int
    sop_instance_uid: str
    instance_number: int
    source_images: Sequence[SourceImage]
    multi_frame: bool | None = None

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("rows", "columns", "number_of_frames", "samples_per_pixel", "bits_allocated"):
            object.__setattr__(self, name, int(getattr(self, name)))  # a numpy integer as well
        object.__setattr__(self, "source_images", tuple(self.source_images))
        for name, value in (("rows", self.rows), ("columns", self.columns)):
            if not 1 <= value <= 65535:
                raise ValueError(f"{name} must be 1..65535, got {value}")
        if self.number_of_frames < 1:
            raise ValueError(f"number_of_frames must be at least 1, got {self.number_of_frames}")
        _sop_class(self.number_of_frames, self.samples_per_pixel, self.bits_allocated, self.multi_frame)
        self.layout.check_length()
        if not self.source_images:
            raise ValueError("source_images must name at least one source instance")

    def _check_types(self) -> None:
        for name in ("rows", "columns", "number_of_frames", "samples_per_pixel", "bits_allocated"):
            check_int(name, getattr(self, name))
        check_uid("sop_instance_uid", self.sop_instance_uid)
        check_is("instance_number", self.instance_number)
        if isinstance(self.source_images, str | bytes) or not isinstance(self.source_images, Sequence):
            raise TypeError(
                "source_images must be a sequence of SourceImage, "
                f"not {type(self.source_images).__name__}"
            )
        for index, image in enumerate(self.source_images):
            check_type(f"source_images[{index}]", image, SourceImage)
        if self.multi_frame is not None:
            check_type("multi_frame", self.multi_frame, bool)

    @property
    def sop_class_uid(self) -> UID:
        """The Secondary Capture SOP class this image is stored as (see the package's table)."""
        return _sop_class(self.number_of_frames, self.samples_per_pixel, self.bits_allocated, self.multi_frame)

    @property
    def is_multi_frame(self) -> bool:
        """Whether the SOP class is one of the multi-frame ones (Number of Frames written)."""
        return self.sop_class_uid != SECONDARY_CAPTURE_IMAGE_STORAGE

    @property
    def layout(self) -> PixelLayout:
        """How its frames are stored (all allocated bits stored)."""
        return PixelLayout(
            self.rows, self.columns, self.samples_per_pixel, self.bits_allocated, self.bits_allocated,
            self.number_of_frames,
        )


def _sop_class(number_of_frames: int, samples_per_pixel: int, bits_allocated: int, multi_frame: bool | None) -> UID:
    """The SC SOP class of an image, or ValueError for a combination no SC SOP class holds."""
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
        return _MULTIFRAME_SOP_CLASSES[(samples_per_pixel, bits_allocated)]
    return SECONDARY_CAPTURE_IMAGE_STORAGE
