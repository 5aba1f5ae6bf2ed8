"""Content fingerprints: what content-addressed names are computed from when a config names a file.

    file_fingerprint(path)     sha256 over a file's bytes, or over a folder's files (names and bytes)
    cached_fingerprint(path)   the same, remembered in bread_ray's cache while the files are unchanged

Hashing a model of gigabytes takes seconds, so a fingerprint is cached, keyed by the path and every
file's size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

FINGERPRINTS_FILE = "fingerprints.json"  # in the cache folder: {path: {"files": [...], "sha256": ...}}


def cache_root() -> Path:
    """bread_ray's cache folder: $BREAD_CACHE, else ~/.cache/bread_ray."""
    return Path(os.environ.get("BREAD_CACHE") or Path.home() / ".cache" / "bread_ray").expanduser()


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def file_fingerprint(path: Path) -> str:
    """sha256 over a file's bytes, or over a folder's files (names and bytes) in sorted order."""
    digest = hashlib.sha256()
    for file in _files(path):
        digest.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cached_fingerprint(path: Path) -> str:
    """file_fingerprint(path), reused while no file under `path` changed size or mtime."""
    stamp = [[str(file.relative_to(path) if file != path else ""), file.stat().st_size, file.stat().st_mtime_ns]
             for file in _files(path)]
    cache = cache_root() / FINGERPRINTS_FILE
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if isinstance(entry, dict) and entry.get("files") == stamp:
        return entry["sha256"]
    fingerprint = file_fingerprint(path)
    known[str(path)] = {"files": stamp, "sha256": fingerprint}
    temp = cache.with_name(f".{cache.name}-{uuid.uuid4().hex}")
    try:  # a cache that cannot be written only costs the hashing again
        cache.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(known, indent=1))
        os.replace(temp, cache)
    except OSError:
        temp.unlink(missing_ok=True)
    return fingerprint

