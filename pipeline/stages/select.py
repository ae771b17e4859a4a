"""Select stage: LAION-400M metadata parquets + the LAION-Face id list -> url shards.

Each metadata file is streamed batch by batch (never a whole 400M-row part in memory); a row is
kept when its SAMPLE_ID is in the id list and it passes the optional filters. Kept rows are cut
into url shards ``urls/part-NNNNN.parquet`` whose shard id is ``input_index * max_shards_per_input
+ chunk``, so every input file is an independent, parallel and deterministic unit of work.
A marker ``urls/_select-NNNNN.json`` written last records the shards and the row counts of that
input file: it is the completion marker a rerun trusts. Unit of work: one metadata file (its index
in the sorted input list); downstream units: the url shards it wrote.

The id list (50M ids, 400 MB as published) is never loaded by a worker. The driver turns it once
into sorted unique int64 ``.npy`` files under ``urls/_ids/<key>/`` (``build_id_index``; ``key``:
the list's URL, size and modification time, ``id_parts`` and the number of metadata files, so a
changed list is a new index), ``index.json`` written last as its completion marker, and in an
object-store run uploads them; each worker memory-maps the one file its unit needs (fetched from
the store as an input of the unit) and binary-searches it. Which file: a per-part list (the
published ``.pth``: a list of 32 tensors, one per LAION-400M metadata part) whose parts are
numbered 0..N-1 for N metadata files gets one file per part, and metadata file i (its index in
the sorted input list, ``part-0000i-...`` for the published files) is matched against id part i
only, as LAION-Face's own conversion script does; a part left out by ``id_parts`` selects
nothing from its file. Any other list (a per-part list with another number of parts, a flat
tensor, .txt, .parquet) gets one flat file of every chosen id, which each worker maps whole.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from facemllm.pipeline.core.blocklist import Blocklists, BlocklistSource
from facemllm.pipeline.core.files import atomic_path, write_json_atomic, write_parquet_atomic
from facemllm.pipeline.core.profile import ProfileBuilder
from facemllm.pipeline.core.storage import RunStore, is_remote, open_url, url_to_fs
from facemllm.pipeline.stages.framework import Stage, UnitResult
from facemllm.schemas import BlockedRow, LaionRow, StrictModel
from facemllm.schemas.tables import arrow_schema

# LAION-400M metadata column -> LaionRow field
LAION_COLUMNS = {
    "SAMPLE_ID": "sample_id",
    "URL": "url",
    "TEXT": "text",
    "WIDTH": "width",
    "HEIGHT": "height",
    "LICENSE": "license",
    "NSFW": "nsfw",
    "similarity": "similarity",
}
URL_SHARD_SCHEMA = arrow_schema(LaionRow, exclude=("schema_version",))
ROW_BLOCKLISTS = ("sample_id", "url", "domain")  # the kinds applied here, before download
ID_INDEX_DIR = "urls/_ids"  # under the run folder: one subfolder per id index
ID_INDEX_MARKER = "index.json"
FLAT_ID_FILE = "all.npy"

log = logging.getLogger(__name__)


class SelectConfig(StrictModel):
    """LAION-400M metadata + LAION-Face id list -> url shards."""

    metadata: list[str] = Field(description="LAION-400M metadata parquet files (globs allowed)")
    ids: str = Field(description="LAION-Face id list: .pth as published, .parquet (SAMPLE_ID) or .txt")
    id_parts: list[int] | None = Field(
        None,
        description="parts of the id list to use; None = all. A per-part list with parts 0..N-1 for "
        "N metadata files matches metadata file i (in sorted order) against id part i only, so a "
        "part left out selects nothing from its file; otherwise every file is matched against all "
        "chosen parts",
    )
    trust_id_pickle: bool = Field(
        False, description="allow full unpickling of a .pth id list that torch's safe loader refuses"
    )
    min_width: int = Field(0, ge=0)
    min_height: int = Field(0, ge=0)
    nsfw: list[Literal["UNLIKELY", "UNSURE", "NSFW"]] | None = Field(
        None, description="NSFW tags to keep; None keeps all"
    )
    min_similarity: float | None = None
    samples_per_shard: int = Field(10_000, gt=0, le=1_000_000)
    batch_rows: int = Field(65_536, gt=0, description="rows read per streamed batch")
    max_shards_per_input: int = Field(
        1_000, gt=0, description="shard ids are input_index * this + chunk: a bound, not a target"
    )
    blocklist: list[BlocklistSource] = Field(
        default_factory=list,
        description="lists of SAMPLE_IDs, urls and domains (applied here), image sha256s (download) "
        "and face phashes (faces); see pipeline/core/blocklist.py",
    )


class IdListError(ValueError):
    """The id list cannot be read as LAION-Face sample ids."""


def _split_parts(obj: object, where: str) -> dict[int, object] | None:
    """A per-part container's parts by part number (position in a list, tuple or set; key of a
    dict part -> ids); None for a flat collection of ids."""
    if isinstance(obj, dict):
        try:
            keys = sorted(obj)
        except TypeError as err:
            raise IdListError(
                f"{where}: keys are neither all part numbers nor all sample ids ({err})"
            ) from err
        if all(isinstance(k, int) for k in keys) and _looks_like_parts(obj.values()):
            return {k: obj[k] for k in keys}
    elif isinstance(obj, list | tuple | set | frozenset):
        items = list(obj)
        if items and _looks_like_parts(items):
            return dict(enumerate(items))
    return None


def _id_parts(obj: object, parts: list[int] | None, where: str) -> Iterator[tuple[int | None, np.ndarray]]:
    """The chosen parts' ids, part by part (a flat collection: one part, numbered None), as int64
    arrays, unsorted and possibly repeated; LAION-Face's .pth has been seen as per-part lists,
    tuples, sets and dicts (part -> ids) of tensors, numpy arrays, lists or sets."""
    split = _split_parts(obj, where)
    if split is None:
        yield None, _flat_ids(obj, where)
        return
    for number, part in split.items():
        if parts is None or number in parts:
            yield number, _ids_from_container(part, None, f"{where}[{number}]")


def _ids_from_container(obj: object, parts: list[int] | None, where: str = "id list") -> np.ndarray:
    """Every chosen id of a container, in one array (nested parts flattened)."""
    return _concat([ids for _, ids in _id_parts(obj, parts, where)])


def _flat_ids(obj: object, where: str) -> np.ndarray:
    import torch

    if isinstance(obj, torch.Tensor):
        try:  # cast by torch: numpy has no bfloat16 or float8, nor sparse tensors
            return obj.detach().cpu().to(torch.int64).numpy().ravel()
        except (TypeError, RuntimeError) as err:
            raise IdListError(
                f"{where}: a {obj.layout} {obj.dtype} tensor is not sample ids ({err})"
            ) from err
    if isinstance(obj, np.ndarray):
        return obj.astype(np.int64).ravel()
    if isinstance(obj, dict):  # keyed by sample id (_split_parts has sorted the keys)
        return _ids_from_container(sorted(obj), None, where)
    if isinstance(obj, list | tuple | set | frozenset):
        try:
            return np.asarray(sorted(obj) if isinstance(obj, set | frozenset) else obj, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as err:
            raise IdListError(f"{where}: expected integer sample ids ({err})") from err
    raise IdListError(f"{where}: unsupported container {type(obj).__name__}")


def _looks_like_parts(values) -> bool:
    import torch

    return all(
        isinstance(v, list | tuple | set | frozenset | dict | np.ndarray | torch.Tensor) for v in values
    )


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)


def sorted_unique(ids: np.ndarray, kind: Literal["quicksort", "stable"] = "quicksort") -> np.ndarray:
    """``np.unique(ids)`` by a sort and a neighbour compare: numpy 2.4's ``np.unique`` hashes first
    and takes about 1 s for 1.5M int64 ids here, against 10 ms. ``kind="stable"`` (timsort) merges
    concatenated sorted runs in O(n log runs) even where numpy has no fast SIMD sort."""
    ordered = np.sort(ids, kind=kind)
    first = np.empty(len(ordered), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def _read_id_list(path: str | Path, parts: list[int] | None, trust_pickle: bool) -> object:
    """An id list as stored: what ``torch.load`` gives for a .pth (a container of parts or of ids),
    the ids of a .parquet (of ``parts``, by its ``part`` column if it has one) or of a .txt."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    source = _readable(path)
    if suffix in {".pth", ".pt"}:
        import torch

        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for refused globals
            if not trust_pickle:
                raise IdListError(
                    f"{path}: torch's safe loader refused it ({err.__class__.__name__}); if you trust the "
                    "file, set select.trust_id_pickle=true"
                ) from err
            return torch.load(_readable(path), map_location="cpu", weights_only=False)
    if suffix == ".parquet":
        table = pq.read_table(source)
        column = next((c for c in ("SAMPLE_ID", "sample_id") if c in table.column_names), None)
        if column is None:
            raise IdListError(f"{path}: no SAMPLE_ID column (has {table.column_names})")
        try:  # nulls are no ids; floats and strings cast only when they hold whole numbers
            if parts is not None and "part" in table.column_names:
                table = table.filter(pc.is_in(table["part"], pa.array(parts, pa.int64())))
            return table[column].drop_null().cast(pa.int64()).to_numpy()
        except pa.ArrowException as err:
            raise IdListError(f"{path}: {column} (and part) must hold integers ({err})") from err
    if suffix in {".txt", ".csv", ".ids"}:
        try:
            return np.loadtxt(source, dtype=np.int64, ndmin=1, comments="#")
        except ValueError as err:
            raise IdListError(f"{path}: expected one integer sample id per line ({err})") from err
    raise IdListError(f"{path}: unknown id list format {suffix!r} (use .pth, .parquet or .txt)")


