"""Domain errors. Every one of them is shown to a CLI user as a single line.

A message names the bad value, what was expected, and the fix, e.g.
``unknown task 'sst3': not in ./tasks or the packaged catalogue (see `prompt-composer task list`)``.
"""
from __future__ import annotations


class ComposerError(Exception):
    """Base class: a user-facing failure with a one-line message."""


class TaskError(ComposerError):
    """A task spec or its data is missing or malformed."""


class BackboneError(ComposerError):
    """A backbone could not be resolved or loaded."""


class LibraryError(ComposerError):
    """A prompt library entry is missing, malformed or incompatible."""


class GraphError(ComposerError):
    """A task graph is malformed; ``faults`` holds one line per fault."""

    def __init__(self, message: str, faults: list[str] | None = None):
        super().__init__(message)
        self.faults = list(faults or [])


class TrainingError(ComposerError):
    """Training could not start or had to stop (bad config, NaN loss, bad resume folder)."""


class ComposeError(ComposerError):
    """A target prompt could not be composed (no candidates, mismatched candidates...)."""
