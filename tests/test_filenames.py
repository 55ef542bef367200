"""File-name templates of folder destinations (``file_names``): config refusals, naming, collisions,
and a running node delivering to a folder with a template."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.config import FolderDestination
from node.config.file_names import delivered_names
from node.deliver.folder import COMPLETE_MARKER, FolderSender
from node.deliver.senders import sender_for
from node.outputs.png import traceability_text, write_png
from tests.support import (
    HEAD, NodeProcess, error_of, folder_route, free_port, load_text, marked_line, node_config, store_responses,
    storescu, wait_for,
)

PIPELINE = """\
[[pipelines]]
name = "default"
steps = [{ op = "rescale" }]
output = "%s"

"""
ROUTE = """
[[routes]]
match = {}
pipeline = "default"
destinations = ["folder"]
"""


def folder_config(template_line: str, output: str = "sc") -> str:
    """A config whose folder destination has *template_line* (marked with # <-)."""
    return HEAD + PIPELINE % output + f"""\
[[destinations]]
name = "folder"
kind = "folder"
path = "out"
{template_line} # <-
""" + ROUTE


REFUSED = [
    ("unknown-field", 'file_names = "{SeriesNumbr:04}"', "{SeriesNumbr} is not a DICOM keyword"),
    ("patient-id", 'file_names = "{PatientID}_{InstanceNumber}"', "{PatientID} is a patient attribute"),
    ("patient-birth", 'file_names = "{InstanceNumber}_{PatientBirthDate}"', "{PatientBirthDate} is a patient"),
    ("other-ids", 'file_names = "{OtherPatientIDsSequence}"', "patient attribute (group 0010)"),
    ("separator", 'file_names = "{SeriesNumber}/{InstanceNumber}"', "path separator"),
    ("backslash", 'file_names = "{SeriesNumber}\\\\{InstanceNumber}"', "path separator"),
    ("dot-dot", 'file_names = "..{InstanceNumber}"', '".."'),
    ("bad-spec", 'file_names = "{InstanceNumber:zz}"', "bad format spec"),
    ("number-spec-on-text", 'file_names = "{Modality:05d}"', "bad format spec"),
    ("unbalanced", 'file_names = "{InstanceNumber"', "not a valid format template"),
    ("index", 'file_names = "{ImageType[0]}"', "no index or attribute"),
    ("conversion", 'file_names = "{Modality!r}"', "no !conversion"),
    ("sequence", 'file_names = "{ReferencedImageSequence}"', "sequence or binary data (VR SQ)"),
    ("pixels", 'file_names = "{PixelData}"', "sequence or binary data (VR OB or OW)"),
    ("no-field", 'file_names = "image"', "has no field"),
    ("not-a-string", "file_names = 5", "must be a string"),
]


@pytest.mark.parametrize(("line", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_bad_template_is_refused_at_its_line(tmp_path: Path, line: str, message: str) -> None:
    text = folder_config(line)
    error = error_of(tmp_path, text)
    prefix = f'{tmp_path / "node.toml"}:{marked_line(text)}: destinations[1] (name "folder").file_names: '
    assert error.startswith(prefix), f"\n{error}\ndoes not start with\n{prefix}"
    assert message in error


def test_good_template_is_kept_and_absent_means_none(tmp_path: Path) -> None:
    config = load_text(tmp_path, folder_config('file_names = "{SeriesNumber:04}_{InstanceNumber:05}"'))
    destination = config.destinations["folder"]
    assert isinstance(destination, FolderDestination)
    assert destination.file_names == "{SeriesNumber:04}_{InstanceNumber:05}"
    assert sender_for(destination).file_names == "{SeriesNumber:04}_{InstanceNumber:05}"
    config = load_text(tmp_path, folder_config('file_names = "{SmallestImagePixelValue:05}_{StudyDate}"'))
    assert config.destinations["folder"].file_names == "{SmallestImagePixelValue:05}_{StudyDate}"
    config = load_text(tmp_path, folder_config("concurrency = 1"))
    assert config.destinations["folder"].file_names is None


def test_png_route_takes_only_uid_fields(tmp_path: Path) -> None:
    good = folder_config('file_names = "{SeriesInstanceUID}_{SOPInstanceUID}"', output="png")
    assert load_text(tmp_path, good).destinations["folder"].file_names
    text = HEAD + PIPELINE % "png" + """\
[[destinations]]
name = "folder"
kind = "folder"
path = "out"
file_names = "{InstanceNumber:05}"

[[routes]]
match = {}
pipeline = "default"
destinations = ["folder"] # <-
"""
    error = error_of(tmp_path, text)
    assert error.startswith(f'{tmp_path / "node.toml"}:{marked_line(text)}: routes[1].destinations[1]: '), error
    assert "{InstanceNumber}" in error and "PNG" in error


# --------------------------------------------------------------------------- naming at delivery


def ct_files(folder: Path, numbers: list[tuple[int, int]]) -> list[Path]:
    """Copies of pydicom's CT_small.dcm with (SeriesNumber, InstanceNumber) as given."""
    folder.mkdir(parents=True, exist_ok=True)
    source = get_testdata_file("CT_small.dcm", download=False)
    files = []
    for index, (series, instance) in enumerate(numbers):
        ds = pydicom.dcmread(source)
        ds.SeriesNumber, ds.InstanceNumber = series, instance
        path = folder / f"out-{index}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def test_folder_sender_names_files_from_their_headers(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", [(3, 1), (3, 2), (3, 10)])
    root = tmp_path / "out"
    root.mkdir()
    study, series = "1.2.3", "1.2.3.4"
    FolderSender(path=root, file_names="{SeriesNumber:04}_{InstanceNumber:05}").send(
        files, study_uid=study, series_uid=series)
    folder = root / study / series
    assert sorted(p.name for p in folder.iterdir()) == \
        sorted([COMPLETE_MARKER, "0003_00001.dcm", "0003_00002.dcm", "0003_00010.dcm"])
    for source, name in zip(files, ["0003_00001.dcm", "0003_00002.dcm", "0003_00010.dcm"]):
        assert (folder / name).read_bytes() == source.read_bytes()


def test_same_names_get_numbered_in_input_order_and_redelivery_is_stable(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", [(3, 7), (3, 7), (3, 8), (3, 7)])
    names = delivered_names("{InstanceNumber:03}", files)
    assert names == ["007.dcm", "007_2.dcm", "008.dcm", "007_3.dcm"]
    root = tmp_path / "out"
    root.mkdir()
    sender = FolderSender(path=root, file_names="{InstanceNumber:03}")
    for _ in range(2):  # a re-delivery writes the same names, each with the same file's bytes
        sender.send(files, study_uid="1.2", series_uid="1.2.3")
        folder = root / "1.2" / "1.2.3"
        assert sorted(p.name for p in folder.iterdir()) == sorted([COMPLETE_MARKER, *names])
        for source, name in zip(files, names):
            assert (folder / name).read_bytes() == source.read_bytes()


def test_a_rendered_name_never_collides_with_a_numbered_one(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", [(1, 5), (1, 5), (2, 5)])
    # "{SeriesNumber}_5" -> 1_5, 1_5 (-> 1_5_2), 2_5; a template giving "1_5_2" directly is kept apart too
    assert delivered_names("{SeriesNumber}_{InstanceNumber}", files) == ["1_5.dcm", "1_5_2.dcm", "2_5.dcm"]


def test_unsafe_values_are_made_safe_and_missing_fields_keep_the_own_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = ct_files(tmp_path / "in", [(1, 1), (1, 2)])
    ds = pydicom.dcmread(files[0])
    ds.SeriesDescription = "../head: 5/mm*"
    ds.save_as(files[0])
    assert "SeriesDescription" not in pydicom.dcmread(files[1])
    with caplog.at_level(logging.WARNING, logger="node.config.file_names"):
        assert delivered_names("{SeriesDescription}", files) == ["_head_5_mm_.dcm", "out-1.dcm"]
    said = [r.getMessage() for r in caplog.records if r.name == "node.config.file_names"]
    assert said == ["file_names '{SeriesDescription}': 1 of 2 outputs lack a field or a value that fits it: "
                    "they keep their own names"]
    assert delivered_names(None, files) == ["out-0.dcm", "out-1.dcm"]
    assert delivered_names("{Modality}_{SOPInstanceUID}", files[:1]) == \
        [f"CT_{pydicom.dcmread(files[0]).SOPInstanceUID}.dcm"]


def test_png_outputs_are_named_from_their_text_chunks(tmp_path: Path) -> None:
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    image = np.zeros((4, 4), dtype=np.uint8)
    first = write_png(tmp_path / "a.png", image, text=traceability_text(source, pipeline="p", derivation="d"))
    second = write_png(tmp_path / "b.png", image,
                       text=traceability_text(source, pipeline="p", derivation="d", frame=2))
    assert delivered_names("{SOPInstanceUID}", [first, second]) == \
        [f"{source.SOPInstanceUID}.png", f"{source.SOPInstanceUID}_2.png"]


# --------------------------------------------------------------------------- a running node


def test_node_delivers_named_files_to_a_folder(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", [(5, 1), (5, 2), (5, 3)])
    study, series = generate_series(files)
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    route = folder_route(out, file_names="{Modality}_{InstanceNumber:05}")
    with NodeProcess(node_config(tmp_path / "var", port, extra=route), tmp_path, port=port) as node:
        pushed = storescu("127.0.0.1", port, files, called_aet="DICOMNODE", timeout=60)
        assert store_responses(pushed) == ["Success"] * 3, pushed.stderr[-2000:]
        wait_for(lambda: list(out.rglob(COMPLETE_MARKER)), 120, "the series delivered", node.log)
    folders = [marker.parent for marker in out.rglob(COMPLETE_MARKER)]
    assert len(folders) == 1 and folders[0].parent.name == study
    names = sorted(p.name for p in folders[0].iterdir() if p.name != COMPLETE_MARKER)
    modality = pydicom.dcmread(folders[0] / names[0], stop_before_pixels=True).Modality
    assert names == [f"{modality}_00001.dcm", f"{modality}_00002.dcm", f"{modality}_00003.dcm"]
    for name in names:
        header = pydicom.dcmread(folders[0] / name, stop_before_pixels=True)
        assert name == f"{header.Modality}_{int(header.InstanceNumber):05}.dcm"
        assert header.SeriesInstanceUID != series  # a derived series


def generate_series(files: list[Path]) -> tuple[str, str]:
    """Give *files* one new study and series (new SOP UIDs); their study and series UIDs."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path)
    return study, series
