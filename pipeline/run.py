"""``facemllm run``: the LAION-Face DAG, select -> download -> faces -> annotate -> laion_face_qa.

Each configured stage (``pipeline/stages/``) runs through the one executor (``StageDoFn``; download
and faces as one streamed pair, detection working while downloads wait): units move between
stages as ids, completion markers make a retried bundle or a rerun after a kill skip
finished units and redo partial ones. A stage not configured reuses the completed output of an
earlier run. When the pipeline has finished, the driver writes ``sizes.json`` and ``manifest.json``
(the commit point) from the completion markers, and the LAION-Face QA datasets' manifests.

``out`` may be an object-store URL: stages then write into a local mirror as usual and the run
store uploads each finished unit with its completion marker last, fetches inputs and finished
units that other workers (or an earlier run) left in the store, and the driver reads the markers
from the store (never the shards) and uploads the manifests last.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam

from facemllm.pipeline.config import RunConfig
from facemllm.pipeline.core.console import BEAM_LOG, chatter_to_log
from facemllm.pipeline.core.manifest import SHARD_STAGES, write_run_manifest
from facemllm.pipeline.core.progress import ProgressMonitor
from facemllm.pipeline.core.shards import STATS_SUFFIX, marker_shard_id, shard_paths
from facemllm.pipeline.core.storage import RunStore, url_to_fs
from facemllm.pipeline.publishing.report import REPORT_DATA, write_run_report
from facemllm.pipeline.runners import beam_pipeline
from facemllm.pipeline.stages.annotate import AnnotateStage, check_annotate_config
from facemllm.pipeline.stages.dedup import apply_dedup
from facemllm.pipeline.stages.download import DownloadStage, bound_decoder_pixels
from facemllm.pipeline.stages.faces import FaceStage
from facemllm.pipeline.stages.framework import Stage, apply_stage, clean_run
from facemllm.pipeline.stages.laion_face_qa import LaionFaceQAStage
from facemllm.pipeline.stages.laion_face_qa import finalize as finalize_laion_face_qa
from facemllm.pipeline.stages.select import SelectStage, expand_inputs


def make_stages(config: RunConfig) -> dict[str, Stage]:
    """The configured stages, in DAG order, by name."""
    factories = {
        "select": lambda: SelectStage(config.select, expand_inputs(config.select.metadata)),
        "download": lambda: DownloadStage(
            config.download, config.select.samples_per_shard, config.select.blocklist
        ),
        "faces": lambda: FaceStage(config.faces, blocklist=config.select.blocklist),
        "annotate": lambda: AnnotateStage(
            config.annotate, dedup_action=config.dedup.action if config.dedup.enabled else None
        ),
        "laion_face_qa": lambda: LaionFaceQAStage(config.laion_face_qa),
    }
    return {name: make() for name, make in factories.items() if name in config.stages}


def existing_units(store: RunStore, stage: str) -> list[int]:
    """Where a stage starts when the stage before it is not part of this run: that stage's output
    (in the mirror or the store)."""
    if stage == "download":
        return sorted(int(p.stem.split("-")[1]) for p in store.matching("urls/part-*.parquet"))
    previous = {"faces": "images", "annotate": "faces", "laion_face_qa": "annotations"}[stage]
    return sorted(marker_shard_id(marker) for marker in store.matching(f"{previous}/*{STATS_SUFFIX}"))


def build(pipeline: beam.Pipeline, config: RunConfig, stages: dict[str, Stage]) -> None:
    store = RunStore(config.out)
    units = None
    for name, stage in stages.items():
        if units is None:
            initial = range(len(stage.metadata_files)) if name == "select" else existing_units(store, name)
            units = pipeline | f"{name}Units" >> beam.Create(list(initial))
        if name == "annotate" and config.dedup.enabled:  # every face shard hashed and grouped first
            written = apply_dedup(units, config.out, config.dedup)
            units = units | "AfterDedup" >> beam.Map(lambda unit, _: unit, written)
        if name == "faces" and "download" in stages:
            continue  # streamed from the download stage's workers, unit for unit
        label = name.title().replace("_", "")
        streams_to = stages.get("faces") if name == "download" else None
        units = apply_stage(units, label, stage, config.out, streams_to)


def check_inputs(config: RunConfig) -> None:
    """Fail on missing inputs before any work starts, naming the setting to change."""
    if "select" in config.stages:
        expand_inputs(config.select.metadata)
        fs, path = url_to_fs(config.select.ids)
        if not fs.isfile(path):
            raise FileNotFoundError(f"select.ids: no such file {config.select.ids!r}")
    for name in ("model", "model_pack"):
        path = getattr(config.faces, name)
        if "faces" in config.stages and path is not None and not Path(path).exists():
            raise FileNotFoundError(f"faces.{name}: no such path {str(path)!r}")
    if "annotate" in config.stages:
        check_annotate_config(config.annotate)


def push_completed_units(store: RunStore) -> None:
    """For an object-store ``out``: upload the units this machine's mirror completed that the store
    lacks (a worker killed between its marker and its upload). Nothing comes the other way: the
    driver reads its workers' markers from the store, never their shards."""
    if store.remote is None:
        return
    pushes = []
    for stage in SHARD_STAGES:
        remote = set(store.in_store(f"{stage}/*{STATS_SUFFIX}"))
        for marker in sorted(set((store.local / stage).glob(f"*{STATS_SUFFIX}")) - remote):
            paths = shard_paths(marker.parent, marker_shard_id(marker))
            pushes.append([paths["stats"], paths["tar"], paths["parquet"]])
    store.remote.parallel(pushes, lambda files: store.push_completed(*files), "upload finished shards")


def run(config: RunConfig, progress: bool = True):
    """Run the configured stages to completion, then write the manifests; returns the run manifest.

    Progress, read from the completion markers, goes to ``OUT/logs/progress.jsonl`` and, when
    ``progress`` and the console is a terminal, to a live table; what Beam and its workers write
    to standard error goes to ``OUT/logs/beam.log``."""
    check_inputs(config)
    bound_decoder_pixels(config.download.max_image_pixels)  # before any import of cv2; workers inherit it
    store = RunStore(config.out)
    out = store.local
    out.mkdir(parents=True, exist_ok=True)
    stages = make_stages(config)
    clean_run([stage.bind(out) for stage in stages.values()], run_folder=out)
    push_completed_units(store)  # a resumed run's workers find them in the store
    if "select" in stages:
        stages["select"].prepare(store)  # the id index, once, before any select worker
    inputs = len(stages["select"].metadata_files) if "select" in stages else 0
    with (
        chatter_to_log(out / BEAM_LOG) as console,
        ProgressMonitor(config.out, list(stages), inputs, console if progress and console.isatty() else None),
        beam_pipeline(config.runner) as pipeline,
    ):
        build(pipeline, config, stages)
    clean_run(stages.values(), run_folder=out)
    push_completed_units(store)  # the manifest is built from the markers in the store
    pushed = []
    if "laion_face_qa" in stages:
        qa = stages["laion_face_qa"]
        finalize_laion_face_qa(qa, existing_units(store, "laion_face_qa"), store)
        pushed = sorted(qa.qa_dir.glob("*/*/sizes.json")) + sorted(qa.qa_dir.glob("*/manifest.json"))
    manifest = write_run_manifest(store, config.config_hash())
    report = write_run_report(config.out)
    sizes = sorted(out.glob("*/sizes.json"))
    store.push(
        *pushed, *sizes, out / "sizes.json", out / REPORT_DATA, report, out / "manifest.json"
    )  # the manifest last: the commit point
    return manifest
