"""The acquisition pipeline: select -> download -> faces, as Beam stages.

Each stage is a DoFn that adapts one plain class (``LaionFaceSelector``, ``ImageShardDownloader``,
``FaceShardProcessor``): set up once per worker, process one shard, count metrics. Shards move
between stages as ids; each stage's completion markers make a retried bundle or a rerun after a
kill skip finished shards and redo partial ones. When the pipeline has finished, the driver
writes ``manifest.json`` (the commit point) and ``sizes.json`` from what is on disk.

``out`` may be an object-store URL: stages then write into a local mirror as usual and
``RunStore`` uploads each finished shard with its completion marker last, fetches inputs and
finished shards that other workers (or an earlier run) left in the store, and the driver uploads
the manifest last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics

from facemllm.pipeline.config import RunConfig
from facemllm.pipeline.core.manifest import SHARD_STAGES, write_run_manifest
from facemllm.pipeline.core.shards import shard_paths
from facemllm.pipeline.core.storage import RunStore, local_folder
from facemllm.pipeline.runners import make_runner, pipeline_options

METRICS_NAMESPACE = "facemllm"


class SelectDoFn(beam.DoFn):
    def __init__(self, config: RunConfig):
        self.config = config

    def setup(self):
        from facemllm.pipeline.select import LaionFaceSelector, load_sample_ids

        select = self.config.select
        ids = load_sample_ids(select.ids, select.id_parts, select.trust_id_pickle)
        self.store = RunStore(self.config.out)
        self.selector = LaionFaceSelector(select, ids, self.store.local / "urls")

    def process(self, indexed_input: tuple[int, str]):
        from facemllm.pipeline.select import url_shard_path

        marker = self.selector.marker_path(indexed_input[0])
        self.store.fetch_completed(marker)
        result = self.selector.select_file(*indexed_input)
        url_shards = [url_shard_path(self.selector.urls_dir, shard_id) for shard_id in result["shards"]]
        self.store.push_completed(marker, *url_shards)
        for reason, count in result["counts"].items():
            Metrics.counter(METRICS_NAMESPACE, f"select_{reason}").inc(count)
        for shard_id, path in zip(result["shards"], url_shards, strict=True):
            yield shard_id, str(path)


class DownloadDoFn(beam.DoFn):
    def __init__(self, config: RunConfig):
        self.config = config

    def setup(self):
        from facemllm.pipeline.download import ImageShardDownloader

        self.store = RunStore(self.config.out)
        self.downloader = ImageShardDownloader(
            self.config.download, self.store.local / "images", self.config.select.samples_per_shard
        )

    def process(self, shard: tuple[int, str]):
        from facemllm.pipeline.select import url_shard_path

        shard_id = shard[0]
        url_shard = url_shard_path(self.store.local / "urls", shard_id)  # this worker's copy
        marker, *files = shard_files(self.store.local / "images", shard_id)
        self.store.fetch_completed(marker, *files)
        skipped = self.downloader.is_done(shard_id)
        if not skipped:
            self.store.fetch(url_shard)
        stats = self.downloader.download(shard_id, url_shard)
        self.store.push_completed(marker, *files)
        if not skipped:
            for name in ("successes", "failed_to_download", "failed_to_resize"):
                Metrics.counter(METRICS_NAMESPACE, f"download_{name}").inc(stats.get(name, 0))
        Metrics.counter(METRICS_NAMESPACE, "download_shards_skipped" if skipped else "download_shards").inc()
        yield shard_id


class FacesDoFn(beam.DoFn):
    def __init__(self, config: RunConfig):
        self.config = config

    def setup(self):
        from facemllm.pipeline.download import bound_decoder_pixels
        from facemllm.pipeline.faces import FaceShardProcessor

        bound_decoder_pixels(self.config.download.max_image_pixels)
        self.store = RunStore(self.config.out)
        self.processor = FaceShardProcessor(self.config.faces, self.store.local / "faces")

    def process(self, shard_id: int):
        marker, *files = shard_files(self.store.local / "faces", shard_id)
        self.store.fetch_completed(marker, *files)
        skipped = self.processor.is_done(shard_id)
        image_tar = shard_paths(self.store.local / "images", shard_id)["tar"]
        if not skipped:
            self.store.fetch(image_tar)
        stats = self.processor.process(shard_id, image_tar)
        self.store.push_completed(marker, *files)
        if not skipped:
            Metrics.counter(METRICS_NAMESPACE, "faces_kept").inc(stats["faces"])
            for status, count in stats["status"].items():
                Metrics.counter(METRICS_NAMESPACE, f"faces_images_{status}").inc(count)
        yield shard_id


def shard_files(stage_dir: Path, shard_id: int) -> list[Path]:
    """A stage's shard as a unit of work: its completion marker, then the files it marks complete."""
    paths = shard_paths(stage_dir, shard_id)
    return [paths["stats"], paths["tar"], paths["parquet"]]


