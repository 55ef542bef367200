"""Where a key stands in a TOML text, and how a message names it: ``FILE:LINE: key.path``.

:mod:`tomllib` gives values, not line numbers, so :class:`TomlLines` finds them in the text (it scans
a text tomllib has already accepted). :class:`Locator` turns a key path of the parsed data into the
place an error message starts with: ``config/node.toml:23: destinations[1] (name "pacs").port``.
Items of arrays are counted from 1 there, as they appear in the file; a key that is missing is
placed at the line of its table's header.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["KeyPath", "Locator", "TomlLines", "show"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b", '"': '"', "\\": "\\"}

KeyPath = tuple[str | int, ...]
"""A place in the parsed TOML: keys and 0-based array indices, ``("destinations", 0, "port")``."""

NAMED_ITEMS = ("pipelines", "destinations", "sources")
"""The arrays of tables whose items a message names by their ``name``."""


def show(value: Any) -> str:
    """A value much as TOML would write it (strings in double quotes), for messages."""
    return json.dumps(value, ensure_ascii=False, default=str)


class Locator:
    """The places of one configuration file: line numbers and printed key paths.

    Parameters
    ----------
    source : str
        The file as the user named it (or ``<embedded default>``).
    text : str
        Its text (scanned for line numbers only when a message needs one).
    data : dict
        What tomllib made of it.
    """

    def __init__(self, source: str, text: str, data: dict[str, Any]) -> None:
        self.source = source
        self.text = text
        self.data = data
        self._lines: TomlLines | None = None

    def line(self, path: KeyPath) -> int:
        """The line of *path*, else of its nearest enclosing key or table, else 1."""
        if self._lines is None:
            self._lines = TomlLines(self.text)
        return self._lines.line_of(path)

    def where(self, path: KeyPath) -> str:
        """``destinations[1] (name "pacs").port``: 1-based items, named when they have a name."""
        out = ""
        for n, part in enumerate(path):
            if isinstance(part, int):
                out += f"[{part + 1}]"
                if n == 1 and path[0] in NAMED_ITEMS:
                    name = self._name_of(path[0], part)
                    if name is not None:
                        out += f" (name {show(name)})"
            else:
                key = part if _BARE_KEY.fullmatch(part) else show(part)
                out += f".{key}" if out else key
        return out

    def located(self, path: KeyPath) -> str:
        """``FILE:LINE: key.path``, what every refusal starts with."""
        return f"{self.source}:{self.line(path)}: {self.where(path)}"

    def in_file(self, path: KeyPath) -> bool:
        """Whether *path* is written in the file (not left to its default)."""
        value: Any = self.data
        for part in path:
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and isinstance(part, int) and part < len(value):
                value = value[part]
            else:
                return False
        return True

    def names(self, array: str) -> list[str]:
        """The names of the items of *array* as written (``[[pipelines]]``...), in file order."""
        items = self.data.get(array)
        if not isinstance(items, list):
            return []
        return [item["name"] for item in items if isinstance(item, dict) and isinstance(item.get("name"), str)]

    def _name_of(self, array: str | int, index: int) -> str | None:
        items = self.data.get(array) if isinstance(array, str) else None
        item = items[index] if isinstance(items, list) and index < len(items) else None
        name = item.get("name") if isinstance(item, dict) else None
        return name if isinstance(name, str) else None


# --------------------------------------------------------------------------- the lexer



class TomlLines:
    """Line numbers of the tables, keys and array items of a TOML text that tomllib accepted.

    Paths are tuples of keys and 0-based array indices, as in the parsed data:
    ``("destinations", 0, "port")``, ``("routes", 1, "match", "Modality", 2)``.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.found: dict[KeyPath, int] = {}
        self._tables_arrays: dict[KeyPath, int] = {}  # [[x]] path -> index of its last table
        try:
            self._document()
        except (IndexError, ValueError):  # never expected after tomllib; keep what was found
            pass

    def line_of(self, path: Iterable[str | int]) -> int:
        """The line of *path*, else of its nearest enclosing table or key, else 1."""
        key = tuple(path)
        while key:
            if key in self.found:
                return self.found[key]
            key = key[:-1]
        return 1

    # scanning ---------------------------------------------------------------

    def _peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def _advance(self, n: int = 1) -> None:
        self.line += self.text.count("\n", self.pos, self.pos + n)
        self.pos += n

    def _skip(self, newlines: bool) -> None:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t":
                self._advance()
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif newlines and char in "\r\n":
                self._advance()
            else:
                return

    def _record(self, path: KeyPath, line: int) -> None:
        for n in range(1, len(path) + 1):
            self.found.setdefault(path[:n], line)

    def _document(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip(newlines=True)
            if self.pos >= len(self.text):
                return
            start, line = self.pos, self.line
            if self._peek(2) == "[[":
                self._advance(2)
                keys = self._key()
                self._skip(newlines=False)
                self._advance(2)
                array = self._resolve(keys[:-1]) + (keys[-1],)
                index = self._tables_arrays.get(array, -1) + 1
                self._tables_arrays[array] = index
                table = array + (index,)
                self._record(table, line)
                self.found[table] = line
            elif self._peek() == "[":
                self._advance()
                keys = self._key()
                self._skip(newlines=False)
                self._advance()
                table = self._resolve(keys)
                self._record(table, line)
                self.found[table] = line  # the header, even if [table.sub] came first
            else:
                self._key_value(table)
            if self.pos == start:
                raise ValueError("no progress")

    def _resolve(self, keys: Sequence[str]) -> KeyPath:
        path: KeyPath = ()
        for key in keys:
            path = path + (key,)
            if path in self._tables_arrays:
                path = path + (self._tables_arrays[path],)
        return path

    def _key(self) -> list[str]:
        keys = []
        while True:
            self._skip(newlines=False)
            char = self._peek()
            if char in ('"', "'"):
                keys.append(self._string())
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if not match:
                    raise ValueError("not a key")
                keys.append(match.group())
                self._advance(match.end() - self.pos)
            self._skip(newlines=False)
            if self._peek() != ".":
                return keys
            self._advance()

    def _key_value(self, table: KeyPath) -> None:
        line = self.line
        path = table + tuple(self._key())
        self._skip(newlines=False)
        if self._peek() != "=":
            raise ValueError("no =")
        self._advance()
        self._skip(newlines=False)
        self._record(path, line)
        self._value(path)

    def _string(self) -> str:
        """Skip a string; return its value (single-line strings only, for keys)."""
        quote = self._peek()
        if self._peek(3) == quote * 3:
            self._advance(3)
            while self.pos < len(self.text):
                if quote == '"' and self._peek() == "\\":
                    self._advance(2)
                elif self._peek(3) == quote * 3:
                    self._advance(3)
                    extra = 0
                    while extra < 2 and self._peek() == quote:
                        self._advance()
                        extra += 1
                    return ""
                else:
                    self._advance()
            return ""
        self._advance()
        out = []
        while self.pos < len(self.text):
            char = self._peek()
            if char == quote:
                self._advance()
                return "".join(out)
            if char == "\\" and quote == '"':
                code = self.text[self.pos + 1]
                if code in "uU":
                    digits = 4 if code == "u" else 8
                    out.append(chr(int(self.text[self.pos + 2 : self.pos + 2 + digits], 16)))
                    self._advance(2 + digits)
                    continue
                out.append(_ESCAPES.get(code, code))
                self._advance(2)
                continue
            out.append(char)
            self._advance()
        return "".join(out)

    def _value(self, path: KeyPath) -> None:
        char = self._peek()
        if char in ('"', "'"):
            self._string()
        elif char == "[":
            self._items("]", lambda index: self._array_item(path + (index,)))
        elif char == "{":
            self._items("}", lambda _: self._key_value(path))
        else:  # number, bool, date-time: up to the next delimiter
            end = self.pos
            while end < len(self.text) and self.text[end] not in ",]}#\r\n":
                end += 1
            self._advance(end - self.pos)

    def _array_item(self, path: KeyPath) -> None:
        self._record(path, self.line)
        self._value(path)

    def _items(self, close: str, item: Callable[[int], None]) -> None:
        """The comma-separated items of an array or inline table, up to *close*."""
        self._advance()
        index = 0
        while True:
            self._skip(newlines=True)
            if self.pos >= len(self.text) or self._peek() == close:
                self._advance()
                return
            start = self.pos
            item(index)
            index += 1
            self._skip(newlines=True)
            if self._peek() == ",":
                self._advance()
            elif self.pos == start:
                raise ValueError("no progress")
