"""The acquisition pipeline: select -> download -> faces, as Beam stages.

Each stage is a DoFn that adapts one plain class (``LaionFaceSelector``, ``ImageShardDownloader``,
``FaceShardProcessor``): set up once per worker, process one shard, count metrics. Shards move
between stages as ids; each stage's completion markers make a retried bundle or a rerun after a
kill skip finished shards and redo partial ones. When the pipeline has finished, the driver
writes ``manifest.json`` (the commit point) and ``sizes.json`` from what is on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.config import RunConfig
from pipeline.manifest import write_run_manifest
from pipeline.runners import make_runner, pipeline_options

METRICS_NAMESPACE = "facemllm"


class SelectDoFn(beam.DoFn):
    def __init__(self, config: RunConfig):
        self.config = config

    def setup(self):
        from pipeline.select import LaionFaceSelector, load_sample_ids

        select = self.config.select
        ids = load_sample_ids(select.ids, select.id_parts, select.trust_id_pickle)
        self.selector = LaionFaceSelector(select, ids, Path(self.config.out) / "urls")

    def process(self, indexed_input: tuple[int, str]):
        from pipeline.select import url_shard_path

        result = self.selector.select_file(*indexed_input)
        for reason, count in result["counts"].items():
            Metrics.counter(METRICS_NAMESPACE, f"select_{reason}").inc(count)
        for shard_id in result["shards"]:
            yield shard_id, str(url_shard_path(self.selector.urls_dir, shard_id))


class DownloadDoFn(beam.DoFn):
    def __init__(self, config: RunConfig):
        self.config = config

    def setup(self):
        from pipeline.download import ImageShardDownloader

        self.downloader = ImageShardDownloader(
            self.config.download, Path(self.config.out) / "images", self.config.select.samples_per_shard
        )

    def process(self, shard: tuple[int, str]):
        shard_id, url_shard = shard
        skipped = self.downloader.is_done(shard_id)
        stats = self.downloader.download(shard_id, Path(url_shard))
        if not skipped:
            for name in ("successes", "failed_to_download", "failed_to_resize"):
                Metrics.counter(METRICS_NAMESPACE, f"download_{name}").inc(stats.get(name, 0))
        Metrics.counter(METRICS_NAMESPACE, "download_shards_skipped" if skipped else "download_shards").inc()
        yield shard_id


class FacesDoFn(beam.DoFn):
    def __init__(self, config: RunConfig):
        self.config = config

    def setup(self):
        from pipeline.download import bound_decoder_pixels
        from pipeline.faces import FaceShardProcessor

        bound_decoder_pixels(self.config.download.max_image_pixels)
        self.processor = FaceShardProcessor(self.config.faces, Path(self.config.out) / "faces")

    def process(self, shard_id: int):
        from pipeline.sink import shard_paths

        skipped = self.processor.is_done(shard_id)
        stats = self.processor.process(
            shard_id, shard_paths(Path(self.config.out) / "images", shard_id)["tar"]
        )
        if not skipped:
            Metrics.counter(METRICS_NAMESPACE, "faces_kept").inc(stats["faces"])
            for status, count in stats["status"].items():
                Metrics.counter(METRICS_NAMESPACE, f"faces_images_{status}").inc(count)
        yield shard_id


def existing_url_shards(out: Path) -> list[tuple[int, str]]:
    return [(int(p.stem.split("-")[1]), str(p)) for p in sorted((out / "urls").glob("part-*.parquet"))]


def clean_stale_temporaries(out: Path) -> None:
    """Remove what killed workers left half-written; only the driver calls this, before any worker."""
    shutil.rmtree(out / "images" / "_tmp", ignore_errors=True)
    for stray in out.glob("*/.*.tmp-*"):
        stray.unlink(missing_ok=True)


def build(pipeline: beam.Pipeline, config: RunConfig) -> None:
    from pipeline.select import expand_inputs

    out = Path(config.out)
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
        shards | "SpreadImageShards" >> beam.Reshuffle() | "Faces" >> beam.ParDo(FacesDoFn(config))


def check_inputs(config: RunConfig) -> None:
    """Fail on missing inputs before any work starts, naming the setting to change."""
    from pipeline.select import expand_inputs

    if "select" in config.stages:
        expand_inputs(config.select.metadata)
        if not Path(config.select.ids).is_file():
            raise FileNotFoundError(f"select.ids: no such file {config.select.ids!r}")
    for name in ("model", "model_pack"):
        path = getattr(config.faces, name)
        if "faces" in config.stages and path is not None and not Path(path).exists():
            raise FileNotFoundError(f"faces.{name}: no such path {str(path)!r}")


def run(config: RunConfig):
    """Run the configured stages to completion, then write the manifest; returns it."""
    from pipeline.download import bound_decoder_pixels

    check_inputs(config)
    bound_decoder_pixels(config.download.max_image_pixels)  # before any import of cv2; workers inherit it
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    with beam.Pipeline(
        runner=make_runner(config.runner), options=pipeline_options(config.runner)
    ) as pipeline:
        build(pipeline, config)
    clean_stale_temporaries(out)
    return write_run_manifest(out, config)
