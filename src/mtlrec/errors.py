"""Errors a user can cause. The CLI prints any `MtlrecError` as one line, without a traceback."""

from __future__ import annotations


class MtlrecError(Exception):
    """Base of every error that a user can fix (bad config, bad data, missing file)."""


class ConfigError(MtlrecError):
    """The configuration is invalid: the message names the key path and what was expected."""


class DataError(MtlrecError):
    """A table is missing, unreadable or inconsistent with the configuration."""


class ArtifactError(MtlrecError):
    """A run directory is missing, incomplete or has been tampered with."""
