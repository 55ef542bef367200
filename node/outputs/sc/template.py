"""A derived header encoded once per series, its per-instance elements spliced in for each instance.

Why: pydicom spends tens of microseconds per element to build a data set (setattr, deep
copies) and as much again to encode it, and a derived header has ~70 elements. Profiling a
300-slice 512x512 CT series (scripts/bench/e2e.py, 3.8-5.0 s for process_series on 1 thread)
found secondary_capture_header at ~3.2 ms and pydicom.dcmwrite of its result at ~3.5 ms per
slice: about half the time. Yet the instances of one series differ in a handful of elements
only (those of :func:`node.outputs.sc.header.set_instance_attributes` and two of the File Meta),
so the rest is encoded once and those few are encoded per instance and spliced in between:
~1 ms per slice instead of 5-6 (most of it pydicom encoding the two small sequences), and
process_series of that series takes 2.8-3.0 s.

* :func:`template_key` says what a header is built from besides the per-instance attributes:
  two instances with equal keys have headers equal outside those.
* :func:`header_template` cuts a header's encoding at its per-instance elements.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import pydicom
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from node.outputs.sc.attributes import HEADER_SOURCE_TAGS, source_laterality
from node.outputs.sc.model import DerivedImage
from node.outputs.sc.pixels import PixelLayout

__all__ = ["HeaderTemplate", "TemplateKey", "encoded_header", "header_template", "template_key"]

_META_GROUP_LENGTH_TAG = Tag(0x0002, 0x0000)
_MEDIA_STORAGE_SOP_INSTANCE_UID_TAG = Tag(0x0002, 0x0003)
_PREAMBLE_AND_PREFIX_LENGTH = 128 + 4  # the zero preamble and b"DICM"

# Value types for which equal values (same VR, same character set) encode to the same bytes.
# Not so for DS and IS (their original text is written: "1.0" == "1.00"), PN (its original
# bytes), floats (0.0 == -0.0), arrays (compared approximately) and sequences (items of
# defined or undefined length): the key compares those by their encoded bytes as well.
_PLAIN_VALUE_TYPES = frozenset({str, UID, int, bytes, type(None)})


@dataclass(frozen=True)
class TemplateKey:
    """What a derived header is built from, except the per-instance attributes.

    Compared with ``==`` (never hashed: it holds DataElements). Two instances of a
    :class:`~node.outputs.sc.SecondaryCaptureSeriesWriter` with equal keys have headers that are
    byte-identical outside the per-instance elements; the series and content date/time are the
    writer's.
    """

    layout: PixelLayout
    sop_class_uid: str
    instance_tags: frozenset[BaseTag]
    source_elements: tuple[DataElement, ...]
    encoded_elements: bytes
    laterality: str | None
    transfer_syntax: str | None


@dataclass(frozen=True)
class HeaderTemplate:
    """A derived header's encoding, File Meta included, with holes for its per-instance elements.

    ``pieces`` are the file's bytes up to Pixel Data in order: constant runs (``bytes``) and,
    where an element differs per instance, its tag.
    """

    pieces: tuple[bytes | BaseTag, ...]
    meta_length_without_uid: int  # File Meta group length less the Media Storage SOP Instance UID
    character_set: object  # the header's Specific Character Set value, as pydicom encodes with

    def splice(self, instance: Dataset, sop_instance_uid: str) -> bytes:
        """The header of one instance: its elements of ``instance`` encoded into the holes."""
        encoded = {
            tag: _encoded_element(instance[tag], self.character_set) for tag in instance.keys()
        }
        uid = _encoded_element(
            DataElement(_MEDIA_STORAGE_SOP_INSTANCE_UID_TAG, "UI", sop_instance_uid)
        )
        encoded[_MEDIA_STORAGE_SOP_INSTANCE_UID_TAG] = uid
        encoded[_META_GROUP_LENGTH_TAG] = _encoded_element(
            DataElement(_META_GROUP_LENGTH_TAG, "UL", self.meta_length_without_uid + len(uid))
        )
        return b"".join(
            piece if isinstance(piece, bytes) else encoded[piece] for piece in self.pieces
        )


def encoded_header(header: FileDataset) -> bytes:
    """Preamble, File Meta and data set as :func:`~node.outputs.sc.write_secondary_capture` writes them."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, header, enforce_file_format=True)
    return buffer.getvalue()


