"""Select stage: LAION-400M metadata parquets + the LAION-Face id list -> url shards.

Each metadata file is streamed batch by batch (never a whole 400M-row part in memory); a row is
kept when its SAMPLE_ID is in the id list and it passes the optional filters. Kept rows are cut
into url shards ``urls/part-NNNNN.parquet`` whose shard id is ``input_index * max_shards_per_input
+ chunk``, so every input file is an independent, parallel and deterministic unit of work.
A marker ``urls/_select-NNNNN.json`` written last records the shards and the row counts of that
input file: it is the completion marker a rerun trusts. Unit of work: one metadata file (its index
in the sorted input list); downstream units: the url shards it wrote.
"""

from __future__ import annotations

import glob
import io
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
from facemllm.pipeline.core.files import write_parquet_atomic
from facemllm.pipeline.core.profile import ProfileBuilder
from facemllm.pipeline.core.storage import is_remote, open_url, url_to_fs
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


class SelectConfig(StrictModel):
    """LAION-400M metadata + LAION-Face id list -> url shards."""

    metadata: list[str] = Field(description="LAION-400M metadata parquet files (globs allowed)")
    ids: str = Field(description="LAION-Face id list: .pth as published, .parquet (SAMPLE_ID) or .txt")
    id_parts: list[int] | None = Field(None, description="parts of the id list to use; None = all")
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


def _ids_from_container(obj: object, parts: list[int] | None, where: str = "id list") -> np.ndarray:
    """Flatten the containers LAION-Face's .pth has been seen in: per-part lists, tuples, dicts
    (part -> ids), tensors, numpy arrays, sets; or a flat collection of ids."""
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
    if isinstance(obj, dict):
        try:
            keys = sorted(obj)
        except TypeError as err:
            raise IdListError(
                f"{where}: keys are neither all part numbers nor all sample ids ({err})"
            ) from err
        if all(isinstance(k, int) for k in keys) and _looks_like_parts(obj.values()):
            chosen = keys if parts is None else [k for k in keys if k in set(parts)]
            return _concat([_ids_from_container(obj[k], None, f"{where}[{k}]") for k in chosen])
        return _ids_from_container(list(keys), None, where)  # a dict keyed by sample id
    if isinstance(obj, list | tuple | set | frozenset):
        items = list(obj)
        if items and _looks_like_parts(items):
            chosen = range(len(items)) if parts is None else [p for p in parts if 0 <= p < len(items)]
            return _concat([_ids_from_container(items[p], None, f"{where}[{p}]") for p in chosen])
        try:
            return np.asarray(sorted(items) if isinstance(obj, set | frozenset) else items, dtype=np.int64)
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


def load_sample_ids(
    path: str | Path, parts: list[int] | None = None, trust_pickle: bool = False
) -> np.ndarray:
    """Return the sorted unique sample ids of an id list (.pth, .parquet, .txt/.csv), local or at
    any fsspec URL (``s3://``, ``gs://``: read through the storage layer's credentials)."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    source = _readable(path)
    if suffix in {".pth", ".pt"}:
        import torch

        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for refused globals
            if not trust_pickle:
                raise IdListError(
                    f"{path}: torch's safe loader refused it ({err.__class__.__name__}); if you trust the "
                    "file, set select.trust_id_pickle=true"
                ) from err
            obj = torch.load(_readable(path), map_location="cpu", weights_only=False)
        ids = _ids_from_container(obj, parts, str(path))
    elif suffix == ".parquet":
        table = pq.read_table(source)
        column = next((c for c in ("SAMPLE_ID", "sample_id") if c in table.column_names), None)
        if column is None:
            raise IdListError(f"{path}: no SAMPLE_ID column (has {table.column_names})")
        try:  # nulls are no ids; floats and strings cast only when they hold whole numbers
            if parts is not None and "part" in table.column_names:
                table = table.filter(pc.is_in(table["part"], pa.array(parts, pa.int64())))
            ids = table[column].drop_null().cast(pa.int64()).to_numpy()
        except pa.ArrowException as err:
            raise IdListError(f"{path}: {column} (and part) must hold integers ({err})") from err
    elif suffix in {".txt", ".csv", ".ids"}:
        try:
            ids = np.loadtxt(source, dtype=np.int64, ndmin=1, comments="#")
        except ValueError as err:
            raise IdListError(f"{path}: expected one integer sample id per line ({err})") from err
    else:
        raise IdListError(f"{path}: unknown id list format {suffix!r} (use .pth, .parquet or .txt)")
    return np.unique(ids)


def _readable(path: str | Path) -> Path | io.BytesIO:
    """A local path as it is; a remote file's bytes (an id list is read whole anyway)."""
    if not is_remote(str(path)):
        return Path(path)
    with open_url(str(path)) as handle:
        return io.BytesIO(handle.read())


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

    def setup(self) -> None:
        self.sample_ids = load_sample_ids(self.config.ids, self.config.id_parts, self.config.trust_id_pickle)

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

    def process(self, unit: int) -> UnitResult:
        path = self.metadata_files[unit]
        counts: Counter[str] = Counter()
        shard_ids: list[int] = []
        self.blocked: list[dict] = []
        for chunk_index, rows in enumerate(self._chunks(path, counts)):
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

    def _chunks(self, path: str, counts: Counter[str]) -> Iterator[list[dict]]:
        pending: list[dict] = []
        for batch in self._batches(path):
            counts["rows_read"] += batch.num_rows
            kept = self._filter(batch, counts)
            pending.extend(kept.rename_columns(list(URL_SHARD_SCHEMA.names)).to_pylist())
            while len(pending) >= self.config.samples_per_shard:
                yield pending[: self.config.samples_per_shard]
                pending = pending[self.config.samples_per_shard :]
        if pending:
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

    def _filter(self, batch: pa.RecordBatch, counts: Counter[str]) -> pa.RecordBatch:
        """Keep id-list members, then apply each filter in turn, counting what each one drops."""
        ids = batch.column("SAMPLE_ID").fill_null(-1).to_numpy(zero_copy_only=False)
        position = np.searchsorted(self.sample_ids, ids).clip(max=max(len(self.sample_ids) - 1, 0))
        member = self.sample_ids[position] == ids if len(self.sample_ids) else np.zeros(len(ids), bool)
        batch = self._keep(batch, pa.array(member), "not_in_id_list", counts)
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


def url_shard_path(urls_dir: Path, shard_id: int) -> Path:
    return Path(urls_dir) / f"part-{shard_id:05d}.parquet"
