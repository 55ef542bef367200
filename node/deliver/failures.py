"""How a delivery fails: :class:`DeliveryError`, and which failures are worth a retry.

A failure is *permanent* when retrying cannot help (the peer refuses this data, or the
configuration is wrong: fail the job now) and *transient* when the peer is down, busy or out of
resources (retry later with backoff).  The senders raise :class:`DeliveryError` and never retry;
the delivery lanes (:mod:`node.deliver.lanes`) decide what to do.  Every rule that says which is
which is here; what each sender does with the answer is in its own module.

C-STORE status classification (PS3.4 B.2.3, PS3.7 C):

===================================  ==========================================
status                               outcome
===================================  ==========================================
0x0000, warnings (0x0001, 0x0107,    delivered (warnings are counted and logged)
0x0116, 0xBxxx e.g. 0xB000, 0xB006,
0xB007)
0xA7xx Refused: Out of Resources     transient
no response (timeout, abort)         transient
0xA9xx, 0xCxxx, 0x01xx/0x02xx        permanent
failures, anything else
===================================  ==========================================

HTTP (STOW-RS): 4xx is permanent except 408 (Request Timeout) and 429 (Too Many Requests); 5xx
and no answer at all are transient; a TLS certificate refused is permanent (it stays refused
until someone acts).
"""

from __future__ import annotations

import enum

import requests

__all__ = [
    "DeliveryError",
    "StoreOutcome",
    "classify_http_status",
    "classify_request_error",
    "classify_store_status",
    "hex_status",
]


class DeliveryError(Exception):
    """A delivery failed.

    Parameters
    ----------
    reason : str
        Human-readable cause naming the destination, the file or SOP Instance UID at fault and
        the peer's status (``0xA700``, ``HTTP 503``) if any.
    permanent : bool
        ``True`` when retrying cannot help (fail the job now), ``False`` for a transient
        failure (retry with backoff).
    status : int or None, optional
        The peer's DIMSE status or HTTP status code, when there was one.
    """

    def __init__(self, reason: str, *, permanent: bool, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.status = status

    @property
    def transient(self) -> bool:
        """Whether a later attempt may succeed (the opposite of :attr:`permanent`)."""
        return not self.permanent

    def __repr__(self) -> str:
        kind = "permanent" if self.permanent else "transient"
        return f"DeliveryError({kind}: {self.reason!r})"


class StoreOutcome(enum.StrEnum):
    """What a C-STORE response status means for the delivery (equal to its lower-case name)."""

    OK = "ok"
    WARNING = "warning"  # stored, e.g. 0xB000 coercion of data elements
    TRANSIENT = "transient"
    PERMANENT = "permanent"

    @property
    def stored(self) -> bool:
        """Whether the peer kept the instance."""
        return self in (StoreOutcome.OK, StoreOutcome.WARNING)


def classify_store_status(status: int) -> StoreOutcome:
    """Classify a C-STORE response status (see the module's table).

    Parameters
    ----------
    status : int
        The Status (0000,0900) of the C-STORE response.

    Returns
    -------
    StoreOutcome
        ``OK``, ``WARNING`` (the instance was stored), ``TRANSIENT`` or ``PERMANENT``.
    """
    if status == 0x0000:
        return StoreOutcome.OK
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return StoreOutcome.WARNING
    if 0xA700 <= status <= 0xA7FF:
        return StoreOutcome.TRANSIENT
    return StoreOutcome.PERMANENT


def classify_http_status(code: int) -> bool:
    """Whether an HTTP error status is permanent.

    Parameters
    ----------
    code : int
        The HTTP status code of an error response.

    Returns
    -------
    bool
        ``True`` for 4xx except 408 and 429, ``False`` (transient) for those two and 5xx.
    """
    if code >= 500 or code in (408, 429):
        return False
    return True


_PERMANENT_REQUEST_ERRORS = (
    requests.exceptions.SSLError,  # a certificate refused (untrusted, expired, wrong name)
    requests.exceptions.URLRequired,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidHeader,
)


def classify_request_error(error: requests.exceptions.RequestException) -> bool:
    """Whether an HTTP request that got no usable answer failed for good.

    Parameters
    ----------
    error : requests.exceptions.RequestException
        What requests raised.  An :class:`~requests.exceptions.HTTPError` is classified by its
        response's status (:func:`classify_http_status`).

    Returns
    -------
    bool
        ``True`` (permanent) for a TLS failure or a malformed URL or header; ``False``
        (transient) for no connection, a timeout, a broken answer and anything else.
    """
    if isinstance(error, requests.exceptions.HTTPError) and error.response is not None:
        return classify_http_status(error.response.status_code)
    return isinstance(error, _PERMANENT_REQUEST_ERRORS)


def hex_status(status: int) -> str:
    """A DIMSE status as it is written in PS3.7: ``0xA700``."""
    return f"0x{status:04X}"
