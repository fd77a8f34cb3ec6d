"""Errors a user can cause, each with a message that names the problem and the fix.

Library code raises :class:`UserError` (or a subclass) for anything the caller can fix: a missing
file, a corrupt model, calibration data that does not fit the model. The CLI prints
``error: <message>`` plus ``fix: <hint>`` and exits with :data:`EXIT_USER_ERROR`; no traceback.
Anything else escaping is a bug in converter.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 1


class UserError(Exception):
    """A problem the user can fix. ``fix`` says how."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


class ModelError(UserError):
    """The model file is missing, unreadable, corrupt or unsupported."""


class CalibrationDataError(UserError):
    """Calibration data is missing, empty, or does not match the model's inputs."""


class ConfigError(UserError):
    """A config file or option is invalid."""


class EncodingsError(UserError):
    """An encodings file is unreadable or does not fit the model."""


class OutputError(UserError):
    """The output location cannot be written."""


class SlowerThanFloatError(UserError):
    """The written model runs slower than its latency limit allows where it runs (``max_latency_ratio``). The model,
    its encodings and the report (``latency_gate``) were written all the same; ``result`` is what ``quantize``
    would have returned."""

    exit_code = EXIT_CHECK_FAILED

    def __init__(self, message: str, fix: str | None = None, result: object = None) -> None:
        super().__init__(message, fix)
        self.result = result
