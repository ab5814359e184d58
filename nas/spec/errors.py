"""One exception root for everything a user can cause.

The CLI turns a `NasError` into one line on stderr and exit code 2. Anything else that escapes
is a bug and keeps its traceback.
"""

from __future__ import annotations


class NasError(Exception):
    """Root of the errors a user can cause and fix (bad input, missing file, bad setting)."""


class SpecError(NasError, ValueError):
    """An ArchSpec whose fields contradict each other; the message names the field."""


class ConfigError(NasError):
    """A YAML file (search space, hardware profile) that is malformed or invalid.

    The message names the file and the dotted key, e.g.
    ``search_spaces/x.yaml: dimensions.n_heads.choices: must be a non-empty list``.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class DataError(NasError):
    """A corpus that cannot be read or is too small to split."""


class TrainingError(NasError):
    """Training that cannot go on, e.g. a loss that became NaN or infinite."""
