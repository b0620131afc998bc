"""The one error type of the flash dir's readers."""

from __future__ import annotations


class FormatError(ValueError):
    """A flash model dir that is missing, damaged or from another format version."""
