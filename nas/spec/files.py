"""How definition files are found and read, and how every file we write lands: atomically.

- Named definitions (``search_spaces/<name>.yaml``, ``hw_profiles/<name>.yaml``) are looked up in
  the checkout first (a source tree or an editable install), then in the copy shipped inside the
  wheel (``nas/_data/``), and read with ``yaml.safe_load`` into a mapping; a file that is not
  one gets a :class:`ConfigError` naming the file and the line.
- :func:`atomic_write` writes to a temporary file beside the target and renames it over the
  target, so that a reader (another worker, a resumed run) sees either the old file or the whole
  new one, never a torn one, also when the writer is killed mid-write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from nas.spec.errors import ConfigError, NasError

_PACKAGE = Path(__file__).resolve().parents[1]  # the nas/ folder


def definition_dirs(folder: str) -> list[Path]:
    """Where the named definitions of ``folder`` (``search_spaces``, ``hw_profiles``) live: the
    checkout's copy first, then the wheel's."""
    return [d for d in (_PACKAGE.parent / folder, _PACKAGE / "_data" / folder) if d.is_dir()]


def definition_files(folder: str) -> dict[str, Path]:
    """Name -> file of every definition in ``folder`` (the checkout's copy wins over the wheel's)."""
    found: dict[str, Path] = {}
    for d in definition_dirs(folder):
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def read_definition(name_or_path: str | Path, folder: str, kind: str) -> tuple[str, Path, str]:
    """(name, path, text) of a definition given by name (``jetson``) or by path to a YAML file;
    ``kind`` names it in errors ("search space", "hardware profile")."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(str(path), "", f"no such {kind} file")
        name = path.stem
    else:
        files = definition_files(folder)
        if str(name_or_path) not in files:
            raise NasError(f"unknown {kind} {str(name_or_path)!r}; known: {', '.join(files) or 'none'}")
        name, path = str(name_or_path), files[str(name_or_path)]
    try:
        return name, path, path.read_text()
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read: {e.strerror}") from None


def parse_yaml_mapping(text: str, source: str, expected: str) -> dict[str, Any]:
    """The YAML document in ``text`` as a mapping; ``expected`` says what it should hold."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(source, where, f"not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(source, "", f"must be a mapping with {expected}")
    return doc


def atomic_write(path: Path, content: bytes | str | Callable[[IO[bytes]], Any], *, fsync: bool = False) -> Path:
    """Write ``content`` (bytes, text, or a function that writes to a binary file object, such as
    ``lambda f: np.save(f, a)``) to ``path`` atomically. ``fsync`` flushes the data to the disk
    before the rename, for files whose loss on a power cut would cost work (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode())
            elif isinstance(content, bytes | bytearray):
                f.write(content)
            else:
                content(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
