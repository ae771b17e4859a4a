"""Annotate stage: ``faces/NNNNN.tar`` -> ``annotations/NNNNN.tar .parquet _stats.json``.

``AnnotationShardProcessor`` (plain class) reads one face shard and writes, per face that got an
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

Beam: ``AnnotateDoFn`` adapts the processor (setup once per worker: in managed mode it starts the
worker's vLLM server there and stops it in teardown; metrics: requests, retries and failures by
reason, latency distribution, tokens). ``FaceAnnotationModelHandler`` offers the same annotator to
``RunInference`` for pipelines that carry single faces instead of shards. ``run_annotate`` is the
``facemllm annotate`` command: this stage alone over a folder of face shards.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from facemllm.annotators.annotate_config import AnnotateConfig
from facemllm.annotators.mllm_client import Answer, ChatClient, MLLMAnnotator, Outcome
from facemllm.annotators.request_cache import RequestCache
from facemllm.annotators.template_annotator import TemplateAnnotator
from facemllm.pipeline.core.files import write_json_atomic, write_parquet_atomic
from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples, shard_paths
from facemllm.schemas.annotation import AnnotationStatus, FaceAnnotation
from facemllm.schemas.records import FaceRecord

CACHE_DIR_NAME = "_cache"
OutcomeHook = Callable[[Outcome], None]


def completed_face_shards(faces_dir: Path) -> list[int]:
    """Face shards with a completion marker (the annotate stage's inputs when run alone)."""
    return sorted(int(p.name.split("_")[0]) for p in Path(faces_dir).glob("*_stats.json"))


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


class AnnotationShardProcessor:
    """Annotates one face shard, atomically and idempotently (plain class, no Beam).

    ``base_url``: the OpenAI-compatible server for the MLLM annotator (unused by the template one).
    ``on_outcome``: called with each face's ``Outcome`` (metrics).
    """

    def __init__(
        self,
        config: AnnotateConfig,
        annotations_dir: Path,
        base_url: str | None = None,
        on_outcome: OutcomeHook | None = None,
    ):
        self.config = config
        self.dir = Path(annotations_dir)
        self.base_url = base_url or config.endpoint
        self.on_outcome = on_outcome
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else self.dir / CACHE_DIR_NAME
        if config.annotator == "template":
            self.annotator: TemplateAnnotator | MLLMAnnotator = TemplateAnnotator()
        else:
            if not self.base_url:
                raise ValueError("the mllm annotator needs a server base URL")
            self.annotator = MLLMAnnotator(config)
        self.last_client_stats = None

    def is_done(self, shard_id: int) -> bool:
        return shard_paths(self.dir, shard_id)["stats"].exists()

    def process(self, shard_id: int, face_tar: Path) -> dict:
        final = shard_paths(self.dir, shard_id)
        if final["stats"].exists():
            return json.loads(final["stats"].read_text())
        statuses: list[dict] = []
        extra: dict = {}
        with ShardWriter(final["tar"]) as writer:  # face keys are sorted; answers are written in that order
            faces = iter_tar_samples(face_tar)
            if isinstance(self.annotator, TemplateAnnotator):
                for key, sample in faces:
                    self._write(writer, statuses, *self._template_outcome(key, sample))
            else:
                extra = asyncio.run(self._annotate_mllm(shard_id, faces, writer, statuses))
        write_parquet_atomic(final["parquet"], statuses, ANNOTATION_STATUS_SCHEMA)
        stats = summarize_annotation_statuses(shard_id, statuses, writer.count, self.annotator, extra)
        write_json_atomic(final["stats"], stats)  # completion marker, last
        return stats

    # -- one face -------------------------------------------------------------------------------

    @staticmethod
    def _parse(key: str, sample: dict[str, bytes]) -> tuple[FaceRecord | None, bytes, str | None]:
        image = sample.get("jpg", b"")
        try:
            record = FaceRecord.model_validate_json(sample.get("json", b""))
        except ValueError as err:
            return None, image, f"unreadable FaceRecord: {str(err).splitlines()[0]}"
        if record.key != key:
            return record, image, f"FaceRecord key {record.key!r} differs from the sample key"
        if not image:
            return record, image, "the face sample has no jpg member"
        return record, image, None

    def _template_outcome(self, key: str, sample: dict[str, bytes]):
        record, image, error = self._parse(key, sample)
        if error is not None:
            return key, record, image, Outcome(key, "bad_input", error=error)
        answer = Answer(self.annotator.caption(record), None, self.annotator.provenance)
        return key, record, image, Outcome(key, "success", answer=answer, latency_s=0.0)

    async def _annotate_mllm(
        self, shard_id: int, faces: Iterable, writer: ShardWriter, statuses: list
    ) -> dict:
        config = self.config
        annotator: MLLMAnnotator = self.annotator
        cache = RequestCache(self.cache_dir / f"{shard_id:05d}.jsonl" if config.cache else None)
        window = max(8, 4 * config.concurrency)
        async with ChatClient(self.base_url, config) as client:
            self.last_client_stats = client.stats
            slots = asyncio.Semaphore(config.concurrency)

            async def ask(key: str, image: bytes) -> Outcome:
                cache_key = annotator.cache_key(image)
                hit = cache.get(cache_key)
                if hit is not None:
                    answer = Answer.from_cache(hit)
                    return Outcome(
                        key, "success", answer=answer, latency_s=answer.provenance.latency_s, cached=True
                    )
                async with slots:
                    outcome = await annotator.annotate(client, key, image)
                if outcome.status == "success":
                    cache.put(cache_key, outcome.answer.to_cache())
                return outcome

            pending: deque = deque()

            async def write_head() -> None:
                key, record, image, task = pending.popleft()
                self._write(writer, statuses, key, record, image, await task)

            try:
                for key, sample in faces:
                    record, image, error = self._parse(key, sample)
                    if error is not None:
                        done = asyncio.get_running_loop().create_future()
                        done.set_result(Outcome(key, "bad_input", error=error))
                        pending.append((key, record, image, done))
                    else:
                        pending.append((key, record, image, asyncio.create_task(ask(key, image))))
                    while len(pending) >= window:
                        await write_head()
                while pending:
                    await write_head()
            finally:
                for *_, task in pending:
                    task.cancel()
                cache.close()
        return {"requests": client.stats.requests, "retries": dict(sorted(client.stats.retries.items()))}

    def _write(self, writer: ShardWriter, statuses: list, key, record, image, outcome: Outcome) -> None:
        answer = outcome.answer
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
            )
            writer.add(
                key,
                {"jpg": image, "txt": answer.caption.encode(), "json": annotation.model_dump_json().encode()},
            )
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
            ).model_dump(mode="json")
        )
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def _prompt_version(self) -> str:
        if isinstance(self.annotator, MLLMAnnotator):
            return self.annotator.prompt.version
        return self.annotator.provenance.prompt_version


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


