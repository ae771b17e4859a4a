"""Blocklists and opt-outs: rows and images a dataset owner must never ship.

A list is a text file (local or any fsspec URL, read through the storage layer's credentials), one
entry per line, ``#`` comments and blank lines ignored, of one kind:

- ``sample_id``: LAION SAMPLE_IDs, ``url``: exact image urls, ``domain``: hosts (a domain also
  blocks its subdomains): applied by ``select``, before anything is downloaded;
- ``sha256``: hex digests of image bytes, applied by ``download`` to what img2dataset fetched
  (a matching image is never written to a shard);
- ``phash``: 64-bit perceptual hashes (``imagehash.phash`` of a face's aligned crop, 16 hex
  digits), applied by ``faces``, matching within ``max_distance`` bits.

Hash lists are how an owner applies an industry CSAM or takedown hash list they hold. Every
dropped row or face is counted and named with the list that matched (``kind:path``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field

from facemllm.pipeline.core.storage import open_url
from facemllm.schemas import StrictModel

BlocklistKind = Literal["sample_id", "url", "domain", "sha256", "phash"]


class BlocklistSource(StrictModel):
    kind: BlocklistKind
    path: str = Field(description="a local path or fsspec URL (s3://, gs://) of the list")
    max_distance: int = Field(0, ge=0, le=16, description="phash lists: Hamming distance that still matches")

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.path}"


def _entries(source: BlocklistSource) -> list[str]:
    with open_url(source.path) as handle:
        text = handle.read().decode("utf-8-sig", errors="replace")
    entries = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [entry for entry in entries if entry]


def _parsed(source: BlocklistSource, entry: str) -> int | str:
    """One entry in the form it is compared in; ``ValueError`` naming the list for a bad one."""
    try:
        if source.kind == "sample_id":
            return int(entry)
        if source.kind == "phash":
            if len(entry) != 16:
                raise ValueError("a phash is 16 hex digits")
            return int(entry, 16)
        if source.kind == "sha256":
            if len(entry) != 64:
                raise ValueError("a sha256 is 64 hex digits")
            int(entry, 16)
        return entry.lower() if source.kind in ("domain", "sha256") else entry
    except ValueError as err:
        raise ValueError(f"blocklist {source.name}: bad entry {entry[:80]!r} ({err})") from None


class Blocklists:
    """The loaded lists of some kinds; each ``match_*`` returns the name of the list that matched."""

    def __init__(self, sources: Iterable[BlocklistSource], kinds: Iterable[BlocklistKind]):
        self.entries: dict[str, dict[int | str, str]] = {kind: {} for kind in kinds}
        self.phash_distances: dict[str, int] = {}
        for source in sources:
            if source.kind not in self.entries:
                continue
            for entry in _entries(source):
                self.entries[source.kind].setdefault(_parsed(source, entry), source.name)
            self.phash_distances[source.name] = source.max_distance

    def __bool__(self) -> bool:
        return any(self.entries.values())

    def match_row(self, sample_id: int | None, url: str | None) -> str | None:
        """The list blocking a LAION row by its SAMPLE_ID, url or the url's host."""
        if sample_id is not None and (name := self.entries.get("sample_id", {}).get(sample_id)):
            return name
        if url is not None and (name := self.entries.get("url", {}).get(url)):
            return name
        domains = self.entries.get("domain", {})
        host = (urlsplit(url).hostname or "") if url and domains else ""
        parts = host.split(".")
        return next(
            (domains[d] for d in (".".join(parts[i:]) for i in range(len(parts))) if d in domains), None
        )

    def match_sha256(self, digest: str | None) -> str | None:
        return self.entries.get("sha256", {}).get(digest.lower()) if digest else None

    def match_phash(self, value: int) -> str | None:
        """Exact first, then within each list's ``max_distance`` (a scan: hash lists are small)."""
        hashes = self.entries.get("phash", {})
        if value in hashes:
            return hashes[value]
        for listed, name in hashes.items():
            if (listed ^ value).bit_count() <= self.phash_distances[name]:
                return name
        return None
