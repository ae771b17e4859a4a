"""Annotate stage: ``faces/NNNNN.tar`` -> ``annotations/NNNNN.tar .parquet _stats.json``.

``AnnotateStage`` reads one face shard and writes, per face that got an
answer, ``KEY.jpg`` (the context crop), ``KEY.txt`` (the caption) and ``KEY.json``
(``FaceAnnotation``); per input face a status row (``AnnotationStatus``: success or a named
reason); then the stats file last, as the completion marker. Annotation shard N comes from face
shard N and keeps its keys.

With the MLLM annotator the faces of a shard go out as concurrent requests (``concurrency`` in
flight, keeping the server's batch full) and come back in any order; a window of pending faces is
written in key order as answers arrive, so memory stays bounded and the shard's bytes do not
depend on arrival order. Every answer is appended to the shard's request cache
(``annotations/_cache/NNNNN.jsonl``) the moment it arrives: a run killed mid-shard and rerun
redoes the shard without asking the server again for any face it already has an answer for.

In managed mode ``setup`` starts the worker's vLLM server and ``teardown`` stops it; live metrics:
requests, retries and failures by reason, latency distribution, tokens.
``FaceAnnotationModelHandler`` offers the same annotator to ``RunInference`` for pipelines that
carry single faces instead of shards. ``run_annotate`` is the ``facemllm annotate`` command: this
stage alone over a folder of face shards.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from apache_beam.ml.inference.base import ModelHandler

from facemllm.annotators.annotate_config import AnnotateConfig
from facemllm.annotators.mllm_client import Answer, ChatClient, MLLMAnnotator, Outcome
from facemllm.annotators.request_cache import RequestCache
from facemllm.annotators.template_annotator import TemplateAnnotator
from facemllm.pipeline.core.manifest import shard_stage_manifest
from facemllm.pipeline.core.profile import ProfileBuilder
from facemllm.pipeline.core.shards import ShardWriter, completed_shards, iter_tar_samples, write_sizes
from facemllm.pipeline.core.spill import KeyOrderSpill
from facemllm.pipeline.core.storage import RunStore
from facemllm.pipeline.runners import RunnerConfig
from facemllm.pipeline.stages.dedup import BESIDE_FACES, read_decisions
from facemllm.pipeline.stages.framework import (
    METRICS_NAMESPACE,
    BeamMetrics,
    ShardStage,
    StageMetrics,
    UnitResult,
    run_stage_on_folders,
)
from facemllm.schemas.annotation import AnnotationStatus, FaceAnnotation
from facemllm.schemas.records import DuplicateFace, FaceRecord

CACHE_DIR_NAME = "_cache"
log = logging.getLogger(__name__)


def check_annotate_config(config: AnnotateConfig) -> None:
    """Everything that can be checked before any work: server source, prompt file, server python."""
    from facemllm.annotators.prompts import load_prompt

    config.check_ready()
    if config.annotator == "mllm":
        load_prompt(config.prompt)
        if config.server is not None and shutil.which(config.server.python) is None:
            raise FileNotFoundError(
                f"annotate.server.python: no interpreter {config.server.python!r} "
                "(point it at the bin/python of a venv with vLLM, e.g. the one scripts/install_vllm.sh prints)"
            )


class AnnotateStage(ShardStage):
    """Annotates one face shard (``faces/NNNNN.tar`` -> ``annotations/NNNNN.*``).

    ``base_url``: the OpenAI-compatible server for the MLLM annotator, overriding the config's
    endpoint (unused by the template annotator; a managed server sets its own in ``setup``).
    ``dedup_action``: what to do with the faces ``dedup`` found duplicates (``facemllm run`` with
    ``dedup.enabled``); None: the run does not deduplicate.
    """

    name = "annotate"
    status_record = AnnotationStatus

    def __init__(
        self,
        config: AnnotateConfig,
        input_dir: str = "faces",
        output_dir: str = "annotations",
        base_url: str | None = None,
        dedup_action: Literal["drop", "flag"] | None = None,
    ):
        self.config = config
        self.input_dir = input_dir
        self.output_dir = output_dir
        self.base_url = base_url
        self.dedup_action = dedup_action
        self.server = None

    def setup(self) -> None:
        config = self.config
        self.cache_dir = (
            Path(config.cache_dir) if config.cache_dir else self.root / self.output_dir / CACHE_DIR_NAME
        )
        if config.annotator == "template":
            self.annotator: TemplateAnnotator | MLLMAnnotator = TemplateAnnotator()
            return
        if self.base_url is None:
            self.server, self.base_url = _start_server(config)
        if not self.base_url:
            raise ValueError("the mllm annotator needs a server base URL")
        self.annotator = MLLMAnnotator(config)
        # What is loaded by now lives as long as the worker: about 370,000 objects (Beam, pyarrow,
        # pydantic, openai), whose full garbage collection took 184 ms, stalling the event loop
        # and every request in flight; frozen, the collector no longer scans them.
        gc.freeze()

    def teardown(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def inputs(self, unit: int) -> list[Path]:
        decisions = [self.root / self.input_dir / BESIDE_FACES] if self.dedup_action else []
        return [*super().inputs(unit), *decisions]

    def shard_duplicates(self, unit: int) -> dict[str, DuplicateFace]:
        """The dedup decisions about face shard ``unit`` (``faces/_dedup/duplicates.parquet``, which
        the pipeline writes before this stage starts); none when the run does not deduplicate."""
        return read_decisions(self.root / self.input_dir, unit) if self.dedup_action else {}

    def process_shard(self, unit: int, source: Path, writer: ShardWriter) -> UnitResult:
        statuses: list[dict] = []
        self.profile = ProfileBuilder()  # filled by _write, one shard at a time per worker
        self.duplicates = self.shard_duplicates(unit)
        extra: dict = {}
        faces = iter_tar_samples(source)  # face keys are sorted; answers are written in that order
        if isinstance(self.annotator, TemplateAnnotator):
            for key, sample in faces:
                self._write(writer, statuses, *self._template_outcome(key, sample))
        else:
            extra = asyncio.run(self._annotate_mllm(unit, faces, writer, statuses))
        stats = summarize_annotation_statuses(unit, statuses, writer.count, self.annotator, extra)
        for outcome, n in stats["status"].items():
            self.profile.count("annotation_status", outcome, n)
        return UnitResult({**stats, "profile": self.profile.build()}, statuses)

    def counters(self, stats: dict) -> dict[str, int]:
        return {
            "requests": stats["requests"],
            **{f"retries_{reason}": n for reason, n in stats["retries"].items()},
        }

    # -- one face -------------------------------------------------------------------------------

    def _parse(self, key: str, sample: dict[str, bytes]) -> tuple[FaceRecord | None, bytes, Outcome | None]:
        """The face's record and crop, and the outcome of a face that is not sent: a bad input
        sample, or a duplicate dedup dropped (naming its keeper)."""
        image = sample.get("jpg", b"")
        try:
            record = FaceRecord.model_validate_json(sample.get("json", b""))
        except ValueError as err:
            return (
                None,
                image,
                Outcome(key, "bad_input", error=f"unreadable FaceRecord: {str(err).splitlines()[0]}"),
            )
        if record.key != key:
            error = f"FaceRecord key {record.key!r} differs from the sample key"
            return record, image, Outcome(key, "bad_input", error=error)
        if not image:
            return record, image, Outcome(key, "bad_input", error="the face sample has no jpg member")
        duplicate = self.duplicates.get(key)
        if duplicate is not None and self.dedup_action == "drop":
            why = f"duplicate of {duplicate.keeper} ({duplicate.reason}, phash distance {duplicate.distance})"
            return record, image, Outcome(key, "duplicate", error=why)
        return record, image, None

    def _template_outcome(self, key: str, sample: dict[str, bytes]):
        record, image, unsent = self._parse(key, sample)
        if unsent is not None:
            return key, record, image, unsent
        answer = Answer(self.annotator.caption(record), None, self.annotator.provenance)
        return key, record, image, Outcome(key, "success", answer=answer, latency_s=0.0)

    async def _annotate_mllm(
        self, shard_id: int, faces: Iterable, writer: ShardWriter, statuses: list
    ) -> dict:
        """Every face of the shard asked of the server, ``concurrency`` at a time; the answers wait
        in a ``KeyOrderSpill`` as they come and are written in key order at the end, so a slow or
        retried request never holds the others back. At most ``4 x concurrency`` faces are read
        ahead of their answers (their crops in memory)."""
        config = self.config
        annotator: MLLMAnnotator = self.annotator
        cache = RequestCache(self.cache_dir / f"{shard_id:05d}.jsonl" if config.cache else None)
        window = max(8, 4 * config.concurrency)
        async with ChatClient(self.base_url, config) as client:
            slots = asyncio.Semaphore(config.concurrency)

            async def ask(key: str, record: FaceRecord, image: bytes) -> tuple:
                cache_key = annotator.cache_key(image)
                if (answer := cached_answer(cache, cache_key)) is not None:
                    latency_s = answer.provenance.latency_s
                    outcome = Outcome(key, "success", answer=answer, latency_s=latency_s, cached=True)
                else:
                    async with slots:
                        outcome = await annotator.annotate(client, key, image)
                    if outcome.status == "success":
                        cache.put(cache_key, outcome.answer.to_cache())
                return key, record, image, outcome

            asked: set[asyncio.Task] = set()
            with KeyOrderSpill(self.root / self.output_dir) as answered:

                async def keep_answers(at_most: int) -> None:
                    """Spill answers as they come until at most ``at_most`` faces wait for one."""
                    nonlocal asked
                    while len(asked) > at_most:
                        done, asked = await asyncio.wait(asked, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            answer = task.result()
                            answered.add(answer[0], answer)

                try:
                    for key, sample in faces:
                        record, image, unsent = self._parse(key, sample)
                        if unsent is not None:
                            answered.add(key, (key, record, image, unsent))
                        else:
                            asked.add(asyncio.create_task(ask(key, record, image)))
                            await keep_answers(at_most=window - 1)
                    await keep_answers(at_most=0)
                finally:
                    for task in asked:
                        task.cancel()
                    cache.close()
                for answer in answered.in_key_order():
                    self._write(writer, statuses, *answer)
        return {"requests": client.stats.requests, "retries": dict(sorted(client.stats.retries.items()))}

    def _write(self, writer: ShardWriter, statuses: list, key, record, image, outcome: Outcome) -> None:
        answer = outcome.answer
        duplicate = self.duplicates.get(key)
        duplicate_of = duplicate.keeper if duplicate is not None else None
        if outcome.status == "success":
            annotation = FaceAnnotation(
                key=key,
                source_key=record.source_key,
                url=record.url,
                sample_id=record.sample_id,
                license=record.license,
                caption=answer.caption,
                attributes=answer.attributes,
                provenance=answer.provenance,
                duplicate_of=duplicate_of,
            )
            writer.add(
                key,
                {"jpg": image, "txt": answer.caption.encode(), "json": annotation.model_dump_json().encode()},
            )
            observe_annotation(self.profile, annotation)
        usage = answer.provenance.usage if answer is not None else None
        statuses.append(
            AnnotationStatus(
                key=key,
                source_key=record.source_key if record is not None else None,
                url=record.url if record is not None else None,
                status=outcome.status,
                error=outcome.error,
                model=self.annotator.model,
                prompt_version=(
                    answer.provenance.prompt_version if answer is not None else self._prompt_version()
                ),
                attempts=outcome.attempts,
                latency_s=outcome.latency_s,
                prompt_tokens=usage.prompt_tokens if usage is not None else None,
                completion_tokens=usage.completion_tokens if usage is not None else None,
                cached=outcome.cached,
                duplicate_of=duplicate_of,
            ).model_dump(mode="json")
        )
        record_outcome(self.metrics, outcome)

    def _prompt_version(self) -> str:
        if isinstance(self.annotator, MLLMAnnotator):
            return self.annotator.prompt.version
        return self.annotator.provenance.prompt_version


REPORTED_ATTRIBUTES = (
    "perceived.gender",
    "perceived.age_band",
    "expression.basic",
    "face.shape",
    "head_pose.yaw",
    "occlusion.level",
    "quality.overall",
    "lighting.brightness",
)


def observe_annotation(profile: ProfileBuilder, annotation: FaceAnnotation) -> None:
    """A face's caption length and its categorical attributes (for the report)."""
    profile.observe("caption_words", len(annotation.caption.split()))
    attributes = annotation.attributes
    if attributes is None:
        return
    profile.observe("age_years", attributes.perceived.age_years)
    for path in REPORTED_ATTRIBUTES:
        group, name = path.split(".")
        profile.count(f"attribute {path}", str(getattr(getattr(attributes, group), name)))


