"""User-facing errors.

Anything a user can cause (bad path, unknown model, wrong mask, missing optional package,
no network) raises :class:`UserError`; the CLI prints its one-sentence message and exits
with status 2. Bugs raise ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or environment, with a message naming the fix."""


class ModelLoadError(UserError):
    """The model could not be found, read or mapped."""


class MaskError(UserError):
    """A head mask does not fit the model or is malformed."""


def missing_package(package: str, purpose: str, install: str | None = None) -> UserError:
    """Build the error for an optional package that is not installed."""
    hint = install or f"pip install {package}"
    return UserError(f"{purpose} needs the package '{package}', which is not installed; run `{hint}`.")
