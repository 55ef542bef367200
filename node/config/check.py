"""The rules of the values of the configuration file, each with its refusal in words.

A rule is pydantic metadata on a field of a settings class (:mod:`node.config.model`)::

    port: Annotated[int, Whole(1, 65535)]

pydantic runs the rule instead of its own conversion, so ``"8080"`` is refused as a text rather
than read as a number, and every refusal says what the key takes, in the words the node has always
used (pydantic's own, "Input should be a valid integer", say less). A rule refuses with
:func:`refuse`: a :class:`~pydantic_core.PydanticCustomError` of type ``"config"`` whose context holds
the message and ``at``, the keys below the value when the refusal concerns a part of it (an item of
a list, a keyword of a ``match``). :mod:`node.config.load` places pydantic's ``loc`` plus ``at`` at
its line.

The rules see values as TOML gives them; the validation context (:class:`FileContext`, given by the
loader) holds the file: relative paths resolve against its folder, named files must exist there,
routes must name the pipelines and destinations it defines.

Every table of the file is a :class:`Table`: keys it does not know are refused with a "did you mean"
hint and the list of the keys it takes, before any value is looked at. Tables told apart by a
``kind`` key (destinations, sources, ``auth``) are :class:`Kinds`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, NoReturn
from urllib.parse import urlsplit

from pydantic import ValidationInfo, model_validator
from pydantic_core import PydanticCustomError, core_schema
from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

from node.config.file_names import template_problem
from node.config.lines import Locator, show

__all__ = [
    "AE_TITLE", "AE_TITLES", "ENV_NAME", "EXISTING_FILE", "FLAG", "FOLDER", "HTTP_URL", "ITEM_NAME", "TEXT",
    "TIME_SPANS", "Accepts", "Built", "Cron", "FileContext", "FileNames", "HttpsCaFile", "Kinds", "MatchPatterns",
    "OneOf", "QueryValues", "Reference", "References", "Refusal", "Steps", "Table", "TablesArray",
    "TimeSpan", "UniqueNames", "Whole", "internal", "refuse",
]


# --------------------------------------------------------------------------- refusing


def refuse(message: str, *at: str | int) -> NoReturn:
    """Refuse the value being validated (or the part of it at the keys *at*) with *message*."""
    raise PydanticCustomError("config", "{message}", {"message": message, "at": at})


class Refusal(ValueError):
    """A refusal made outside a rule (checks across tables, of this machine), with its key path."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


@dataclass(frozen=True)
class FileContext:
    """What the rules know of the file being loaded (pydantic's validation context, key ``"file"``).

    Attributes
    ----------
    base : Path
        The folder relative paths resolve against.
    locator : Locator
        The file's lines and parsed data (names defined, lines of other keys).
    """

    base: Path
    locator: Locator


def file_context(info: ValidationInfo) -> FileContext:
    """The file being validated (the loader gives it as the validation context)."""
    return info.context["file"]  # type: ignore[index]


