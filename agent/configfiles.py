"""Read the config from disk: the mounted ConfigMap directory, or one YAML file.

The file reads live here so `agent.config` stays pure (it parses texts it is given). Reads are
bounded: all files together stop at `MAX_CONFIG_BYTES` + 1 byte, however large a file is, and
nothing is parsed until every file was read within that budget. The kubelet's atomic writer keeps
`..data` and timestamped directories beside the keys and swaps the `..data` symlink on an edit;
entries starting with a dot are skipped, and edits are noticed by content (`fingerprint`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.config import (
    MAX_CONFIG_BYTES,
    Config,
    ConfigError,
    parse_config_file,
    parse_config_texts,
)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a ConfigMap-style directory or a single YAML file and validate it.

    All files are read (at most `MAX_CONFIG_BYTES` together) before any is parsed."""
    p = Path(path)
    if p.is_dir():
        return parse_config_texts(_read_config_files(p, _key_files(p), keys=True))
    if p.is_file():
        return parse_config_file(_read_config_files(p, [p], keys=False)[p.name], str(p))
    raise ConfigError("--config", str(p), "no such file or directory")


def fingerprint(path: str | os.PathLike[str]) -> str:
    """A digest of what `load_config` would read, to notice edits (the kubelet swaps a
    symlink when a mounted ConfigMap changes, so mtimes are not enough). Reads at most
    `MAX_CONFIG_BYTES` + 1 of each file, plus its size: a config over the limit is refused
    whatever its tail holds."""
    p = Path(path)
    digest = hashlib.sha256()
    try:
        for entry in _key_files(p) if p.is_dir() else [p]:
            with entry.open("rb") as stream:
                size = os.fstat(stream.fileno()).st_size
                head = stream.read(MAX_CONFIG_BYTES + 1)
            digest.update(f"{entry.name}\0{size}\0".encode() + head + b"\0")
    except OSError as exc:
        digest.update(f"unreadable: {exc}".encode())
    return digest.hexdigest()


def _key_files(directory: Path) -> list[Path]:
    """The ConfigMap's keys: regular files (symlinks followed), without the kubelet's dot
    entries (`..data`, `..2024_01_01_...`), in name order."""
    return [e for e in sorted(directory.iterdir()) if not e.name.startswith(".") and e.is_file()]


def _read_config_files(where: Path, files: list[Path], keys: bool) -> dict[str, str]:
    """Each file's text, all within one `MAX_CONFIG_BYTES` budget (key names count, as they do
    in a ConfigMap); never reads more than the budget + 1 byte, however large a file is."""
    budget = MAX_CONFIG_BYTES
    texts = {}
    for entry in files:
        if keys:
            budget -= len(entry.name.encode())
        with entry.open("rb") as stream:
            data = stream.read(max(budget, 0) + 1)
        budget -= len(data)
        if budget < 0:
            total = sum((len(f.name.encode()) if keys else 0) + _size(f) for f in files)
            what = "the config's keys and values hold" if keys else "the config file holds"
            raise ConfigError(
                str(where), total, f"{what} {total} bytes, over the 1 MiB limit "
                f"({MAX_CONFIG_BYTES} bytes, also a ConfigMap's maximum); nothing was parsed")
        try:
            texts[entry.name] = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(entry.name, f"byte {exc.start}", "not valid UTF-8") from None
    return texts


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