def sync_completed(store: RunStore) -> None:
    """For an object-store ``out``: bring the store's completed work into the local mirror and
    upload the mirror's completed work the store lacks (driver only; nothing to do for a local out)."""
    if store.remote is None:
        return
    fetches = [
        [path] for path in store.in_store("urls/_select-*.json") + store.in_store("urls/part-*.parquet")
    ]
    pushes = []
    for stage in SHARD_STAGES:
        local = set((store.local / stage).glob("*_stats.json"))
        remote = set(store.in_store(f"{stage}/*_stats.json"))
        fetches += [shard_files(m.parent, int(m.name.split("_")[0])) for m in sorted(remote - local)]
        pushes += [shard_files(m.parent, int(m.name.split("_")[0])) for m in sorted(local - remote)]
    store.remote.parallel(fetches, lambda unit: store.fetch_completed(*unit), "fetch finished shards")
    store.remote.parallel(pushes, lambda unit: store.push_completed(*unit), "upload finished shards")


def existing_url_shards(out: Path) -> list[tuple[int, str]]:
    return [(int(p.stem.split("-")[1]), str(p)) for p in sorted((out / "urls").glob("part-*.parquet"))]


def clean_stale_temporaries(out: Path) -> None:
    """Remove what killed workers left half-written; only the driver calls this, before any worker."""
    shutil.rmtree(out / "images" / "_tmp", ignore_errors=True)
    for stray in out.glob("*/.*.tmp-*"):
        stray.unlink(missing_ok=True)


def build(pipeline: beam.Pipeline, config: RunConfig) -> None:
    from facemllm.pipeline.select import expand_inputs

    out = local_folder(config.out)
    stages = config.stages
    if "select" in stages:
        shards = (
            pipeline
            | "MetadataFiles" >> beam.Create(list(enumerate(expand_inputs(config.select.metadata))))
            | "Select" >> beam.ParDo(SelectDoFn(config))
        )
    else:
        shards = pipeline | "UrlShards" >> beam.Create(existing_url_shards(out))
    if "download" in stages:
        shards = (
            shards | "SpreadUrlShards" >> beam.Reshuffle() | "Download" >> beam.ParDo(DownloadDoFn(config))
        )
    elif "faces" in stages:
        shards = shards | "ShardIds" >> beam.Map(lambda shard: shard[0])
    if "faces" in stages:
        shards = shards | "SpreadImageShards" >> beam.Reshuffle() | "Faces" >> beam.ParDo(FacesDoFn(config))
    if "annotate" in stages:
        from facemllm.pipeline.annotate import AnnotateDoFn, completed_face_shards

        if "faces" not in stages:
            shards = pipeline | "FaceShards" >> beam.Create(completed_face_shards(out / "faces"))
        annotate = AnnotateDoFn(config.annotate, str(out / "faces"), str(out / "annotations"), config.out)
        shards | "SpreadFaceShards" >> beam.Reshuffle() | "Annotate" >> beam.ParDo(annotate)


def check_inputs(config: RunConfig) -> None:
    """Fail on missing inputs before any work starts, naming the setting to change."""
    from facemllm.pipeline.select import expand_inputs

    if "select" in config.stages:
        expand_inputs(config.select.metadata)
        if not Path(config.select.ids).is_file():
            raise FileNotFoundError(f"select.ids: no such file {config.select.ids!r}")
    for name in ("model", "model_pack"):
        path = getattr(config.faces, name)
        if "faces" in config.stages and path is not None and not Path(path).exists():
            raise FileNotFoundError(f"faces.{name}: no such path {str(path)!r}")
    if "annotate" in config.stages:
        from facemllm.pipeline.annotate import check_annotate_config

        check_annotate_config(config.annotate)


def run(config: RunConfig):
    """Run the configured stages to completion, then write the manifest; returns it."""
    from facemllm.pipeline.download import bound_decoder_pixels

    check_inputs(config)
    bound_decoder_pixels(config.download.max_image_pixels)  # before any import of cv2; workers inherit it
    store = RunStore(config.out)
    out = store.local
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    sync_completed(store)  # a resumed run sees what the store already holds
    with beam.Pipeline(
        runner=make_runner(config.runner), options=pipeline_options(config.runner)
    ) as pipeline:
        build(pipeline, config)
    clean_stale_temporaries(out)
    sync_completed(store)  # the manifest is built from every worker's shards
    manifest = write_run_manifest(out, config.config_hash())
    sizes = sorted(out.glob("*/sizes.json"))
    store.push(*sizes, out / "sizes.json", out / "manifest.json")  # the manifest last: the commit point
    return manifest
