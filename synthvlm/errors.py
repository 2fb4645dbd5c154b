"""Errors that name where bad input is, so a user can fix the file rather than read a traceback."""

from __future__ import annotations


class SynthVLMError(Exception):
    """Base class for errors we raise on purpose (the CLI prints them without a traceback)."""


class InputError(SynthVLMError):
    """Bad input data: names the file, the line (or record) and the field."""

    def __init__(
        self,
        file: str,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ):
        # unit: "line" for text formats, "row" for Parquet, "record" for in-memory lists.
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = file
        if line is not None:
            where += f", {unit} {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class ConfigError(SynthVLMError):
    """A bad configuration value: names the field and what is allowed."""