def summarize_annotation_statuses(
    shard_id: int, statuses: list[dict], annotated: int, annotator, extra: dict
) -> dict:
    counts = Counter(row["status"] for row in statuses)
    return {
        "shard_id": shard_id,
        "faces": len(statuses),
        "annotated": annotated,
        "status": dict(sorted(counts.items())),
        "annotator": annotator.annotator_kind,
        "model": annotator.model,
        "cached": sum(1 for row in statuses if row["cached"]),
        "prompt_tokens": sum(row["prompt_tokens"] or 0 for row in statuses if not row["cached"]),
        "completion_tokens": sum(row["completion_tokens"] or 0 for row in statuses if not row["cached"]),
        "requests": extra.get("requests", 0),
        "retries": extra.get("retries", {}),
    }


def cached_answer(cache: RequestCache, cache_key: str) -> Answer | None:
    """The cached answer for a request, or None to ask the server: also when the entry does not
    validate any more (a reply from before a bound existed), so one bad entry never poisons a shard."""
    hit = cache.get(cache_key)
    if hit is None:
        return None
    try:
        return Answer.from_cache(hit)
    except ValueError as err:
        log.warning("discarding a cached answer that does not validate: %s", str(err).splitlines()[0])
        return None


def _start_server(config: AnnotateConfig):
    """(server or None, base URL) for this worker: a managed vLLM server, or the configured endpoint."""
    if config.annotator != "mllm":
        return None, None
    if config.server is not None:
        from facemllm.annotators.vllm_server import VLLMServer

        server = VLLMServer(config.server, config.request_model).start()
        return server, server.base_url
    return None, config.endpoint