def load_sample_ids(
    path: str | Path, parts: list[int] | None = None, trust_pickle: bool = False
) -> np.ndarray:
    """Return the sorted unique sample ids of an id list (.pth, .parquet, .txt/.csv), local or at
    any fsspec URL (``s3://``, ``gs://``: read through the storage layer's credentials)."""
    return sorted_unique(_ids_from_container(_read_id_list(path, parts, trust_pickle), parts, str(path)))


def _readable(path: str | Path) -> Path | io.BytesIO:
    """A local path as it is; a remote file's bytes (an id list is read whole anyway)."""
    if not is_remote(str(path)):
        return Path(path)
    with open_url(str(path)) as handle:
        return io.BytesIO(handle.read())


class IdIndexKey(StrictModel):
    """What an id index is made from; any change is a new index in a new folder, so a folder's
    files never change once its marker exists (a worker's stale local mirror cannot mislead it)."""

    source: str = Field(description="the id list (select.ids)")
    stamp: str = Field(description="its size and modification time (or ETag) when it was indexed")
    id_parts: list[int] | None
    inputs: int = Field(ge=0, description="metadata files the layout was chosen for")

    @classmethod
    def of(cls, source: str, id_parts: list[int] | None, inputs: int) -> IdIndexKey:
        """Stats the id list: one request, and no read of its 400 MB."""
        fs, path = url_to_fs(source)
        info = fs.info(path)
        stamp = info.get("mtime") or info.get("ETag") or info.get("LastModified")
        return cls(source=source, stamp=f"{info['size']}:{stamp}", id_parts=id_parts, inputs=inputs)

    def folder(self, root: Path) -> Path:
        digest = hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]
        return Path(root) / ID_INDEX_DIR / digest