# One column per AnnotationStatus field; a test checks the two stay in step.
ANNOTATION_STATUS_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int64()),
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
        ("attempts", pa.int64()),
        ("latency_s", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached", pa.bool_()),
    ]
)


# -- Beam ---------------------------------------------------------------------------------------

METRICS_NAMESPACE = "facemllm"


def _start_server(config: AnnotateConfig):
    """(server or None, base URL) for this worker: a managed vLLM server, or the configured endpoint."""
    if config.annotator != "mllm":
        return None, None
    if config.server is not None:
        from facemllm.annotators.vllm_server import VLLMServer

        server = VLLMServer(config.server, config.request_model).start()
        return server, server.base_url
    return None, config.endpoint


class _OutcomeMetrics:
    def __init__(self) -> None:
        counter = lambda name: Metrics.counter(METRICS_NAMESPACE, name)  # noqa: E731
        self.counter = counter
        self.latency = Metrics.distribution(METRICS_NAMESPACE, "annotate_latency_ms")
        self.prompt_tokens = counter("annotate_prompt_tokens")
        self.completion_tokens = counter("annotate_completion_tokens")

    def __call__(self, outcome: Outcome) -> None:
        self.counter(f"annotate_{outcome.status}").inc()
        if outcome.cached:
            self.counter("annotate_cached").inc()
            return
        if outcome.latency_s is not None and outcome.attempts:
            self.latency.update(int(outcome.latency_s * 1000))
        if outcome.answer is not None:
            self.prompt_tokens.inc(outcome.answer.provenance.usage.prompt_tokens)
            self.completion_tokens.inc(outcome.answer.provenance.usage.completion_tokens)


