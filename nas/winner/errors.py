"""The winner layer's error, apart so that picking, the recipe and the folder raise one type
without importing each other."""

from __future__ import annotations

from nas.spec.errors import NasError


class WinnerError(NasError):
    """A trial that cannot be picked or exported (unknown, failed, none under a limit, files missing)."""
