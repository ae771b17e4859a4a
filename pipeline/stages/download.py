"""Download stage: one url shard -> ``images/NNNNN.tar .parquet _stats.json`` with img2dataset.

img2dataset's own ``Downloader`` and ``Resizer`` do the work (no reimplementation); this module
only makes them safe to retry and kill:

- img2dataset writes its files in place, so it runs in a private temporary folder and the results
  are moved into ``images/`` afterwards, the stats file last: the stats file is the completion
  marker, as in img2dataset's incremental mode, and a rerun skips shards that have one.
- its tar is in download-completion order with wall-clock mtimes; it is rewritten in key order
  with fixed headers so that a rerun produces the same bytes.
- its status parquet gets a row for every input row (a row it lost is added as a failure).

Unit of work: url shard N (``urls/part-NNNNN.parquet``) -> ``images/NNNNN.*``.
- downloads go through an opener that refuses private, loopback and link-local destinations,
  redirects included, unless the config allows them; OpenCV's decoder is bounded so a file that
  declares a huge size fails instead of allocating gigabytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from facemllm.pipeline.core.blocklist import Blocklists, BlocklistSource
from facemllm.pipeline.core.profile import ProfileBuilder, domain, reason
from facemllm.pipeline.core.shards import SHARD_ID_DIGITS, repack_sorted, shard_paths
from facemllm.pipeline.stages.framework import ShardOutputStage, StreamingSource, UnitResult
from facemllm.pipeline.stages.netguard import DestinationPolicy, install_guarded_opener
from facemllm.pipeline.stages.select import url_shard_path
from facemllm.schemas import StrictModel

# url-shard column -> the name img2dataset receives and keeps in each sample's json
# (LAION's own names, as the reference LAION-Face download keeps them).
IMG2DATASET_COLUMNS = {
    "sample_id": "SAMPLE_ID",
    "license": "LICENSE",
    "nsfw": "NSFW",
    "similarity": "similarity",
    "text": "caption",
    "url": "url",
}
OOM_SHARD_COUNT = SHARD_ID_DIGITS  # img2dataset names its shards with this many digits
WORK_DIR = "_tmp"  # img2dataset's private folders under images/


class DownloadConfig(StrictModel):
    """img2dataset's Downloader and Resizer settings (its own names where it has them)."""

    thread_count: int = Field(32, gt=0)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0)
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = "no"
    image_size: int = Field(256, gt=0)
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    max_image_pixels: int = Field(
        8192 * 8192, gt=0, description="decompression-bomb bound applied before OpenCV decodes"
    )
    user_agent_token: str | None = "facemllm"
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    destinations: DestinationPolicy = DestinationPolicy()
    max_requests_per_second: float | None = Field(
        None, gt=0, description="per worker process, redirects included; overall: this times the workers"
    )


def bound_decoder_pixels(max_pixels: int) -> None:
    """Bound what OpenCV will decode; worker processes inherit the setting from the environment.

    OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 is imported, so this must run before
    anything imports cv2 in the process (the run config deliberately does not).
    """
    previous = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks for updates online
    if "cv2" in sys.modules and previous != str(max_pixels):
        logging.getLogger(__name__).warning(
            "cv2 was imported before the decoder bound was set: this process keeps the bound it "
            "had then (%s pixels)",
            previous or "2**30, OpenCV's default",
        )


