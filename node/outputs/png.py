"""PNG output: 8-bit or 16-bit grey, 8-bit RGB; written atomically, with where it came from.

A PNG has no place for DICOM attributes, so each one carries text chunks (``tEXt``; ``iTXt``
for text outside Latin-1) that trace it back: the source's Study, Series and SOP Instance UIDs,
the frame, the pipeline and what it did (:func:`traceability_text`). Nothing that identifies
the patient (name, ID, birth date) is written: a PNG travels further than a DICOM file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.dataset import Dataset
from pydicom.uid import RE_VALID_UID

from node import SOFTWARE
from node.store.fsutil import atomic_output

__all__ = ["traceability_text", "write_png"]

# PNG keywords (ISO/IEC 15948 11.3.4.3): 1-79 printable Latin-1 characters, no leading,
# trailing or consecutive spaces.
_KEYWORD = re.compile(r"^(?! )(?!.*  )(?!.* $)[\x20-\x7e\xa1-\xff]{1,79}$")

# The source UIDs written, under the keyword "Source" + the DICOM keyword.
_SOURCE_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def traceability_text(
    source: Dataset, *, pipeline: str, derivation: str, frame: int | None = None
) -> dict[str, str]:
    """The text chunks that trace a PNG back to its source and to what was done.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source image's data set (its pixels need not be loaded).
    pipeline : str
        The pipeline's name.
    derivation : str
        What the pipeline did (:meth:`node.config.pipeline.Pipeline.describe`).
    frame : int or None, optional
        The source frame (1-based) of a multi-frame source; None for a single frame.

    Returns
    -------
    dict of str to str
        ``Software``, ``SourceStudyInstanceUID``, ``SourceSeriesInstanceUID``,
        ``SourceSOPInstanceUID`` (each only if the source has a valid one),
        ``SourceFrameNumber`` (multi-frame only), ``Pipeline`` and ``DerivationDescription``.
        Never the patient's name, ID or any other patient attribute.
    """
    text = {"Software": SOFTWARE}
    for keyword in _SOURCE_UID_KEYWORDS:
        uid = str(source.get(keyword) or "")
        if len(uid) <= 64 and RE_VALID_UID.match(uid):
            text[f"Source{keyword}"] = uid
    if frame is not None:
        text["SourceFrameNumber"] = str(frame)
    text["Pipeline"] = pipeline
    text["DerivationDescription"] = derivation
    return text


def _png_info(text: Mapping[str, str]) -> PngInfo:
    info = PngInfo()
    for keyword, value in text.items():
        if not isinstance(keyword, str) or not _KEYWORD.match(keyword):
            raise ValueError(
                f"PNG text keyword {keyword!r} must be 1-79 printable Latin-1 characters "
                "without leading, trailing or double spaces"
            )
        if not isinstance(value, str):
            raise ValueError(f"PNG text {keyword!r} must be str, not {type(value).__name__}")
        info.add_text(keyword, value)  # tEXt if Latin-1, else iTXt (UTF-8)
    return info


def write_png(
    path: str | os.PathLike, image: np.ndarray, text: Mapping[str, str] | None = None
) -> Path:
    """Write one rendered frame as PNG.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; replaced atomically if it exists.
    image : numpy.ndarray
        (rows, cols) ``uint8`` or ``uint16`` grey, or (rows, cols, 3) ``uint8`` RGB.
    text : mapping of str to str, optional
        Text chunks to write (keyword -> text), e.g. from :func:`traceability_text`.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        For any other shape or dtype, or a text keyword PNG does not allow.
    """
    grey = image.ndim == 2 and image.dtype in (np.uint8, np.uint16)
    rgb = image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    if not (grey or rgb):
        raise ValueError(f"PNG takes uint8/uint16 grey or uint8 RGB, got {image.dtype} {image.shape}")
    info = _png_info(text or {})
    picture = Image.fromarray(image)  # L, I;16 or RGB from the dtype and shape
    path = Path(path)
    with atomic_output(path) as handle:
        # zlib level 1: about 4x faster than Pillow's default (6) for files ~18% larger, which
        # matters more for a 1,000-frame cine than the bytes do
        picture.save(handle, format="PNG", compress_level=1, pnginfo=info)
    return path
