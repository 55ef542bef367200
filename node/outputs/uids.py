"""Deterministic DICOM UIDs for derived objects.

A processing node must be able to re-run on the same input and produce the same
series and instance UIDs (so a re-send replaces rather than duplicates), hence
UIDs are derived from stable inputs (source UIDs, the processing profile, the
frame index, ...) instead of being random.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

__all__ = ["derived_uid"]

# Fixed namespace for the name-based UUIDs below; never change it, or every
# derived UID changes with it.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-node:derived-uid")


def derived_uid(*parts: str) -> str:
    """Return a deterministic UID in the ``2.25`` arc from the given parts.

    The parts are encoded unambiguously (each is length-prefixed, so
    ``("ab", "c")`` and ``("a", "bc")`` give different UIDs), hashed into a
    name-based (SHA-1, version 5) UUID, and the UUID's 128-bit integer is
    appended to ``2.25.`` as ISO/IEC 9834-8 and DICOM PS3.5 B.2 describe.
    The result is at most 44 characters long.

    Parameters
    ----------
    *parts : str
        One or more strings identifying the derived object, e.g. the source
        SOP Instance UID, the processing profile name and the output kind.

    Returns
    -------
    str
        A valid DICOM UID (a :class:`pydicom.uid.UID`, which is a ``str``),
        always the same for the same parts.

    Raises
    ------
    TypeError
        If a part is not a ``str``.
    ValueError
        If no part is given.

    Notes
    -----
    ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` is *not*
    deterministic: with ``prefix=None`` pydicom ignores ``entropy_srcs`` and
    returns a random UUID, which is why the UUID is built here.
    """
    if not parts:
        raise ValueError("derived_uid() needs at least one part")
    for index, part in enumerate(parts):
        if not isinstance(part, str):
            raise TypeError(
                f"derived_uid() part {index} must be str, not {type(part).__name__}"
            )
    name = "".join(f"{len(part)}:{part}," for part in parts)
    # A version-5 UUID has its version bits set, so the integer is never 0 and
    # has no leading zero: the UID is always valid.
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")