def record_outcome(metrics: StageMetrics, outcome: Outcome) -> None:
    """Live counters per face: outcome, cache hits, latency, tokens."""
    metrics.count(f"annotate_{outcome.status}")
    if outcome.cached:
        metrics.count("annotate_cached")
        return
    if outcome.latency_s is not None and outcome.attempts:
        metrics.observe("annotate_latency_ms", int(outcome.latency_s * 1000))
    if outcome.answer is not None:
        metrics.count("annotate_prompt_tokens", outcome.answer.provenance.usage.prompt_tokens)
        metrics.count("annotate_completion_tokens", outcome.answer.provenance.usage.completion_tokens)


class _LoadedAnnotator:
    """What ``FaceAnnotationModelHandler.load_model`` returns: the annotator, its server, its URL."""

    def __init__(self, config: AnnotateConfig):
        self.config = config
        self.server, self.base_url = _start_server(config)
        self.annotator = MLLMAnnotator(config)

    async def annotate_batch(self, batch: Sequence[tuple[str, bytes]]) -> list[Outcome]:
        async with ChatClient(self.base_url, self.config) as client:
            slots = asyncio.Semaphore(self.config.concurrency)

            async def one(key: str, image: bytes) -> Outcome:
                async with slots:
                    return await self.annotator.annotate(client, key, image)

            return await asyncio.gather(*(one(key, image) for key, image in batch))


