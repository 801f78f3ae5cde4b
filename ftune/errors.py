"""User-facing errors: the CLI prints these as a message and an exit code, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data, request) that they can fix.

    The message must say what is wrong, where (file, line, field) and how to fix it.
    """

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in a config file or its command-line overrides."""


class DataError(UserError):
    """A problem in a dataset file: malformed rows, missing fields, nothing left to train on."""


class JobFailed(Exception):
    """A job that started but did not finish (workers failed beyond the retry budget)."""

    exit_code = 1