class IdIndex(StrictModel):
    """A built id index, the content of its ``index.json``: sorted unique int64 ids in
    ``part-NNNNN.npy`` per chosen part (metadata file i <-> id part i), or in one ``all.npy``."""

    key: IdIndexKey
    per_part: bool
    counts: dict[str, int] = Field(description="file name -> ids in it: the files of the index")

    def path_for(self, root: Path, unit: int) -> Path | None:
        """The file metadata file ``unit`` is matched against; None: a part left out (no ids)."""
        name = _id_part_file(unit) if self.per_part else FLAT_ID_FILE
        return self.key.folder(root) / name if name in self.counts else None

    def load(self, root: Path, unit: int) -> np.ndarray:
        """That file memory-mapped: a binary search reads the pages it visits, never the list."""
        path = self.path_for(root, unit)
        return np.empty(0, dtype=np.int64) if path is None else np.load(path, mmap_mode="r")

    def paths(self, root: Path) -> list[Path]:
        return [self.key.folder(root) / name for name in sorted(self.counts)]


def _id_part_file(part: int) -> str:
    return f"part-{part:05d}.npy"


def build_id_index(key: IdIndexKey, root: Path, trust_pickle: bool = False) -> IdIndex:
    """The index ``key`` names under run folder ``root``, built unless complete (its marker).

    Each part is sorted alone (1.5M ids: milliseconds; the whole list is never sorted for a
    per-part layout, and a flat index of a per-part list merges the sorted parts). Files are
    written atomically and deterministically, the marker last, so workers that build the same
    index at once write the same bytes and a killed build is redone.
    """
    folder = key.folder(root)
    marker = folder / ID_INDEX_MARKER
    if marker.exists():
        return IdIndex.model_validate_json(marker.read_bytes())
    container = _read_id_list(key.source, key.id_parts, trust_pickle)
    split = _split_parts(container, key.source)
    per_part = split is not None and list(split) == list(range(key.inputs))
    if split is not None and not per_part:
        log.warning(
            "select.ids %s has %d parts but select.metadata has %d files: every file is matched "
            "against one index of all chosen parts (file i <-> part i needs parts 0..%d)",
            key.source,
            len(split),
            key.inputs,
            key.inputs - 1,
        )
    parts = _id_parts(container, key.id_parts, key.source)
    if per_part:
        counts = {
            _id_part_file(n): _save_ids(folder / _id_part_file(n), sorted_unique(ids)) for n, ids in parts
        }
    else:
        runs = [sorted_unique(ids) for _, ids in parts]
        merged = runs[0] if len(runs) == 1 else sorted_unique(_concat(runs), kind="stable")
        counts = {FLAT_ID_FILE: _save_ids(folder / FLAT_ID_FILE, merged)}
    index = IdIndex(key=key, per_part=per_part, counts=counts)
    write_json_atomic(marker, index.model_dump(mode="json"))  # the completion marker, last
    return index


