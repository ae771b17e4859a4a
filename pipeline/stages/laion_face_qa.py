"""LAION-Face QA stage: ``annotations/NNNNN.tar`` -> stage-1 caption and stage-2 VQA shards.

The last hop of the LAION-Face recipe. Per annotated face (``KEY.jpg``, ``KEY.txt``, ``KEY.json``
``FaceAnnotation``), ``reformatters.laion_face.LaionFaceQABuilder`` makes one caption sample and
``vqa_per_face`` attribute questions; this stage writes them, one shard per input shard and split:

- ``qa/laion_face_caption/<split>/NNNNN.tar`` (stage 1, vision-language alignment);
- ``qa/laion_face_vqa/<split>/NNNNN.tar`` (stage 2, basic VQA): one sample per face holding all
  its questions as one multi-turn conversation (``LaionFaceVQASample``), the crop stored once;
- ``qa/_laion_face/NNNNN.parquet``: a ``LaionFaceQAStatus`` row per face, and
  ``qa/_laion_face/NNNNN_stats.json``, the completion marker, last (it records the config hash:
  a changed config redoes the shard).

When every shard is done the driver writes, per dataset, ``sizes.json`` per split and
``manifest.json`` (``finalize``), so ``publish``, ``verify``, ``remove``, ``train`` and ``eval`` read
these datasets like the reformatted ones. ``facemllm laion-face-qa`` runs this stage alone
(``run_laion_face_qa``); ``facemllm run`` runs it after ``annotate`` when ``stages`` lists it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path

from pydantic import ValidationError

from facemllm.pipeline.core.manifest import write_dataset_manifest
from facemllm.pipeline.core.shards import (
    ShardWriter,
    completed_shards,
    iter_tar_samples,
    shard_info,
    shard_paths,
)
from facemllm.pipeline.core.storage import RunStore
from facemllm.pipeline.runners import RunnerConfig
from facemllm.pipeline.stages.framework import Stage, UnitResult, run_stage_on_folders
from facemllm.reformatters.laion_face import (
    CAPTION_DATASET,
    VQA_DATASET,
    LaionFaceQABuilder,
    LaionFaceQAConfig,
    LaionFaceQASample,
    LaionFaceVQASample,
)
from facemllm.schemas import FaceAnnotation, LaionFaceQAStatus, RunManifest, ShardInfo

QA_DIR = "qa"
MARKERS_DIR = "_laion_face"


class LaionFaceQAStage(Stage):
    """One annotation shard -> its caption and VQA shards (per split) and a status row per face."""

    name = "laion_face_qa"
    status_record = LaionFaceQAStatus

    def __init__(self, config: LaionFaceQAConfig, input_dir: str = "annotations", output_dir: str = QA_DIR):
        self.config = config
        self.input_dir = input_dir
        self.output_dir = output_dir

    def setup(self) -> None:
        self.builder = LaionFaceQABuilder(self.config)

    @property
    def qa_dir(self) -> Path:
        return self.root / self.output_dir

    def folders(self) -> list[Path]:
        return [self.qa_dir / name for name in (MARKERS_DIR, CAPTION_DATASET, VQA_DATASET)]

    def marker(self, unit: int) -> Path:
        return shard_paths(self.qa_dir / MARKERS_DIR, unit)["stats"]

    def status_table(self, unit: int) -> Path:
        return shard_paths(self.qa_dir / MARKERS_DIR, unit)["parquet"]

    def shard(self, folder: str, unit: int) -> Path:
        """``folder`` is ``<dataset>/<split>`` under the QA folder."""
        return shard_paths(self.qa_dir / folder, unit)["tar"]

    def outputs(self, unit: int, stats: dict) -> list[Path]:
        return [*(self.shard(folder, unit) for folder in stats["shards"]), self.status_table(unit)]

    def inputs(self, unit: int) -> list[Path]:
        return [shard_paths(self.root / self.input_dir, unit)["tar"]]

    def is_current(self, stats: dict) -> bool:
        return stats.get("config") == self.config.config_hash()

    def process(self, unit: int) -> UnitResult:
        writers: dict[str, ShardWriter] = {}
        statuses: list[dict] = []
        with ExitStack() as open_shards:  # an exception aborts every shard of the unit

            def write(sample: LaionFaceQASample | LaionFaceVQASample, image: bytes) -> None:
                folder = f"{sample.dataset}/{sample.split}"
                if folder not in writers:
                    writers[folder] = open_shards.enter_context(ShardWriter(self.shard(folder, unit)))
                writers[folder].add(
                    sample.key, {"jpg": image, "json": sample.model_dump_json(by_alias=True).encode()}
                )

            for key, members in iter_tar_samples(self.inputs(unit)[0]):
                statuses.append(self._face(key, members, write).model_dump(mode="json"))
        stats = {
            "shard_id": unit,
            "config": self.config.config_hash(),
            "faces": len(statuses),
            "status": dict(sorted(Counter(row["status"] for row in statuses).items())),
            "captions": sum(row["captions"] for row in statuses),
            "questions": sum(row["questions"] for row in statuses),
            "shards": {
                folder: shard_info(
                    writer.path, writer.count, url=f"{folder.split('/')[1]}/{writer.path.name}"
                ).model_dump(mode="json")
                for folder, writer in sorted(writers.items())
            },
        }
        return UnitResult(stats, statuses)

    def _face(self, key: str, members: dict[str, bytes], write) -> LaionFaceQAStatus:
        """Write one face's caption and questions; its status row says what was written, or why not."""
        try:
            annotation = FaceAnnotation.model_validate_json(members.get("json", b""))
        except ValidationError as err:
            return LaionFaceQAStatus(key=key, status="bad_annotation", error=str(err).splitlines()[0])
        source = {"key": key, "url": annotation.url, "sample_id": annotation.sample_id}
        if annotation.key != key:
            return LaionFaceQAStatus(
                **source,
                status="bad_annotation",
                error=f"annotation key {annotation.key!r} differs from the sample key",
            )
        image = members.get("jpg")
        if image is None:
            return LaionFaceQAStatus(
                **source, status="no_image", error="the annotation sample has no jpg member"
            )
        split = self.builder.split(annotation.key)
        captions = 0
        if len(annotation.caption.strip()) >= self.config.min_caption_chars:
            write(self.builder.caption(annotation, split), image)
            captions = 1
        questions = self.builder.questions(annotation, split)
        if questions:  # one sample per face: the crop once, every question a turn of it
            write(LaionFaceVQASample.group(annotation.key, questions), image)
        return LaionFaceQAStatus(**source, status="success", captions=captions, questions=len(questions))

    def counters(self, stats: dict) -> dict[str, int]:
        return {"captions": stats["captions"], "questions": stats["questions"], **stats["status"]}


