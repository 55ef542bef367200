"""DICOMweb destinations: STOW-RS (dicomweb-client), in batches.

How HTTP statuses and request failures are classified: :mod:`node.deliver.failures`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import requests
from pydicom.errors import InvalidDicomError

from node.config import DicomWebDestination
from node.deliver.failures import classify_request_error, hex_status
from node.deliver.sender import DeliveryProgress, Sender, check_uid, reject_non_dicom

__all__ = ["DicomWebSender"]

#: How many failed instances a failure message names (the count says how many there were).
_FAILURES_NAMED = 5


class DicomWebSender(Sender):
    """STOW-RS: stores the files of one study with ``POST {url}/studies/{study_uid}``.

    Files are sent in batches of at most ``batch_size`` instances (and roughly
    ``max_batch_bytes`` of files), so a large series is never in memory at once.
    dicomweb-client's own retrying is switched off: the delivery lanes retry.
    The HTTP session ignores the environment (``HTTP(S)_PROXY``, ``NO_PROXY``, netrc), as the
    poller's does: the node talks to the addresses configured and no others.
    """

    kind = DicomWebDestination.kind

    def __init__(
        self,
        *,
        url: str,
        auth: tuple[str, str] | str | None = None,
        timeout: float = 30.0,
        batch_size: int = 20,
        max_batch_bytes: int = 32 * 1024 * 1024,
        ca_file: Path | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.url = url.rstrip("/")
        self.auth = auth
        self.timeout = float(timeout)
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.ca_file = Path(ca_file) if ca_file is not None else None

    @classmethod
    def from_destination(cls, destination: DicomWebDestination) -> DicomWebSender:
        """The sender of a ``kind = "dicomweb"`` destination.

        Its credentials are read from their environment variables here, once, when the node
        starts (a missing variable is a :class:`~node.config.ConfigError` naming it).
        """
        auth = destination.auth.resolve() if destination.auth is not None else None
        return cls(url=destination.url, auth=auth, timeout=destination.timeout_seconds, ca_file=destination.ca_file)

    def describe(self) -> str:
        return f"dicomweb {self.url}"

    def _deliver(self, files: list[Path], study_uid: str, series_uid: str) -> str | None:
        reject_non_dicom(files, self.describe())
        check_uid("study", study_uid)
        if not files:
            return None
        progress = DeliveryProgress(self.describe(), len(files))
        with requests.Session() as session:
            session.trust_env = False  # no proxy or netrc from the environment (see the class notes)
            if self.ca_file is not None:
                session.verify = str(self.ca_file)  # the hospital's CA instead of the system's store
            client = self._client(session)
            for batch in self._batches(files):
                datasets = [self._read(path, study_uid) for path in batch]
                self._store_batch(client, datasets, batch, study_uid)
                progress.sent(len(batch))
                del datasets
        return None

    def _client(self, session: requests.Session):
        from dicomweb_client import DICOMwebClient  # only needed for DICOMweb destinations

        headers = None
        if isinstance(self.auth, tuple):
            session.auth = requests.auth.HTTPBasicAuth(*self.auth)
        elif isinstance(self.auth, str):
            headers = {"Authorization": f"Bearer {self.auth}"}
        try:
            client = DICOMwebClient(self.url, session=session, headers=headers, timeout=self.timeout)
        except ValueError as exc:
            raise self._fail(f"invalid URL: {exc}", permanent=True) from exc
        client.set_http_retry_params(retry=False)
        return client

    def _batches(self, files: list[Path]) -> Iterator[list[Path]]:
        batch: list[Path] = []
        size = 0
        for path in files:
            try:
                file_size = path.stat().st_size
            except OSError as exc:
                raise self._fail(f"{path.name}: cannot read: {exc}", permanent=True) from exc
            if batch and (len(batch) >= self.batch_size or size + file_size > self.max_batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append(path)
            size += file_size
        if batch:
            yield batch

    def _read(self, path: Path, study_uid: str) -> pydicom.Dataset:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError as exc:
            raise self._fail(f"{path.name}: not a DICOM file ({exc})", permanent=True) from exc
        except OSError as exc:
            raise self._fail(f"{path.name}: cannot read: {exc}", permanent=True) from exc
        if not ds.get("SOPInstanceUID"):
            raise self._fail(f"{path.name}: no SOP Instance UID", permanent=True)
        if ds.get("StudyInstanceUID") != study_uid:
            raise self._fail(
                f"{path.name} (SOP Instance {ds.SOPInstanceUID}) belongs to study "
                f"{ds.get('StudyInstanceUID')}, not {study_uid}",
                permanent=True,
            )
        return ds

    def _store_batch(self, client, datasets: list, paths: list[Path], study_uid: str) -> None:
        first = f"{paths[0].name} (SOP Instance {datasets[0].SOPInstanceUID})"
        batch_desc = first if len(paths) == 1 else f"{len(paths)} instances from {first}"
        try:
            result = client.store_instances(datasets, study_instance_uid=study_uid)
        except requests.exceptions.RequestException as exc:
            raise self._request_failure(f"STOW-RS of {batch_desc} failed", exc) from exc
        except ValueError as exc:  # an answer dicomweb-client cannot parse
            raise self._fail(f"STOW-RS of {batch_desc}: unreadable response: {exc}", permanent=False) from exc
        self._check_result(result, datasets, paths, batch_desc)

    def _request_failure(self, what: str, exc: requests.exceptions.RequestException):
        """The DeliveryError of a request that got no usable answer (an HTTP error status included)."""
        response = exc.response if isinstance(exc, requests.exceptions.HTTPError) else None
        permanent = classify_request_error(exc)
        if response is not None:
            detail = _failure_details(response)
            text = f"{what}: HTTP {response.status_code} {response.reason or ''}".rstrip()
            return self._fail(text + (f"; {detail}" if detail else ""), permanent=permanent,
                              status=response.status_code)
        if isinstance(exc, requests.exceptions.HTTPError):
            return self._fail(f"{what}: {exc}", permanent=permanent)
        if isinstance(exc, requests.exceptions.SSLError):
            return self._fail(f"{what}: TLS: {exc}", permanent=permanent)
        return self._fail(f"{what}: {type(exc).__name__}: {exc}", permanent=permanent)

    def _check_result(self, result, datasets: list, paths: list[Path], batch_desc: str) -> None:
        """Refuse an answer that names failed instances, or does not name every instance sent."""
        failed = list(result.get("FailedSOPSequence", None) or [])
        if failed:
            raise self._fail(
                f"STOW-RS of {batch_desc}: {len(failed)} instance(s) failed: {_failures_text(failed)}",
                permanent=True,
                status=_first_reason(failed),
            )
        sent = {str(ds.SOPInstanceUID): path for ds, path in zip(datasets, paths)}
        referenced = {
            str(item.get("ReferencedSOPInstanceUID", ""))
            for item in (result.get("ReferencedSOPSequence", None) or [])
        }
        missing = [uid for uid in sent if uid not in referenced]
        if missing:
            first_missing = f"{sent[missing[0]].name} (SOP Instance {missing[0]})"
            raise self._fail(
                f"STOW-RS answered HTTP 200 but does not reference {len(missing)} of "
                f"{len(sent)} instance(s) sent, first {first_missing}",
                permanent=False,
            )


def _failure_text(item) -> str:
    uid = item.get("ReferencedSOPInstanceUID", "?")
    reason = item.get("FailureReason")
    return f"SOP Instance {uid}: " + (f"failure reason {hex_status(int(reason))}" if reason is not None else "no reason")


def _failures_text(failed: list) -> str:
    """The first failed SOP items, ``; ``-separated, and how many more there are."""
    text = "; ".join(_failure_text(item) for item in failed[:_FAILURES_NAMED])
    more = len(failed) - _FAILURES_NAMED
    return text + (f" (and {more} more)" if more > 0 else "")


def _first_reason(failed: list) -> int | None:
    for item in failed:
        reason = item.get("FailureReason")
        if reason is not None:
            return int(reason)
    return None


def _failure_details(response: requests.Response) -> str:
    """Failed SOP Sequence (if the error body is a DICOM JSON response) or the start of the body."""
    content_type = response.headers.get("Content-Type", "")
    if "json" in content_type:
        try:
            ds = pydicom.Dataset.from_json(response.json())
            failed = list(ds.get("FailedSOPSequence", None) or [])
            if failed:
                return "; ".join(_failure_text(item) for item in failed[:_FAILURES_NAMED])
        except Exception:  # noqa: BLE001 - a body that is not DICOM JSON: show it as text
            pass
    return " ".join(response.text.split())[:200] if response.text else ""