class FaceAnnotationModelHandler(ModelHandler):
    """``RunInference`` over ``(face key, JPEG bytes)`` elements; yields ``PredictionResult``s
    whose inference is the face's ``Outcome`` (status, answer or failure reason: route failures on
    ``outcome.status``). Both modes: ``config.endpoint`` or ``config.server`` (started in
    ``load_model``, once per worker process, like Beam's ``VLLMChatModelHandler``)."""

    def __init__(self, config: AnnotateConfig):
        config.check_ready()
        if config.annotator != "mllm":
            raise ValueError("FaceAnnotationModelHandler serves the mllm annotator")
        self.config = config

    def load_model(self) -> _LoadedAnnotator:
        return _LoadedAnnotator(self.config)

    def run_inference(self, batch, model: _LoadedAnnotator, inference_args=None):
        from apache_beam.ml.inference.base import PredictionResult

        outcomes = asyncio.run(model.annotate_batch(list(batch)))
        for element, outcome in zip(batch, outcomes, strict=True):
            BeamMetrics().count(f"annotate_{outcome.status}")
            yield PredictionResult(element[0], outcome, self.config.request_model)

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": 4 * self.config.concurrency}

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


def run_annotate(
    faces_dir: Path, annotations_dir: Path, config: AnnotateConfig, runner: RunnerConfig | None = None
):
    """``facemllm annotate``: this stage alone over completed face shards; returns its ShardManifest."""
    faces_dir, annotations_dir = Path(faces_dir), Path(annotations_dir)
    check_annotate_config(config)
    shards = completed_shards(faces_dir)
    if not shards:
        raise FileNotFoundError(f"--in {faces_dir}: no completed face shards (NNNNN_stats.json) there")
    run_stage_on_folders(
        lambda source, dest: AnnotateStage(config, source, dest),
        faces_dir,
        annotations_dir,
        shards,
        runner,
        "Annotate",
    )
    manifest = shard_stage_manifest(RunStore(str(annotations_dir.parent)), annotations_dir.name)
    write_sizes(annotations_dir, manifest.shards)
    return manifest
