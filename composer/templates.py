"""Task templates: the one renderer, used to validate a task spec and to encode its rows (no torch).

A template is str.format-like: ``{field}`` is filled with str(row[field]) (never re-read), ``{{`` and ``}}``
are literal braces. Only plain field names: no conversions, format specs, indexing or attributes.
"""
from __future__ import annotations

import re
import string
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from composer.errors import TaskError

_NAME = re.compile(r"\w+")
_PLAIN = "write plain {name} placeholders (format specs and !r/!s conversions are not supported)"


class TemplateError(TaskError):
    """A template that is not literal text with plain ``{field}`` placeholders.

    ``problem`` and ``fix`` are kept apart so composer.tasks can say which task field is wrong.
    """

    def __init__(self, template: str, problem: str, fix: str):
        super().__init__(f"template {template!r} {problem}; {fix}")
        self.problem, self.fix = problem, fix


@lru_cache(maxsize=256)
def parse_template(template: str) -> tuple[tuple[str, str | None], ...]:
    """``template`` -> ((literal, field or None), ...) in order, with ``{{``/``}}`` already single braces."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(template, f"cannot be parsed ({e})", "write '{{' and '}}' for literal braces") from None
    pieces = []
    for literal, name, spec, conversion in parts:
        if name is not None:
            if conversion:
                raise TemplateError(template, f"has a conversion '!{conversion}' on field '{name}'", _PLAIN)
            if spec:
                raise TemplateError(template, f"has a format spec ':{spec}' on field '{name}'", _PLAIN)
            if not _NAME.fullmatch(name):
                raise TemplateError(template, f"has the placeholder '{{{name}}}', not a plain field name",
                                    "name an input field, e.g. {sentence}, and write '{{' and '}}' for literal braces")
        pieces.append((literal, name))
    return tuple(pieces)


def template_fields(template: str) -> list[str]:
    """The field names ``template`` uses, in order of first use, each once."""
    return list(dict.fromkeys(name for _, name in parse_template(template) if name is not None))


def render(template: str, row: Mapping[str, Any]) -> str:
    """``template`` filled with ``str(row[field])`` for each placeholder; raises TaskError for a missing field."""
    out = []
    for literal, name in parse_template(template):
        out.append(literal)
        if name is not None:
            if name not in row:
                have = ", ".join(map(str, row)) or "no fields"
                raise TaskError(f"template {template!r} uses field '{name}' but the row has {have}; "
                                "add the column (data.field_map can rename one) or fix the placeholder name")
            out.append(str(row[name]))
    return "".join(out)
