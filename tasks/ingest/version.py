"""Dataset version digests: sha256 over (catalog entry, source file digests, preprocessing plan).

The digest is computed before any case is decoded, so a re-run of an unchanged entry can be
recognised (and skipped) at the cost of hashing its source files; file digests are cached
by (path, size, mtime) so that even that is cheap on a second run.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from tasks.catalog import Entry

DIGEST_CACHE_VERSION = 1
_lock = threading.Lock()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FileDigests:
    """sha256 of files, cached on disk by (resolved path, size, mtime_ns)."""

    def __init__(self, cache_file: Path | None = None):
        self.cache_file = cache_file
        self._cache: dict[str, str] = {}
        if cache_file and cache_file.is_file():
            try:
                loaded = json.loads(cache_file.read_text())
                if loaded.get("version") == DIGEST_CACHE_VERSION:
                    self._cache = loaded["digests"]
            except (ValueError, KeyError):
                self._cache = {}
        self._dirty = False

    def digest(self, path: Path) -> str:
        real = Path(path).resolve()
        stat = real.stat()
        key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
        with _lock:
            if key in self._cache:
                return self._cache[key]
        sha = hashlib.sha256()
        with open(real, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        value = sha.hexdigest()
        with _lock:
            self._cache[key] = value
            self._dirty = True
        return value

    def save(self) -> None:
        if not (self.cache_file and self._dirty):
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": DIGEST_CACHE_VERSION, "digests": self._cache}))
        os.replace(tmp, self.cache_file)
        self._dirty = False


def entry_identity(entry: Entry) -> dict[str, Any]:
    """The parts of an entry that change what is stored (description and license do not)."""
    return entry.model_dump(mode="json", exclude={"description", "license"})


def version_digest(entry: Entry, case_digests: dict[str, str], plan: dict[str, Any]) -> str:
    payload = {"entry": entry_identity(entry), "cases": dict(sorted(case_digests.items())), "plan": plan}
    return sha256_text(canonical_json(payload))
