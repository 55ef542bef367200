"""Specific Character Set: names in Cyrillic and Japanese come out of the pipeline unchanged."""

from __future__ import annotations

import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files

from node.imaging.source import ImageFile
from node.config.pipeline import OutputFormat, Pipeline
from node.app.process_series import process_series
from node.process.series import group_series
from tests.support import bundled, dciodvfy_errors

NAMES = [
    ("ISO_IR 144", "Люкceмбypг^Гeнpиx"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("ISO_IR 192", "Łukasz^Żółć=李^小龙"),
    ("ISO_IR 100", "Müller^Jürgen"),
    ("GB18030", "Wang^XiaoDong=王^小东"),
]


@pytest.mark.parametrize("charset,name", NAMES)
def test_patient_name_round_trips(tmp_path: Path, charset, name: str) -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    source = tmp_path / "in.dcm"
    ds.save_as(source)
    (series,) = group_series([ImageFile.open(source)])
    pipeline = Pipeline(name="cs", output=OutputFormat.SC)
    result = process_series(series, pipeline, tmp_path / "out", now=datetime.datetime(2026, 1, 1, 12))
    (output,) = result.outputs
    sc = pydicom.dcmread(output)
    assert str(sc.PatientName) == name
    assert sc.SpecificCharacterSet == ds.SpecificCharacterSet
    errors, report = dciodvfy_errors(output)
    assert not errors, report


def test_pydicom_charset_files_keep_their_names(tmp_path: Path) -> None:
    # pydicom's own character set samples (no pixel data): their names put on a real CT slice.
    samples = {Path(p).name: p for p in get_charset_files("chr*.dcm")}
    for sample in ("chrRuss.dcm", "chrH31.dcm", "chrJapMulti.dcm", "chrX1.dcm", "chrKoreanMulti.dcm", "chrGreek.dcm"):
        names = pydicom.dcmread(samples[sample])
        ds = pydicom.dcmread(bundled("CT_small.dcm"))
        ds.SpecificCharacterSet = names.SpecificCharacterSet
        ds.PatientName = names.PatientName
        source = tmp_path / sample
        ds.save_as(source)
        (series,) = group_series([ImageFile.open(source)])
        result = process_series(series, Pipeline(name="cs"), tmp_path / sample.replace(".", "_"),
                                now=datetime.datetime(2026, 1, 1, 12))
        assert str(pydicom.dcmread(result.outputs[0]).PatientName) == str(names.PatientName), sample
