"""Library names: the rule every `--save`, `--name` and `--save-prefix` follows (standard library only).

A name is also a folder (the library's ROOT/NAME, a run's runs/NAME), so it is checked before any work:
a name that is a path, empty, too long for a file name, or starts with a dash (an option, to a shell) is
refused in one line that says which rule it breaks.
"""
from __future__ import annotations

import re

from composer.errors import LibraryError

MAX_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
RULE = (f"use letters, digits and . _ - + =, starting with a letter or digit (no '/', no '..', at most "
        f"{MAX_LENGTH} characters)")


def _shown(name: str) -> str:
    """The name as a message shows it: quoted, one line, and cut short when it is long."""
    if not isinstance(name, str):
        return repr(name)
    s = repr(name)
    return s if len(name) <= MAX_LENGTH else f"{s[:50]}...' ({len(name)} characters)"


def name_fault(name) -> str | None:
    """What is wrong with ``name`` as a library name (None: nothing)."""
    if not isinstance(name, str):
        return f"a name is text, got {type(name).__name__}"
    if not name:
        return "it is empty"
    if len(name) > MAX_LENGTH:
        return f"it is {len(name)} characters long, at most {MAX_LENGTH} fit"
    if "/" in name or "\\" in name:
        return "it is a path, not a name"
    if ".." in name:
        return "it holds '..'"
    if name[0] == "-":
        return "it starts with '-'"
    bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "._+=-"))), None)
    if bad is not None:
        return f"it holds {bad!r}" + ("" if bad.isascii() else " (only ASCII)")
    if not _NAME.fullmatch(name):
        return "it must start with a letter or digit"
    return None


def check_name(name, what: str = "prompt name") -> str:
    """``name`` if it is a valid library name, else a one-line LibraryError naming ``what`` (``--save``...)."""
    fault = name_fault(name)
    if fault:
        raise LibraryError(f"bad {what} {_shown(name)}: {fault}; {RULE}")
    return name


def check_prefix(prefix, what: str = "--save-prefix") -> str:
    """A prefix that makes valid names (PREFIX+TASK): non-empty, and valid with a name after it."""
    if isinstance(prefix, str) and len(prefix) >= MAX_LENGTH:
        fault = f"it is {len(prefix)} characters long, and PREFIX+TASK must fit in {MAX_LENGTH}"
    elif isinstance(prefix, str) and prefix:
        fault = name_fault(prefix + "x")
    else:
        fault = name_fault(prefix) or "it is empty"
    if fault:
        raise LibraryError(f"bad {what} {_shown(prefix)}: {fault}; each task's prompt is saved as PREFIX+TASK, "
                           f"so {RULE}")
    return prefix