def finalize(stage: LaionFaceQAStage, units: list[int], store: RunStore) -> dict[str, RunManifest]:
    """Per dataset: sizes per split, then ``manifest.json`` (the commit point), from the markers
    (read from the run store where the workers' mirrors are not this one)."""
    shards: dict[str, dict[str, list[ShardInfo]]] = {
        CAPTION_DATASET: defaultdict(list),
        VQA_DATASET: defaultdict(list),
    }
    status: Counter[str] = Counter()
    for unit in units:
        stats = store.read_marker(stage.marker(unit))
        if stats is None or not stage.is_current(stats):
            raise RuntimeError(f"LAION-Face QA shard {unit} did not complete; rerun to finish it")
        status.update({"faces": stats["faces"], **stats["status"]})
        for folder, info in stats["shards"].items():
            dataset, split = folder.split("/")
            shards[dataset][split].append(ShardInfo.model_validate(info))
    return {
        dataset: write_dataset_manifest(
            stage.qa_dir / dataset, status, by_split, {}, stage.config.config_hash()
        )
        for dataset, by_split in shards.items()
    }


def run_laion_face_qa(
    annotations: str | Path, out: str | Path, config: LaionFaceQAConfig, runner: RunnerConfig | None = None
) -> dict[str, RunManifest]:
    """``facemllm laion-face-qa``: this stage alone over completed annotation shards (or, for
    annotation folders from before markers, every ``NNNNN.tar``); returns the datasets' manifests."""
    annotations = Path(annotations)
    units = completed_shards(annotations) or sorted(
        int(p.stem) for p in annotations.glob("*.tar") if p.stem.isdigit()
    )
    if not units:
        raise FileNotFoundError(f"no annotation shards (NNNNN.tar) in {annotations}")
    stage = run_stage_on_folders(
        lambda source, dest: LaionFaceQAStage(config, source, dest),
        annotations,
        Path(out),
        units,
        runner,
        "LaionFaceQA",
    )
    return finalize(stage, units, RunStore(str(out)))


def summary(manifests: dict[str, RunManifest]) -> dict:
    """What ``facemllm laion-face-qa`` prints: face outcomes and samples per dataset and split."""
    first = next(iter(manifests.values()))
    return {
        "status": first.stages[f"{QA_DIR}/{CAPTION_DATASET}"].counts,
        "samples": {
            name.removeprefix(f"{QA_DIR}/"): stage.counts["samples"]
            for manifest in manifests.values()
            for name, stage in manifest.stages.items()
            if name.count("/") == 2
        },
    }
