"""Download stage: one url shard -> ``images/NNNNN.tar .parquet _stats.json`` with img2dataset.

img2dataset's own ``Downloader`` and ``Resizer`` do the work (no reimplementation); this module
only makes them safe to retry and kill:

- img2dataset writes its files in place, so it runs in a private temporary folder and the results
  are moved into ``images/`` afterwards, the stats file last: the stats file is the completion
  marker, as in img2dataset's incremental mode, and a rerun skips shards that have one.
- its tar is in download-completion order with wall-clock mtimes; it is rewritten in key order
  with fixed headers so that a rerun produces the same bytes.
- its status parquet gets a row for every input row (a row it lost is added as a failure).
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
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from facemllm.pipeline.config import DownloadConfig
from facemllm.pipeline.core.files import write_bytes_atomic, write_parquet_atomic
from facemllm.pipeline.core.shards import SHARD_ID_DIGITS, repack_sorted, shard_paths
from facemllm.pipeline.netguard import install_guarded_opener

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


class ImageShardDownloader:
    """Runs img2dataset on one url shard, atomically and idempotently (plain class, no Beam)."""

    def __init__(self, config: DownloadConfig, images_dir: Path, samples_per_shard: int):
        bound_decoder_pixels(config.max_image_pixels)
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import WebDatasetSampleWriter

        install_guarded_opener(config.destinations)
        self.config = config
        self.images_dir = Path(images_dir)
        self.samples_per_shard = samples_per_shard
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
        self._make_downloader = lambda output_folder: Downloader(
            sample_writer_class=WebDatasetSampleWriter,
            resizer=resizer,
            thread_count=config.thread_count,
            save_caption=True,
            extract_exif=False,
            output_folder=output_folder,
            column_list=self.column_list,
            timeout=config.timeout,
            number_sample_per_shard=samples_per_shard,
            oom_shard_count=OOM_SHARD_COUNT,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=config.encode_format,
            retries=config.retries,
            user_agent_token=config.user_agent_token,
            disallowed_header_directives=config.disallowed_header_directives,
        )

    def is_done(self, shard_id: int) -> bool:
        return shard_paths(self.images_dir, shard_id)["stats"].exists()

    def download(self, shard_id: int, url_shard: Path) -> dict:
        """Download one shard unless already complete; return its stats (img2dataset's)."""
        final = shard_paths(self.images_dir, shard_id)
        if final["stats"].exists():
            return json.loads(final["stats"].read_text())
        work = self.images_dir / "_tmp" / f"{shard_id:05d}-{uuid.uuid4().hex[:8]}"
        work.mkdir(parents=True)
        try:
            rows = pq.read_table(url_shard)
            feather = work / "input.feather"
            table = rows.select(list(IMG2DATASET_COLUMNS)).rename_columns(self.column_list)
            with pa.OSFile(str(feather), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            ok, _ = self._make_downloader(str(work))((shard_id, str(feather)))
            if not ok:
                raise RuntimeError(
                    f"img2dataset failed on url shard {shard_id} ({url_shard}); see the log above"
                )
            produced = shard_paths(work, shard_id)
            repack_sorted(produced["tar"], final["tar"])
            self._complete_status(produced["parquet"], final["parquet"], shard_id, table)
            stats_bytes = produced["stats"].read_bytes()
            write_bytes_atomic(final["stats"], stats_bytes)  # completion marker, last
            return json.loads(stats_bytes)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _complete_status(self, produced: Path, final: Path, shard_id: int, inputs: pa.Table) -> None:
        """Sort img2dataset's status rows by key and add a failure row for any input it lost."""
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
        write_parquet_atomic(final, [rows[key] for key in sorted(rows)], status.schema)