class AnnotateDoFn(beam.DoFn):
    """Face shard id in, the same id out once its annotation shard is complete.

    ``out``: the run's output URL when it is an object store (``facemllm run``): the face shard is
    fetched into the worker's local mirror first and the finished annotation shard uploaded, its
    completion marker last, as the other stages do. None: local folders (``facemllm annotate``).
    """

    def __init__(self, config: AnnotateConfig, faces_dir: str, annotations_dir: str, out: str | None = None):
        self.config = config
        self.faces_dir = str(faces_dir)
        self.annotations_dir = str(annotations_dir)
        self.out = out
        self.server = None

    def setup(self):
        from facemllm.pipeline.core.storage import RunStore

        self.store = RunStore(self.out) if self.out is not None else None
        if self.store is not None:  # this worker's mirror (it may differ from the driver's)
            self.faces_dir = str(self.store.local / "faces")
            self.annotations_dir = str(self.store.local / "annotations")
        self.server, base_url = _start_server(self.config)
        self.metrics = _OutcomeMetrics()
        self.processor = AnnotationShardProcessor(
            self.config, Path(self.annotations_dir), base_url=base_url, on_outcome=self.metrics
        )

    def process(self, shard_id: int):
        paths = shard_paths(Path(self.annotations_dir), shard_id)
        unit = (paths["stats"], paths["tar"], paths["parquet"])  # completion marker first
        face_tar = shard_paths(Path(self.faces_dir), shard_id)["tar"]
        if self.store is not None:
            self.store.fetch_completed(*unit)
        skipped = self.processor.is_done(shard_id)
        if self.store is not None and not skipped:
            self.store.fetch(face_tar)
        stats = self.processor.process(shard_id, face_tar)
        if self.store is not None:
            self.store.push_completed(*unit)
        if not skipped:
            self.metrics.counter("annotate_requests").inc(stats["requests"])
            for reason, count in stats["retries"].items():
                self.metrics.counter(f"annotate_retries_{reason}").inc(count)
        self.metrics.counter("annotate_shards_skipped" if skipped else "annotate_shards").inc()
        yield shard_id

    def teardown(self):
        if self.server is not None:
            self.server.stop()
            self.server = None


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
            Metrics.counter(METRICS_NAMESPACE, f"annotate_{outcome.status}").inc()
            yield PredictionResult(element[0], outcome, self.config.request_model)

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": 4 * self.config.concurrency}

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


def run_annotate(faces_dir: Path, annotations_dir: Path, config: AnnotateConfig, runner=None):
    """``facemllm annotate``: this stage alone over completed face shards; returns its ShardManifest."""
    from facemllm.pipeline.config import RunnerConfig
    from facemllm.pipeline.core.manifest import shard_stage_manifest
    from facemllm.pipeline.core.shards import write_sizes
    from facemllm.pipeline.runners import make_runner, pipeline_options

    faces_dir, annotations_dir = Path(faces_dir), Path(annotations_dir)
    check_annotate_config(config)
    shards = completed_face_shards(faces_dir)
    if not shards:
        raise FileNotFoundError(f"--in {faces_dir}: no completed face shards (NNNNN_stats.json) there")
    annotations_dir.mkdir(parents=True, exist_ok=True)
    for stray in annotations_dir.glob(".*.tmp-*"):
        stray.unlink(missing_ok=True)
    runner = runner or RunnerConfig(direct_num_workers=1, direct_running_mode="in_memory")
    with beam.Pipeline(runner=make_runner(runner), options=pipeline_options(runner)) as pipeline:
        (
            pipeline
            | "FaceShards" >> beam.Create(shards)
            | "SpreadFaceShards" >> beam.Reshuffle()
            | "Annotate" >> beam.ParDo(AnnotateDoFn(config, str(faces_dir), str(annotations_dir)))
        )
    manifest = shard_stage_manifest(annotations_dir.parent, annotations_dir.name)
    write_sizes(annotations_dir, manifest.shards)
    return manifest