class DownloadStage(ShardOutputStage, StreamingSource):
    """Runs img2dataset on one url shard, atomically and idempotently."""

    name = "download"
    output_dir = "images"

    def __init__(self, config: DownloadConfig, samples_per_shard: int, blocklist: list[BlocklistSource] = ()):
        self.config = config
        self.samples_per_shard = samples_per_shard
        self.blocklist = list(blocklist)

    @cached_property
    def blocklists(self) -> Blocklists:
        """The image sha256 lists, read once per worker."""
        return Blocklists(self.blocklist, ["sha256"])

    def setup(self) -> None:
        config = self.config
        bound_decoder_pixels(config.max_image_pixels)
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import WebDatasetSampleWriter

        install_guarded_opener(config.destinations, config.max_requests_per_second)
        resizer = Resizer(
            image_size=config.image_size,
            resize_mode=config.resize_mode,
            resize_only_if_bigger=config.resize_only_if_bigger,
            encode_quality=config.encode_quality,
            encode_format=config.encode_format,
            skip_reencode=True,
            min_image_size=config.min_image_size,
            max_image_area=config.max_image_pixels,
            max_aspect_ratio=config.max_aspect_ratio,
        )
        self.column_list = list(IMG2DATASET_COLUMNS.values())
        self._make_downloader = lambda output_folder, on_sample: Downloader(
            sample_writer_class=tapped_writer(WebDatasetSampleWriter, on_sample),
            resizer=resizer,
            thread_count=config.thread_count,
            save_caption=True,
            extract_exif=False,
            output_folder=output_folder,
            column_list=self.column_list,
            timeout=config.timeout,
            number_sample_per_shard=self.samples_per_shard,
            oom_shard_count=OOM_SHARD_COUNT,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=config.encode_format,
            retries=config.retries,
            user_agent_token=config.user_agent_token,
            disallowed_header_directives=config.disallowed_header_directives,
        )

    def inputs(self, unit: int) -> list[Path]:
        return [url_shard_path(self.root / "urls", unit)]

    def process(self, unit: int, on_sample: Callable[[str, bytes, dict], None] | None = None) -> UnitResult:
        """img2dataset in a private folder; its tar repacked in key order, its status completed.
        ``on_sample`` gets each image the shard will hold (a blocklisted one never), as written."""
        url_shard = self.inputs(unit)[0]
        work = self.root / "images" / WORK_DIR / f"{unit:05d}-{uuid.uuid4().hex[:8]}"
        work.mkdir(parents=True)
        try:
            rows = pq.read_table(url_shard)
            feather = work / "input.feather"
            table = rows.select(list(IMG2DATASET_COLUMNS)).rename_columns(self.column_list)
            with pa.OSFile(str(feather), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            if on_sample is not None and self.blocklists:
                on_sample = self._unless_blocked(on_sample)
            ok, _ = self._make_downloader(str(work), on_sample)((unit, str(feather)))
            if not ok:
                raise RuntimeError(f"img2dataset failed on url shard {unit} ({url_shard}); see the log above")
            produced = shard_paths(work, unit)
            statuses = self._complete_status(produced["parquet"], unit, table)
            statuses, blocked = self._block(statuses)
            repack_sorted(produced["tar"], self.paths(unit)["tar"], leave_out=blocked)
            stats = json.loads(produced["stats"].read_bytes())
            if blocked:
                stats.update(successes=stats["successes"] - len(blocked), blocklisted=len(blocked))
            stats["profile"] = download_profile(statuses)
            return UnitResult(stats, statuses)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _complete_status(self, produced: Path, shard_id: int, inputs: pa.Table) -> pa.Table:
        """img2dataset's status rows sorted by key, with a failure row for any input it lost."""
        status = pq.read_table(produced)
        rows = {row["key"]: row for row in status.to_pylist()}
        digits = math.ceil(math.log10(self.samples_per_shard))
        for index, source in enumerate(inputs.to_pylist()):
            key = f"{(10**digits) * shard_id + index:0{digits + OOM_SHARD_COUNT}d}"
            if key not in rows:
                rows[key] = {
                    **{name: None for name in status.column_names},
                    **source,
                    "key": key,
                    "status": "failed_to_download",
                    "error_message": "lost by img2dataset (no status row written)",
                }
        return pa.Table.from_pylist([rows[key] for key in sorted(rows)], status.schema)

    def _unless_blocked(
        self, on_sample: Callable[[str, bytes, dict], None]
    ) -> Callable[[str, bytes, dict], None]:
        def forward(key: str, data: bytes, meta: dict) -> None:
            if self.blocklists.match_sha256(meta.get("sha256")) is None:
                on_sample(key, data, meta)

        return forward

    def _block(self, statuses: pa.Table) -> tuple[pa.Table, set[str]]:
        """Status rows with every image whose sha256 is on a list marked ``blocklisted`` (naming
        the list), and the keys of those images, which are left out of the shard."""
        if not self.blocklists:
            return statuses, set()
        rows, blocked = statuses.to_pylist(), set()
        for row in rows:
            name = self.blocklists.match_sha256(row.get("sha256")) if row["status"] == "success" else None
            if name is not None:
                row.update(status="blocklisted", error_message=f"blocklist {name}")
                blocked.add(row["key"])
        return pa.Table.from_pylist(rows, statuses.schema), blocked

    def counters(self, stats: dict) -> dict[str, int]:
        names = ("successes", "failed_to_download", "failed_to_resize", "blocklisted")
        return {name: stats.get(name, 0) for name in names}

    def clean(self) -> None:
        shutil.rmtree(self.root / "images" / WORK_DIR, ignore_errors=True)


def tapped_writer(writer_class: type, on_sample: Callable[[str, bytes, dict], None] | None) -> type:
    """img2dataset's sample writer, also handing each image it writes to ``on_sample`` with its
    metadata as the tar's json holds it."""
    if on_sample is None:
        return writer_class

    class TappedWriter(writer_class):
        def write(self, img_str, key, caption, meta):
            super().write(img_str, key, caption, meta)
            if img_str is not None:
                on_sample(key, img_str, json.loads(json.dumps(meta)))

    return TappedWriter


def download_profile(statuses: pa.Table) -> dict:
    """The report's view of one shard: every status, failures by reason and by domain, and the
    size of each image as served."""
    profile = ProfileBuilder()
    for row in statuses.to_pylist():
        profile.count("download_status", row["status"])
        if row["status"] == "success":
            profile.observe("image_width", row.get("original_width") or row.get("width"))
            profile.observe("image_height", row.get("original_height") or row.get("height"))
        elif row["status"] == "blocklisted":
            profile.count("blocked_images_by_list", row["error_message"].removeprefix("blocklist "))
        else:
            profile.count("download_failure_reason", reason(row["error_message"]))
            profile.count("download_failure_domain", domain(row["url"]))
    return profile.build()