def template_key(source: Dataset, image: DerivedImage, instance: Dataset) -> TemplateKey | None:
    """The key of the header built from ``source`` for ``image``; None if it cannot be keyed.

    ``instance`` holds the per-instance attributes (their tags are part of the key).
    """
    tags = sorted(HEADER_SOURCE_TAGS.intersection(source.keys()))
    elements = tuple(source[tag] for tag in tags)
    character_set = source.get("SpecificCharacterSet")
    try:
        encoded = b"".join(
            _encoded_element(element, character_set)
            for element in elements
            if not _equal_means_same_bytes(element.value)
        )
    except Exception:  # noqa: BLE001 - not encodable alone (e.g. an ambiguous VR)
        # No reuse for such a source: secondary_capture_header raises what is really wrong.
        return None
    file_meta = getattr(source, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return TemplateKey(
        image.layout,
        image.sop_class_uid,
        frozenset(instance.keys()),
        elements,
        encoded,
        source_laterality(source),
        None if syntax is None else str(syntax),
    )


def header_template(
    reference: bytes, header: Dataset, instance_tags: frozenset[BaseTag]
) -> HeaderTemplate | None:
    """Cut the encoded ``header`` at its per-instance elements; None if it cannot be cut."""
    spans = _element_spans(reference, _PREAMBLE_AND_PREFIX_LENGTH)
    if spans is None:
        return None
    meta_holes = {_META_GROUP_LENGTH_TAG, _MEDIA_STORAGE_SOP_INSTANCE_UID_TAG}
    holes = instance_tags | meta_holes
    pieces: list[bytes | BaseTag] = []
    run_start = 0
    for tag, begin, end in spans:
        if tag in holes:
            pieces += [reference[run_start:begin], tag]
            run_start = end
    pieces.append(reference[run_start:])
    if sorted(piece for piece in pieces if not isinstance(piece, bytes)) != sorted(holes):
        return None
    meta_length_without_uid = sum(
        end - begin
        for tag, begin, end in spans
        if tag.group == 0x0002 and tag not in meta_holes
    )
    return HeaderTemplate(
        tuple(pieces),
        meta_length_without_uid,
        header.get("SpecificCharacterSet", default_encoding),
    )


def _encoded_element(element: DataElement, character_set: object = None) -> bytes:
    """``element`` as pydicom encodes it in an Explicit VR Little Endian data set."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_data_element(buffer, element, character_set)
    return buffer.getvalue()


def _equal_means_same_bytes(value: object) -> bool:
    if isinstance(value, MultiValue):
        return all(type(item) in _PLAIN_VALUE_TYPES for item in value)
    return type(value) in _PLAIN_VALUE_TYPES


def _element_spans(encoded: bytes, start: int) -> list[tuple[BaseTag, int, int]] | None:
    """(tag, begin, end) of each top-level element of Explicit VR Little Endian ``encoded``.

    None if an element has an undefined length (its end is not in its header; pydicom writes
    that only for elements marked so, which a derived header does not hold) or the bytes do
    not parse.
    """
    spans = []
    position = start
    try:
        while position < len(encoded):
            group, number, vr = struct.unpack_from("<HH2s", encoded, position)
            if vr.decode("ascii") in EXPLICIT_VR_LENGTH_32:
                (length,) = struct.unpack_from("<I", encoded, position + 8)
                end = position + 12 + length
                if length == 0xFFFFFFFF:
                    return None
            else:
                (length,) = struct.unpack_from("<H", encoded, position + 6)
                end = position + 8 + length
            spans.append((Tag(group, number), position, end))
            position = end
    except (struct.error, UnicodeDecodeError):
        return None
    return spans if position == len(encoded) else None