def _save_ids(path: Path, ids: np.ndarray) -> int:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, ids, allow_pickle=False)
    return len(ids)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Globs (local, or any fsspec URL) -> a sorted, de-duplicated file list; the order defines
    each input's index."""
    files: set[str] = set()
    for pattern in patterns:
        if is_remote(pattern):
            fs, path = url_to_fs(pattern)
            matches = [fs.unstrip_protocol(p) for p in fs.glob(path)]
        else:
            matches = glob.glob(pattern)
        if not matches:
            raise FileNotFoundError(f"select.metadata: nothing matches {pattern!r}")
        files.update(matches)
    return sorted(files)


class SelectStage(Stage):
    """Streams one metadata file and writes its url shards."""

    name = "select"
    status_record = BlockedRow  # the rows a blocklist removed, each with the list that matched

    def __init__(self, config: SelectConfig, metadata_files: list[str]):
        self.config = config
        self.metadata_files = metadata_files
        self.index: IdIndex | None = None  # set by prepare() on the driver, else by the first unit
        self.sample_ids: np.ndarray | None = None  # sorted ids in memory, used instead of config.ids

    def prepare(self, store: RunStore) -> None:
        """Driver, before any worker starts: the id index, built once (or taken from the store,
        where an earlier run left it), uploaded with its marker last for the workers of an
        object-store run; older indexes of the run folder removed. Workers then get it with the
        pickled stage and fetch only their unit's file."""
        key = self._index_key()
        marker = key.folder(store.local) / ID_INDEX_MARKER
        store.fetch_completed(marker, lambda _: [])  # the marker only: each worker fetches its file
        self.index = build_id_index(key, store.local, self.config.trust_id_pickle)
        store.push_completed(marker, *self.index.paths(store.local))
        for older in marker.parent.parent.iterdir():
            if older != marker.parent:
                shutil.rmtree(older)

    def _index_key(self) -> IdIndexKey:
        return IdIndexKey.of(self.config.ids, self.config.id_parts, len(self.metadata_files))

    def _unit_ids(self, unit: int) -> np.ndarray:
        """The sorted ids metadata file ``unit`` is matched against."""
        if self.sample_ids is not None:
            return self.sample_ids
        if self.index is None:  # no driver prepared it (a stage run on its own): build or reuse it
            self.index = build_id_index(self._index_key(), self.root, self.config.trust_id_pickle)
        return self.index.load(self.root, unit)

    @cached_property
    def blocklists(self) -> Blocklists:
        """The SAMPLE_ID, url and domain lists, read once per worker."""
        return Blocklists(self.config.blocklist, ROW_BLOCKLISTS)

    @property
    def urls_dir(self) -> Path:
        return self.root / "urls"

    def folders(self) -> list[Path]:
        return [self.urls_dir]

    def marker(self, unit: int) -> Path:
        return self.urls_dir / f"_select-{unit:05d}.json"

    def status_table(self, unit: int) -> Path:
        return self.urls_dir / f"_blocked-{unit:05d}.parquet"

    def outputs(self, unit: int, stats: dict) -> list[Path]:
        return [
            *(url_shard_path(self.urls_dir, shard_id) for shard_id in stats["shards"]),
            self.status_table(unit),
        ]

    def inputs(self, unit: int) -> list[Path]:
        """The unit's file of the driver's id index (fetched from the store in an object-store run)."""
        path = None if self.index is None else self.index.path_for(self.root, unit)
        return [] if path is None else [path]

    def process(self, unit: int) -> UnitResult:
        path = self.metadata_files[unit]
        counts: Counter[str] = Counter()
        shard_ids: list[int] = []
        self.blocked: list[dict] = []
        for chunk_index, rows in enumerate(self._chunks(path, self._unit_ids(unit), counts)):
            if chunk_index >= self.config.max_shards_per_input:
                raise ValueError(
                    f"{path} yields more than select.max_shards_per_input={self.config.max_shards_per_input} "
                    "shards: raise it or select.samples_per_shard"
                )
            shard_id = unit * self.config.max_shards_per_input + chunk_index
            write_parquet_atomic(url_shard_path(self.urls_dir, shard_id), rows, URL_SHARD_SCHEMA)
            shard_ids.append(shard_id)
        profile = ProfileBuilder()
        for row in self.blocked:
            profile.count("blocked_rows_by_list", row["blocklist"])
        stats = {"input": str(path), "input_index": unit, "shards": shard_ids, "counts": dict(counts)}
        return UnitResult({**stats, "profile": profile.build()}, self.blocked)

    def counters(self, stats: dict) -> dict[str, int]:
        return stats["counts"]

    def downstream(self, unit: int, stats: dict) -> list[int]:
        return stats["shards"]

    def _chunks(self, path: str, sample_ids: np.ndarray, counts: Counter[str]) -> Iterator[pa.Table]:
        """The kept rows in url shards of ``samples_per_shard``, held as Arrow (a shard of 10,000
        rows as Python dicts took about 35 MB more of a select worker's peak)."""
        pending = URL_SHARD_SCHEMA.empty_table()
        for batch in self._batches(path):
            counts["rows_read"] += batch.num_rows
            kept = self._filter(batch, sample_ids, counts).rename_columns(list(URL_SHARD_SCHEMA.names))
            pending = pa.concat_tables([pending, pa.Table.from_batches([kept]).cast(URL_SHARD_SCHEMA)])
            while pending.num_rows >= self.config.samples_per_shard:
                yield pending.slice(0, self.config.samples_per_shard)
                pending = pending.slice(self.config.samples_per_shard)
        if pending.num_rows:
            yield pending

    def _batches(self, path: str) -> Iterator[pa.RecordBatch]:
        """The file's LAION columns in batches; a file that is not readable parquet, or whose
        columns do not cast to ours, is a ValueError naming it (pyarrow's own errors do not)."""
        try:
            parquet = pq.ParquetFile(open_url(path) if is_remote(path) else path)
            missing = set(LAION_COLUMNS) - set(parquet.schema_arrow.names)
            if missing:
                raise ValueError(f"not LAION-400M metadata, missing columns {sorted(missing)}")
            for batch in parquet.iter_batches(batch_size=self.config.batch_rows, columns=list(LAION_COLUMNS)):
                yield pa.RecordBatch.from_arrays(
                    [
                        batch.column(name).cast(URL_SHARD_SCHEMA.field(field).type)
                        for name, field in LAION_COLUMNS.items()
                    ],
                    names=list(LAION_COLUMNS),
                )
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ValueError(f"select.metadata {path}: {err}") from None

    def _filter(self, batch: pa.RecordBatch, sample_ids: np.ndarray, counts: Counter[str]) -> pa.RecordBatch:
        """Keep id-list members, then apply each filter in turn, counting what each one drops."""
        ids = batch.column("SAMPLE_ID").fill_null(-1).to_numpy(zero_copy_only=False)
        batch = self._keep(batch, pa.array(is_member(sample_ids, ids)), "not_in_id_list", counts)
        if self.blocklists:
            batch = self._keep(batch, pa.array(self._unblocked(batch)), "blocklisted", counts)
        config = self.config
        if config.min_width or config.min_height:
            big_enough = pc.and_(
                pc.greater_equal(pc.fill_null(batch.column("WIDTH"), 0), config.min_width),
                pc.greater_equal(pc.fill_null(batch.column("HEIGHT"), 0), config.min_height),
            )
            batch = self._keep(batch, big_enough, "filtered_size", counts)
        if config.nsfw is not None:
            allowed = pc.fill_null(pc.is_in(batch.column("NSFW"), pa.array(config.nsfw)), False)
            batch = self._keep(batch, allowed, "filtered_nsfw", counts)
        if config.min_similarity is not None:
            similar = pc.fill_null(pc.greater_equal(batch.column("similarity"), config.min_similarity), False)
            batch = self._keep(batch, similar, "filtered_similarity", counts)
        counts["selected"] += batch.num_rows
        return batch

    def _unblocked(self, batch: pa.RecordBatch) -> list[bool]:
        """False for each row a SAMPLE_ID, url or domain list names (recorded with its list)."""
        keep = []
        for sample_id, url in zip(
            batch.column("SAMPLE_ID").to_pylist(), batch.column("URL").to_pylist(), strict=True
        ):
            name = self.blocklists.match_row(sample_id, url)
            if name is not None:
                self.blocked.append(
                    BlockedRow(sample_id=sample_id, url=url, blocklist=name).model_dump(mode="json")
                )
            keep.append(name is None)
        return keep

    @staticmethod
    def _keep(batch: pa.RecordBatch, mask: pa.Array, reason: str, counts: Counter[str]) -> pa.RecordBatch:
        kept = batch.filter(mask)
        counts[reason] += batch.num_rows - kept.num_rows
        return kept


def is_member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each of ``ids`` is in ``sorted_ids`` (sorted, unique; a memory map is searched in
    place: ``ids`` are int64 like it, so numpy never casts, i.e. copies, the whole array)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), dtype=bool)
    position = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return np.asarray(sorted_ids[position] == ids)


def url_shard_path(urls_dir: Path, shard_id: int) -> Path:
    return Path(urls_dir) / f"part-{shard_id:05d}.parquet"
