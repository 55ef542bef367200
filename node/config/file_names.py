"""File-name templates of folder destinations (``file_names``).

A template is a Python :meth:`str.format` string whose fields are DICOM keywords of the output's
header, e.g. ``{SeriesNumber:04}_{InstanceNumber:05}``; the node adds the extension. Patient
attributes (group 0x0010) are refused: a file name travels further than the file.
A PNG output has no DICOM header: its fields come from the PNG's text chunks
(:func:`node.outputs.png.traceability_text`), so only :data:`PNG_FIELDS` are known for it.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

__all__ = ["PNG_FIELDS", "template_fields", "template_problem", "delivered_names"]

log = logging.getLogger(__name__)

PNG_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
"""The fields a PNG output can fill: its source's UIDs (text chunks ``Source<keyword>``)."""

_MAX_STEM = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_NOT_TEXT_VRS = ("SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN")
_SAMPLE_BY_VR = {"IS": 1, "US": 1, "UL": 1, "SS": 1, "SL": 1, "UV": 1, "SV": 1,
                 "DS": 1.0, "FL": 1.0, "FD": 1.0}


def template_fields(template: str) -> list[str]:
    """The field names of *template* in order (may raise ValueError for a malformed template)."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def template_problem(template: str) -> str | None:
    """Why *template* cannot name files, or None if it can.

    Parameters
    ----------
    template : str
        A ``file_names`` template.

    Returns
    -------
    str or None
        The reason (naming the field at fault), or None.
    """
    if not template.strip():
        return "must be a non-empty template such as \"{SeriesNumber:04}_{InstanceNumber:05}\""
    if "/" in template or "\\" in template or ".." in template or "\0" in template:
        return "must not contain a path separator (/ or \\) or \"..\": it names a file in the series folder"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"is not a valid format template: {exc}"
    values = {}
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field or not field.isidentifier():
            return f"field {{{field}}} must be a DICOM keyword such as SeriesNumber (no index or attribute)"
        if conversion is not None or (spec and "{" in spec):
            return f"field {{{field}}}: only a format spec (e.g. {{{field}:05}}) is allowed, no !conversion " \
                   "or nested field"
        tag = tag_for_keyword(field)
        if tag is None:
            return f"field {{{field}}} is not a DICOM keyword"
        if tag >> 16 == 0x0010:
            return f"field {{{field}}} is a patient attribute (group 0010): file names must not identify " \
                   "the patient"
        vr = dictionary_VR(tag)  # "US or SS" for some
        if any(choice in _NOT_TEXT_VRS for choice in vr.split(" or ")):
            return f"field {{{field}}} is a sequence or binary data (VR {vr}): it cannot name a file"
        values[field] = _SAMPLE_BY_VR.get(vr.split(" or ")[0], "X")
    if not values:
        return "has no field: every output would get the same name (use e.g. {InstanceNumber:05})"
    try:
        template.format(**values)
    except (ValueError, TypeError) as exc:
        return f"has a bad format spec: {exc}"
    return None


def _dicom_values(file: Path, fields: Sequence[str]) -> dict[str, object] | None:
    try:
        header = dcmread(file, stop_before_pixels=True, specific_tags=list(fields))
    except (InvalidDicomError, OSError, ValueError):
        return None
    values: dict[str, object] = {}
    for field in fields:
        value = header.get(field)
        if value is None or value == "":
            return None
        values[field] = "-".join(str(v) for v in value) if isinstance(value, MultiValue) else value
    return values


def _png_values(file: Path, fields: Sequence[str]) -> dict[str, object] | None:
    try:
        with Image.open(file) as picture:
            text = dict(getattr(picture, "text", {}) or {})
    except (OSError, ValueError, SyntaxError):
        return None
    values: dict[str, object] = {}
    for field in fields:
        value = text.get(f"Source{field}") if field in PNG_FIELDS else None
        if not value:
            return None
        values[field] = value
    return values


def _safe_stem(text: str) -> str:
    return _UNSAFE.sub("_", text).lstrip(".")[:_MAX_STEM]


def _rendered_stem(template: str, file: Path) -> str | None:
    fields = template_fields(template)
    is_png = file.suffix.lower() == ".png"
    values = _png_values(file, fields) if is_png else _dicom_values(file, fields)
    if values is None:
        return None
    try:
        stem = _safe_stem(template.format(**values))
    except (ValueError, TypeError):
        return None
    return stem or None


def delivered_names(template: str | None, files: Sequence[Path]) -> list[str]:
    """The names *files* get in the series folder, in their order, all distinct.

    Parameters
    ----------
    template : str or None
        A checked ``file_names`` template, or None to keep each file's own name.
    files : sequence of pathlib.Path
        The outputs of one delivery, in input order.

    Returns
    -------
    list of str
        One name per file. With a template: the filled-in template made safe (characters other
        than letters, digits, ``. _ + -`` become ``_``) plus the file's extension; a file missing a
        field or whose value does not fit the format keeps its own name. A name already given
        gets ``_2``, ``_3``... in input order, so a re-delivery of the same outputs gives the same names.
    """
    if template is None:
        return [file.name for file in files]
    taken: set[str] = set()
    names = []
    unnamed = 0
    for file in files:
        stem = _rendered_stem(template, file)
        if stem is None:
            unnamed += 1
            base, suffix = file.stem, file.suffix
        else:
            base, suffix = stem, ".png" if file.suffix.lower() == ".png" else ".dcm"
        name, number = base + suffix, 1
        while name in taken:
            number += 1
            name = f"{base}_{number}{suffix}"
        taken.add(name)
        names.append(name)
    if unnamed:  # said once per delivery, not per file
        log.warning("file_names %r: %d of %d outputs lack a field or a value that fits it: they keep their "
                    "own names", template, unnamed, len(files))
    return names
