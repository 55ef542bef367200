"""Argument checks of the Secondary Capture writer: a TypeError or ValueError naming the argument."""

from __future__ import annotations

import numpy as np
from pydicom.uid import RE_VALID_UID

__all__ = ["check_int", "check_is", "check_text", "check_type", "check_uid"]


def check_type(name: str, value: object, types: type | tuple[type, ...]) -> None:
    """Raise TypeError unless *value* is one of *types*."""
    if not isinstance(value, types):
        expected = (
            types.__name__
            if isinstance(types, type)
            else " or ".join(t.__name__ for t in types)
        )
        raise TypeError(f"{name} must be {expected}, not {type(value).__name__}")


def check_int(name: str, value: object) -> None:
    """Raise TypeError unless *value* is an integer (a Python or numpy one; never a bool)."""
    # bool is an int subclass; True rows is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")


def check_uid(name: str, value: object) -> None:
    """Raise TypeError unless *value* is a str, ValueError unless it is a valid DICOM UID."""
    check_type(name, value, str)
    # Not UID(value).is_valid: constructing a UID warns (or raises) when invalid.
    if len(value) > 64 or not RE_VALID_UID.match(value):
        raise ValueError(f"{name} is not a valid DICOM UID: {value!r}")


def check_is(name: str, value: object) -> None:
    """Raise unless *value* is an integer an IS (signed 32-bit) can hold."""
    check_int(name, value)
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{name} must fit a signed 32-bit integer (IS), got {value}")


def check_text(name: str, value: object, max_length: int, *, free_text: bool = False) -> None:
    """Raise unless *value* is LO-like text (one line, no backslash) of at most *max_length*; ST if *free_text*."""
    check_type(name, value, str)
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