def is_int(value: Any) -> bool:
    """A whole number, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- rules


def _optional(source: Any) -> bool:
    return typing.get_origin(source) in (typing.Union, types.UnionType) and type(None) in typing.get_args(source)


class Rule:
    """A check of one value that pydantic runs in place of its own (``None`` passes an optional field)."""

    def check(self, value: Any, info: ValidationInfo) -> Any:
        """The value as the model holds it; refuse (:func:`refuse`) what the key does not take."""
        raise NotImplementedError

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        schema = core_schema.with_info_plain_validator_function(self.check)
        return core_schema.nullable_schema(schema) if _optional(source) else schema


@dataclass(frozen=True)
class Whole(Rule):
    """A whole number from *low* (to *high*); *note* says what a special value means."""

    low: int
    high: int | None = None
    note: str = ""

    def check(self, value: Any, info: ValidationInfo) -> int:
        if not is_int(value) or value < self.low or (self.high is not None and value > self.high):
            span = f"{self.low}-{self.high}" if self.high is not None else f">= {self.low}"
            refuse(f"must be a whole number {span}{self.note}, got {show(value)}")
        return value


@dataclass(frozen=True)
class TimeSpan(Rule):
    """The values a time setting accepts, and why no others (said in the refusal)."""

    low: float
    high: float
    unit: str  # "seconds" or "hours"
    why: str
    zero: str = ""  # what 0 means, when 0 is accepted besides low-high
    low_text: str = ""  # low as written in the message, when {low:g} would not say it well

    def accepts(self, value: Any) -> bool:
        """Whether *value* is in the span (or 0 where 0 means something)."""
        return is_number(value) and (self.low <= value <= self.high or (bool(self.zero) and value == 0))

    def check(self, value: Any, info: ValidationInfo) -> float:
        if not self.accepts(value):
            span = f"a number of {self.unit} from {self.low_text or f'{self.low:g}'} to {self.high:g}"
            zero = f"0 ({self.zero}) or " if self.zero else ""
            refuse(f"must be {zero}{span} ({self.why}), got {show(value)}")
        return float(value)


_CLEAN_UP = "the clean-up runs at most once a second; over 10 years (87600): use 0"

TIME_SPANS = {
    "settle_seconds": TimeSpan(
        0.1, 86400, "seconds", "under 0.1 s a series is split wherever its sender pauses, and the idle node "
        "spends its CPU looking for quiet series; over a day (86400) a finished series waits that long"),
    "study_settle_seconds": TimeSpan(
        0.1, 86400, "seconds", "under 0.1 s a study is split wherever its sender pauses; over a day (86400) "
        "a finished study waits that long"),
    "force_complete_seconds": TimeSpan(
        1, 604800, "seconds", "under 1 s series are processed in pieces while they arrive; over a week "
        "(604800) a series that never goes quiet waits that long"),
    "retention_hours": TimeSpan(1 / 3600, 87600, "hours", _CLEAN_UP, zero="keep for ever",
                                low_text="0.000278 (1 s)"),
    "failed_retention_hours": TimeSpan(1 / 3600, 87600, "hours", _CLEAN_UP, zero="keep for ever",
                                       low_text="0.000278 (1 s)"),
    "backoff_seconds": TimeSpan(
        0.1, 3600, "seconds", "under 0.1 s a failing destination is retried in a tight loop; over an hour "
        "(3600) the first retry comes too late"),
    "max_backoff_seconds": TimeSpan(
        0.1, 86400, "seconds", "under 0.1 s a failing destination is retried in a tight loop; over a day "
        "(86400) a destination that is back waits that long"),
    "timeout_seconds": TimeSpan(
        1, 3600, "seconds", "under 1 s requests to a working server time out; over an hour (3600) a server "
        "that hangs holds a sender that long"),
    "every_seconds": TimeSpan(
        1, 604800, "seconds", "more often than every second floods the archive with queries; for less often "
        "than weekly (604800) use cron"),
    "lookback_hours": TimeSpan(
        1, 876000, "hours", "the query matches StudyDate in whole days, so less than 1 looks back no less; "
        "over 100 years (876000) is no date at all"),
    "late_arrival_hours": TimeSpan(
        0, 87600, "hours", "over 10 years (87600) every poll asks the archive for a decade of studies"),
    "stalled_seconds": TimeSpan(
        1, 3600, "seconds", "under 1 s a busy worker is taken for dead; over an hour (3600) the jobs of a dead "
        "worker wait that long"),
    "processing_timeout_seconds": TimeSpan(
        1, 604800, "seconds", "under 1 s no series finishes; over a week (604800) a stuck worker is never "
        "noticed"),
    "association_timeout_seconds": TimeSpan(
        1, 300, "seconds", "under 1 s a sender on a slow or lossy network is cut off while it negotiates; "
        "over 300 s a silent connection holds its place that long"),
}
"""Every time setting of the file, by key (``timeout_seconds``: of destinations and sources alike)."""


@dataclass(frozen=True)
class Accepts(Rule):
    """A value *test* accepts; another is refused as ``{wanted}, got {value}``."""

    test: Callable[[Any], bool]
    wanted: str

    def check(self, value: Any, info: ValidationInfo) -> Any:
        if not self.test(value):
            refuse(f"{self.wanted}, got {show(value)}")
        return value


def ae_problem(value: Any) -> str | None:
    """Why *value* is not an AE title (PS3.5 AE: 16 characters, no backslash or controls), or None."""
    if not isinstance(value, str):
        return f"must be a string, got {show(value)}"
    if not value:
        return "must not be empty"
    if len(value) > 16:
        return f"must be at most 16 characters, got {len(value)}: {show(value)}"
    if not value.strip(" "):
        return "must not be all spaces"
    if "\\" in value:
        return f"must not contain a backslash, got {show(value)}"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"must not contain control characters, got {show(value)}"
    if not value.isascii():
        return f"must be ASCII, got {show(value)}"
    return None


class _AeTitle(Rule):
    """An AE title, without its padding spaces."""

    def check(self, value: Any, info: ValidationInfo) -> str:
        problem = ae_problem(value)
        if problem:
            refuse(f"not a valid AE title: {problem}")
        return value.strip(" ")


class _AeTitles(Rule):
    """A list of AE titles, each without its padding spaces."""

    def check(self, value: Any, info: ValidationInfo) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            refuse(f"must be a list of AE titles, got {show(value)}")
        for index, title in enumerate(value):
            problem = ae_problem(title)
            if problem:
                refuse(f"not a valid AE title: {problem}", index)
        return tuple(title.strip(" ") for title in value)


@dataclass(frozen=True)
class _Location(Rule):
    """A path: ``~`` expanded, relative to the file's folder; with *existing*, a file that is there."""

    existing: bool = False

    def check(self, value: Any, info: ValidationInfo) -> Path:
        path = Path(TEXT.check(value, info)).expanduser()
        path = path if path.is_absolute() else file_context(info).base / path
        if self.existing and not path.is_file():
            refuse(f"no such file: {path}")
        return path


