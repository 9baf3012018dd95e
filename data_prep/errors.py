"""The one error type of data preparation."""

from __future__ import annotations


class DataPrepError(ValueError):
    """Input data or data settings are unusable; the message names the file and the fix."""
