"""The errors the library raises. Each says what is wrong and where (file, line or record, field) in one line; the
scripts turn them into `<script>: error: <message>` and exit status 1, and a program using the library catches them.

They derive from ValueError or OSError as the failure is one of input or of the file system, so code that caught
those before the library had its own types still does."""
from __future__ import annotations


class MedextractError(Exception):
    """Anything the library refuses, with a message fit to show as it is."""


class ConfigError(MedextractError, ValueError):
    """A setting that cannot work: a flag's value, a model directory that is not one, a budget that does not fit."""


class InputError(MedextractError, ValueError):
    """A bad input file or record (named with its line and field)."""


class ModelLoadError(MedextractError, OSError):
    """A model or tokenizer that passed the header checks but failed to load (a corrupt tensor, a disk error)."""


class OutputError(MedextractError, OSError):
    """An output file that cannot be written; what was written before is kept."""


class AnswersFailed(MedextractError):
    """Some answers of a batch failed (their ids are listed); the others were written."""

    def __init__(self, message: str, ids: list[int]):
        super().__init__(message)
        self.ids = ids