@dataclass(frozen=True)
class HttpsCaFile(_Location):
    """The ``ca_file`` of an ``https://`` URL (the table's ``url``, checked before it)."""

    existing: bool = True

    def check(self, value: Any, info: ValidationInfo) -> Path:
        url = info.data.get("url")
        if isinstance(url, str) and urlsplit(url).scheme != "https":
            refuse("is for https:// URLs")
        return super().check(value, info)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class OneOf(Rule):
    """One of the values of *choices* (an Enum, its strings in the file); *said*: the refusal's words."""

    choices: type[Enum]
    said: str = ""
    quoted: bool = False

    def check(self, value: Any, info: ValidationInfo) -> Enum:
        try:
            return self.choices(value)
        except (ValueError, TypeError):
            values = [repr(c.value) if self.quoted else c.value for c in self.choices]
            refuse(f"{self.said or 'must be one of ' + ', '.join(values)}, got {show(value)}")


class _HttpUrl(Rule):
    """An ``http://`` or ``https://`` service root with a host (no credentials, no query)."""

    def check(self, value: Any, info: ValidationInfo) -> str:
        url = TEXT.check(value, info)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            refuse(f"must be an http:// or https:// URL, got {show(url)}")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            refuse(f"the port must be a whole number 1-65535, got {show(url)}")
        if parts.username is not None or parts.password is not None:
            refuse("must not hold a user name or password (they would be in logs): use auth")
        if parts.query or parts.fragment:
            refuse(f"must be the service root, without ?query or #fragment (the paths of the requests are "
                   f"appended to it), got {show(url)}")
        return url


