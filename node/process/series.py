"""Finding DICOM images on disk and grouping them into series."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from node.imaging.source import DecodeLimits, ImageFile, UnsupportedImage

__all__ = ["InputSeries", "find_files", "group_series", "instance_order", "open_images"]

log = logging.getLogger(__name__)


@dataclass
class InputSeries:
    """The images of one series, in instance order."""

    study_uid: str
    series_uid: str
    images: list[ImageFile] = field(default_factory=list)

    @property
    def frames(self) -> int:
        """Total number of frames in the series."""
        return sum(image.number_of_frames for image in self.images)


def find_files(inputs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Every file named, and every file below every folder named (sorted, hidden ones skipped).

    Raises
    ------
    FileNotFoundError
        If an input does not exist.
    """
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")


def open_images(
    paths: Iterable[Path], limits: DecodeLimits | None = None
) -> tuple[list[ImageFile], list[UnsupportedImage]]:
    """Open and check every path; the ones that fail come back as errors, not exceptions.

    Parameters
    ----------
    paths : iterable of pathlib.Path
        The files.
    limits : DecodeLimits, optional
        Decoded sizes allowed (default: the :class:`DecodeLimits` defaults); a file above them
        fails with :class:`~node.imaging.source.TooLarge` before anything is decoded.
    """
    images: list[ImageFile] = []
    failures: list[UnsupportedImage] = []
    for path in paths:
        try:
            images.append(ImageFile.open(path, limits))
        except UnsupportedImage as exc:
            failures.append(exc)
    return images, failures


def instance_order(image: ImageFile) -> tuple[int, str]:
    """Sort key: Instance Number (0020,0013), then SOP Instance UID."""
    number = image.header.get("InstanceNumber")
    try:
        position = int(number) if number not in (None, "") else 0
    except (TypeError, ValueError):
        position = 0
    return position, str(image.header.get("SOPInstanceUID", ""))


def group_series(images: Iterable[ImageFile]) -> list[InputSeries]:
    """Group images by Study and Series Instance UID, each series sorted by Instance Number."""
    groups: dict[tuple[str, str], InputSeries] = {}
    for image in images:
        study = str(image.header.get("StudyInstanceUID", ""))
        series = str(image.header.get("SeriesInstanceUID", ""))
        groups.setdefault((study, series), InputSeries(study, series)).images.append(image)
    for group in groups.values():
        group.images.sort(key=instance_order)
    return list(groups.values())
