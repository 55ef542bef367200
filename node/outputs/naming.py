"""The UIDs and file names of a pipeline's outputs: one rule, used by the writer and the status page.

A derived series' UID comes from the source Series Instance UID and the pipeline's fingerprint;
each output instance's SOP Instance UID from the source SOP Instance UID and the same
fingerprint (:func:`node.outputs.uids.derived_uid`), so processing the same input again gives
the same names.  A Secondary Capture is ``<SOPUID>.dcm`` (every frame of its source in one
file); a PNG output is ``<SOPUID>.png`` for a single-frame source and ``<SOPUID>_<NNNN>.png``
(the frame number from 1, four digits) for each frame of a multi-frame one.  A presentation state
(``output = "gsps"``) is ``<SOPUID>.dcm`` too, its UID from the source series, the fingerprint and
what its images share (:func:`presentation_state_uid`).  A volume output is
``volume[_<stack>][_part<i>of<n>]`` with ``.nii.gz`` or ``.npz``, and its sidecar the same stem with
``.json`` (:func:`volume_file_stem`).
"""

from __future__ import annotations

from node.outputs.uids import derived_uid

__all__ = ["derived_instance_uid", "derived_series_uid", "output_file_name", "outputs_holding_frame",
           "presentation_state_uid", "volume_file_stem"]


def derived_series_uid(series_uid: str, fingerprint: str) -> str:
    """The Series Instance UID a pipeline (its ``Pipeline.fingerprint()``) derives from *series_uid*."""
    return derived_uid(series_uid, "series", fingerprint)


def derived_instance_uid(source_sop_uid: str, fingerprint: str) -> str:
    """The SOP Instance UID of the output a pipeline (its fingerprint) makes from the instance *source_sop_uid*."""
    return derived_uid(source_sop_uid, "instance", fingerprint)


def presentation_state_uid(series_uid: str, fingerprint: str, key: str) -> str:
    """The SOP Instance UID of the presentation state a pipeline (its fingerprint) makes of the images
    of *series_uid* that share *key* (size and polarity, e.g. ``512x512 MONOCHROME2``)."""
    return derived_uid(series_uid, "presentation state", fingerprint, key)


def output_file_name(sop_uid: str, *, dicom: bool, frame: int | None = None) -> str:
    """The file name of one output.

    Parameters
    ----------
    sop_uid : str
        The output's SOP Instance UID (:func:`derived_instance_uid`).
    dicom : bool
        A Secondary Capture (``.dcm``) rather than a PNG.
    frame : int, optional
        For a PNG of a multi-frame source: the frame number, from 1.  None for a
        single-frame source (and always for a Secondary Capture, which holds every frame).
    """
    if dicom:
        return f"{sop_uid}.dcm"
    return f"{sop_uid}.png" if frame is None else f"{sop_uid}_{frame:04d}.png"


def volume_file_stem(stack: str, part: int, parts: int) -> str:
    """The stem of a volume output and its sidecar: ``volume``, ``volume_te30``, ``volume_part1of2``...

    Parameters
    ----------
    stack : str
        What tells the volume's stack from the series' others ("" for a series of one stack).
    part, parts : int
        The volume's number among the parts its stack was split into (from 1), and how many.
    """
    stem = "volume" + (f"_{stack}" if stack else "")
    return stem + (f"_part{part}of{parts}" if parts > 1 else "")


def outputs_holding_frame(source_sop_uid: str, fingerprint: str, frame: int) -> list[tuple[str, int]]:
    """The names the output showing frame *frame* of a source instance can have, each with its frame in it.

    Parameters
    ----------
    source_sop_uid : str
        The source SOP Instance UID.
    fingerprint : str
        The fingerprint of the pipeline that made the outputs.
    frame : int
        The frame of the source, from 0.

    Returns
    -------
    list of (str, int)
        The Secondary Capture (the same frame inside it), the PNG of that frame of a multi-frame
        source, and the PNG of a single-frame source (each a single picture: frame 0).
    """
    sop_uid = derived_instance_uid(source_sop_uid, fingerprint)
    return [
        (output_file_name(sop_uid, dicom=True), frame),
        (output_file_name(sop_uid, dicom=False, frame=frame + 1), 0),
        (output_file_name(sop_uid, dicom=False), 0),
    ]