class Cron(Rule):
    """A crontab schedule (5 fields) the scheduler (APScheduler 3) reads as crontab does."""

    def check(self, value: Any, info: ValidationInfo) -> str:
        from apscheduler.triggers.cron import CronTrigger  # only for files that poll on a schedule

        cron = TEXT.check(value, info)
        fields = cron.split()
        if len(fields) == 5 and any(re.search(r"\d", item.split("/")[0]) for item in fields[4].split(",")):
            refuse(f"{show(cron)}: write the weekday as a name (sun, mon, ... sat), not a number: crontab "
                   "counts Sunday as 0, the scheduler (APScheduler 3) counts Monday as 0")
        try:
            CronTrigger.from_crontab(cron)
        except (ValueError, TypeError, KeyError) as exc:
            refuse(f"not a valid crontab expression (minute hour day month weekday): {show(cron)}: {exc}")
        return cron


class FileNames(Rule):
    """A ``file_names`` template of a folder destination (:mod:`node.config.file_names`)."""

    def check(self, value: Any, info: ValidationInfo) -> str:
        if not isinstance(value, str):
            refuse(f"must be a string, got {show(value)}")
        problem = template_problem(value)
        if problem is not None:
            refuse(problem)
        return value


_UNMATCHABLE_VRS = {"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def _known_keyword(keyword: str) -> None:
    """Refuse (at the keyword) what is not a DICOM keyword, with the nearest one as a hint."""
    if tag_for_keyword(keyword) is None:
        hint = difflib.get_close_matches(keyword, keyword_dict, n=1)
        did = f"; did you mean {hint[0]!r}?" if hint else ""
        refuse(f"{show(keyword)} is not a DICOM keyword{did}", keyword)


def _text_valued(keyword: str, verb: str) -> None:
    """Refuse (at the keyword) an attribute whose VR has no text to *verb* on (sequences, bytes)."""
    vr = dictionary_VR(tag_for_keyword(keyword))
    if vr in _UNMATCHABLE_VRS:
        refuse(f"cannot {verb} on {keyword}: its VR {vr} has no text value", keyword)


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        refuse(f"must be a table, got {show(value)}")
    return value


class MatchPatterns(Rule):
    """A route's ``match``: DICOM keywords to a glob pattern (text or whole number) or a list of them."""

    def check(self, value: Any, info: ValidationInfo) -> tuple[tuple[str, tuple[str, ...]], ...]:
        out = []
        for keyword, patterns in _table(value).items():
            _known_keyword(keyword)
            _text_valued(keyword, "match")
            if isinstance(patterns, list) and not patterns:
                refuse("an empty list matches nothing; give a pattern or a list of them", keyword)
            items = patterns if isinstance(patterns, list) else [patterns]
            texts = []
            for n, item in enumerate(items):
                if not isinstance(item, str) and not is_int(item):
                    at = (keyword, n) if isinstance(patterns, list) else (keyword,)
                    refuse(f"must be a string (glob pattern), a whole number or a list of them, got {show(item)}",
                           *at)
                texts.append(str(item))
            out.append((keyword, tuple(texts)))
        return tuple(out)


# Matching keys the poller sets itself, and series-level keys a study-level query cannot use.
_SOURCE_OWN_KEYS = ("StudyDate",)
_STUDY_LEVEL_INSTEAD = {"Modality": "ModalitiesInStudy", "SOPClassUID": "SOPClassesInStudy"}


class QueryValues(Rule):
    """A source's ``query``: further QIDO-RS matching keys at the table's ``level`` (checked before it)."""

    def check(self, value: Any, info: ValidationInfo) -> tuple[tuple[str, str], ...]:
        level = info.data.get("level")
        out = []
        for keyword, text in _table(value).items():
            _known_keyword(keyword)
            if keyword in _SOURCE_OWN_KEYS:
                refuse(f"{keyword} is set by the poller (lookback_hours, then the saved watermark); leave it out",
                       keyword)
            if level == "study" and keyword in _STUDY_LEVEL_INSTEAD:
                refuse(f'{keyword} is a series attribute; at level = "study" use {_STUDY_LEVEL_INSTEAD[keyword]}, '
                       'or level = "series"', keyword)
            _text_valued(keyword, "query")
            if text == "":
                refuse("must not be empty (QIDO-RS would match everything)", keyword)
            if not isinstance(text, str) and not is_int(text):
                refuse(f"must be a string (QIDO-RS matching value, e.g. \"CT\" or \"*HEAD*\") or a whole number, "
                       f"got {show(text)}", keyword)
            out.append((keyword, str(text)))
        return tuple(out)


class Steps(Rule):
    """A pipeline's ``steps``: a list (each step is checked by :func:`node.config.pipeline.parse_steps`)."""

    def check(self, value: Any, info: ValidationInfo) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            refuse(f"must be a list of steps ({{ op = ... }} tables), got {show(value)}")
        return tuple(value)


@dataclass(frozen=True)
class Reference(Rule):
    """The name of a *what* the file defines in *array* (``pipeline``, among ``[[pipelines]]``)."""

    array: str
    what: str

    def unknown(self, value: Any, info: ValidationInfo) -> str | None:
        """Why *value* names nothing the file defines, or None."""
        names = file_context(info).locator.names(self.array)
        if isinstance(value, str) and value in names:
            return None
        return f"unknown {self.what} {show(value)}; defined: {', '.join(names) or 'none'}"

    def check(self, value: Any, info: ValidationInfo) -> str:
        problem = self.unknown(value, info)
        if problem:
            refuse(problem)
        return value


@dataclass(frozen=True)
class References(Reference):
    """A list of names of *what*s the file defines in *array*, each once."""

    def check(self, value: Any, info: ValidationInfo) -> tuple[str, ...]:  # type: ignore[override]
        if not isinstance(value, (list, tuple)):
            refuse(f"must be a list of {self.what} names, got {show(value)}")
        for n, name in enumerate(value):
            problem = self.unknown(name, info)
            if problem:
                refuse(problem, n)
            if name in value[:n]:
                refuse(f"{self.what} {show(name)} is listed twice", n)
        return tuple(value)


TEXT = Accepts(lambda value: isinstance(value, str) and bool(value.strip()), "must be a non-empty string")
FLAG = Accepts(lambda value: isinstance(value, bool), "must be true or false")
ENV_NAME = Accepts(lambda value: isinstance(value, str) and bool(_ENV_NAME.fullmatch(value)),
                   "must name an environment variable (letters, digits, '_', not starting with a digit)")
ITEM_NAME = Accepts(lambda value: isinstance(value, str) and bool(_NAME.fullmatch(value)),
                    "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
"""The ``name`` of a pipeline, destination or source (unique among them: :class:`UniqueNames`)."""
AE_TITLE = _AeTitle()
AE_TITLES = _AeTitles()
FOLDER = _Location()
EXISTING_FILE = _Location(existing=True)
HTTP_URL = _HttpUrl()


# --------------------------------------------------------------------------- arrays of tables


@dataclass(frozen=True)
class _ArrayRule:
    """A check of a whole array of tables, ``[[array]]``: before pydantic reads its items, or after."""

    array: str
    before: ClassVar[bool]

    def check(self, value: Any, info: ValidationInfo) -> Any:
        """*value*, if it passes; refused otherwise."""
        raise NotImplementedError

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        wrap = (core_schema.with_info_before_validator_function if self.before
                else core_schema.with_info_after_validator_function)
        return wrap(self.check, handler(source))


class TablesArray(_ArrayRule):
    """An array of tables, refused before its items are looked at if it is not one."""

    before = True

    def check(self, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list):
            refuse(f"must be an array of tables ([[{self.array}]]), got {show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                refuse(f"must be a table, got {show(item)}", index)
        return value


class UniqueNames(_ArrayRule):
    """The items of an array of tables, each with a name no other item has (the second is refused)."""

    before = False

    def check(self, value: Any, info: ValidationInfo) -> Any:
        seen: dict[str, int] = {}
        for index, item in enumerate(value):
            if item.name in seen:
                line = file_context(info).locator.line((self.array, seen[item.name], "name"))
                refuse(f"duplicate name {show(item.name)} (also at line {line})", index, "name")
            seen[item.name] = index
        return value


@dataclass(frozen=True)
class Built:
    """Validated as the table *table*, then made into the annotated type by *build* (a Pipeline)."""

    table: type
    build: Callable[[Any], Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.build, handler.generate_schema(self.table))


# --------------------------------------------------------------------------- tables


def internal(default: Any) -> Any:
    """A field the loader sets, not a key of the file (a key of that name is refused as unknown)."""
    return dataclasses.field(default=default, compare=False, repr=False, metadata={"internal": True})


def unknown_keys(table: dict[str, Any], allowed: Sequence[str]) -> None:
    """Refuse the first key of *table* not in *allowed*, with the nearest allowed key as a hint."""
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            refuse(f"unknown key{did}; allowed keys: {', '.join(allowed)}", key)


@dataclass(frozen=True)
class Table:
    """A table of the file: its keys are the fields of the model, in order (``name``, then ``kind``
    first, for tables that have them); a key it does not know is refused before any value.

    Subclasses may refine the table as written (:meth:`file_form`) and name keys the file must give
    although the model has a default (:attr:`file_requires`). Not pydantic's ``extra="forbid"``: its
    refusal comes after those of the table's values (a misspelt key is first reported as a missing
    one) and names no key it meant.
    """

    file_requires: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def file_keys(cls) -> tuple[str, ...]:
        """The keys of the table in the file, in the order the refusals list them."""
        keys = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]  # type: ignore[arg-type]
        if isinstance(getattr(cls, "kind", None), str):
            keys.insert(1 if keys[:1] == ["name"] else 0, "kind")
        return tuple(keys)

    @classmethod
    def file_form(cls, table: dict[str, Any]) -> dict[str, Any]:
        """*table* as the fields take it (checks of how keys go together, as written, go here)."""
        return table

    @model_validator(mode="before")
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        table = _table(data)
        unknown_keys(table, cls.file_keys())
        for key in cls.file_requires:
            if key not in table:
                refuse("missing (required)", key)
        return {k: v for k, v in cls.file_form(table).items() if k != "kind"}


class Kinds:
    """One of several tables told apart by their ``kind`` key (each class's ``kind``).

    Without ``kind``, a key no kind takes is refused first (a misspelt ``kind`` is named as such);
    then ``kind`` is required and must be one of the kinds. pydantic's tagged union then validates
    the table as its kind; its ``loc`` holds the tag ``kind=<kind>``, which the loader leaves out.
    """

    def __init__(self, *classes: type[Table]) -> None:
        self.classes = {cls.kind: cls for cls in classes}  # type: ignore[attr-defined]

    def check(self, value: Any) -> Any:
        """*value* if it is a table with a known ``kind``."""
        table = _table(value)
        if "kind" not in table:
            unknown_keys(table, tuple(dict.fromkeys(k for cls in self.classes.values() for k in cls.file_keys())))
            refuse("missing (required)", "kind")
        if table["kind"] not in self.classes:
            refuse(f"must be one of {', '.join(self.classes)}, got {show(table['kind'])}", "kind")
        return table

    @staticmethod
    def tag(table: dict[str, Any]) -> str:
        """The union's tag of *table*: ``kind=dicom``."""
        return f"kind={table['kind']}"

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        choices = {f"kind={kind}": handler.generate_schema(cls) for kind, cls in self.classes.items()}
        schema: core_schema.CoreSchema = core_schema.no_info_before_validator_function(
            self.check, core_schema.tagged_union_schema(choices, discriminator=self.tag))
        return core_schema.nullable_schema(schema) if _optional(source) else schema
