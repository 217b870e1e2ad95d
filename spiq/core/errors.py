"""The one base of the errors spiq raises for what its user gave it: a config, an image, a folder,
a model or layer name, a request an analysis cannot answer. The CLI and the app show these as
messages; any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class SpiqError(Exception):
    """Something the user gave spiq is wrong; the message says what, and how to put it right."""


class UnknownNameError(SpiqError, KeyError):
    """A name (a model, a layer, a view) that is not there; shown as its message, unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AnalysisError(SpiqError, ValueError):
    """An analysis was asked for what this model cannot show: a channel or block out of range, a
    layer without a data-free law, attention maps of a CNN."""
