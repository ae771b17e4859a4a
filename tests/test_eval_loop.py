"""The evaluator's closed loop on real parts: the fixture datasets reformatted, a tiny stage-3
checkpoint trained on them, scored in-process and served by the real vLLM CPU server."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from facemllm.annotators.vllm_server import free_port
from facemllm.evaluation.config import EvalConfig, ModelSpec
from facemllm.evaluation.report import load_results
from facemllm.evaluation.run import evaluate
from facemllm.pipeline.cli import main
from facemllm.pipeline.core.shards import iter_tar_samples
from facemllm.pipeline.core.storage import StorageOptions
from facemllm.pipeline.publishing.publish import publish
from facemllm.schemas import RunManifest
from facemllm.schemas.evaluation import EVAL_TASKS, EvalResult, Prediction
from tests.eval_fixture import build_qa, train_stage3
from tests.faultproxy_http import FaultProxy, image_hash
from tests.tiny_models import cached_model
from tests.vllm_server import served_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval-world")
    qa = build_qa(base)
    stage3 = train_stage3(qa, cached_model("idefics3", tmp_path_factory), base / "stage3")
    return qa, stage3


def predictions(folder: Path) -> list[Prediction]:
    return [
        Prediction.model_validate_json(line)
        for line in (folder / "predictions.jsonl").read_text().splitlines()
    ]


def check_complete(result: EvalResult) -> None:
    assert set(result.tasks) == set(EVAL_TASKS)
    for task in result.tasks.values():
        assert task.samples > 0, task.task
        assert task.metrics["unparsed_rate"].value is not None
        assert task.headline in task.metrics


@pytest.mark.slow
def test_in_process_and_vllm_served_checkpoint_give_the_same_parsed_predictions(world, tmp_path):
    """Over HTTP through a fault proxy: each image's first two requests fail (a 500, then a reset
    connection) and are retried; then one image fails for good, is counted, and is asked again by
    the next run, which completes the result."""
    qa, stage3 = world
    out = tmp_path / "results"
    client = {"max_retries": 3, "backoff_s": 0.05, "backoff_max_s": 0.2, "concurrency": 4}
    flaky = {0: "500", 1: "reset"}
    with served_checkpoint(stage3, tmp_path / "vllm.log", name="stage3") as url:
        with FaultProxy(url, lambda image, attempt: flaky.get(attempt)) as proxy:
            config = EvalConfig(
                data=str(qa),
                out=str(out),
                models=[
                    ModelSpec(label="in-process", checkpoint=str(stage3)),
                    ModelSpec.parse(f"served={proxy.url}"),
                ],
                bootstrap_resamples=200,
                client=client,
            )
            local, served = evaluate(config)
            faults = Counter(event.fault for event in proxy.events)
        assert faults["500"] == faults["reset"] > 0

        broken = image_hash(next(iter_tar_samples(next((qa / "rafdb" / "test").glob("*.tar"))))[1]["jpg"])
        outage = {"on": True}
        with FaultProxy(
            url, lambda image, attempt: "500" if outage["on"] and image == broken else None
        ) as proxy:
            again = config.model_copy(
                update={
                    "out": str(tmp_path / "again"),
                    "models": [ModelSpec.parse(f"again={proxy.url}#stage3")],
                }
            )
            partial = evaluate(again)[0]
            assert partial.tasks["expression"].failed_requests > 0
            failed = [p for p in predictions(tmp_path / "again" / "again") if p.status == "failed_request"]
            assert failed and all(
                not p.correct and p.reply is None and "server_error" in p.error for p in failed
            )
            outage["on"] = False  # the server is back: only the failed questions are asked again
            proxy.reset_counts()
            resumed = evaluate(again)[0]
            assert len(proxy.events) == len(failed)
    assert resumed.tasks == served.tasks

    for result in (local, served):
        check_complete(result)
    assert local.data.data_hash == served.data.data_hash
    assert served.model.kind == "endpoint" and served.model.served_model == "stage3"
    ours, theirs = predictions(out / "in-process"), predictions(out / "served")
    assert [p.key for p in ours] == [p.key for p in theirs]
    assert [(p.key, p.status, p.parsed) for p in ours] == [(p.key, p.status, p.parsed) for p in theirs]
    assert sum(p.status == "parsed" for p in ours) > len(ours) / 3  # the trained model answers in form
    for name in EVAL_TASKS:
        assert local.tasks[name].metrics == served.tasks[name].metrics
    comparison = (out / "comparison.md").read_text()
    assert "in-process" in comparison and "served" in comparison and local.data.data_hash in comparison


def test_a_killed_run_resumes_to_the_same_result_and_asks_only_what_is_missing(world, tmp_path, capsys):
    qa, stage3 = world
    out = tmp_path / "results"
    args = [
        "eval",
        "--model",
        f"stage3={stage3}",
        "--data",
        str(qa),
        "--out",
        str(out),
        "--set",
        "bootstrap_resamples=100",
    ]
    assert main(args) == 0
    first = (out / "stage3" / "result.json").read_text()
    report = (out / "stage3" / "report.html").read_text()
    assert "confusion" in report and "<img" in report and "worst examples" in report
    replies = sorted((out / "stage3" / "replies").rglob("*.jsonl"))
    total = sum(len(path.read_text().splitlines()) for path in replies)
    # a kill mid-run: one shard's replies were never written, another's last line is torn
    replies[0].unlink()
    torn = replies[1].read_bytes()
    replies[1].write_bytes(torn[: len(torn) - 7])
    (out / "stage3" / "result.json").unlink()
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().err
    asked = sum(
        int(line.split(": ")[1].split()[0]) - int(line.split(", ")[1].split()[0])
        for line in log.splitlines()
        if "questions" in line
    )
    assert 0 < asked < total
    assert (out / "stage3" / "result.json").read_text() == first
    # everything recorded: a third run asks nothing
    assert main(args) == 0
    assert all(
        " 0 questions" in line or line.split(": ")[1].split()[0] == line.split(", ")[1].split()[0]
        for line in capsys.readouterr().err.splitlines()
        if "questions" in line
    )


def test_subsampling_is_seeded_and_changes_the_data_hash(world, tmp_path):
    qa, stage3 = world
    common = dict(data=str(qa), models=[ModelSpec(label="m", checkpoint=str(stage3))], bootstrap_resamples=50)
    full = evaluate(EvalConfig(out=str(tmp_path / "full"), tasks=["gender"], **common))[0]
    one = evaluate(EvalConfig(out=str(tmp_path / "a"), tasks=["gender"], max_samples_per_task=6, **common))[0]
    two = evaluate(EvalConfig(out=str(tmp_path / "b"), tasks=["gender"], max_samples_per_task=6, **common))[0]
    assert one.tasks["gender"].samples < full.tasks["gender"].samples
    assert [p.key for p in predictions(tmp_path / "a" / "m")] == [
        p.key for p in predictions(tmp_path / "b" / "m")
    ]
    assert one.data.data_hash == two.data.data_hash != full.data.data_hash
    summary = json.loads((tmp_path / "a" / "comparison.json").read_text())
    assert list(summary) == [one.data.data_hash]


def test_a_dataset_published_to_s3_scores_like_the_local_output(world, s3_bucket, tmp_path):
    """``--data s3://...`` names a published run (SeaweedFS here): its manifest lists the QA shards."""
    qa, stage3 = world
    run = tmp_path / "run"
    shutil.copytree(qa, run / "qa")
    (run / "manifest.json").write_text(
        RunManifest(config_hash="fixture", package_versions={}, stages={}).model_dump_json()
    )
    dest = f"{s3_bucket}/eval-fixture"
    publish(run, dest, StorageOptions(progress=False))
    common = dict(
        models=[ModelSpec(label="m", checkpoint=str(stage3))],
        tasks=["expression", "zeroshot_attributes"],
        bootstrap_resamples=50,
    )
    local = evaluate(EvalConfig(data=str(qa), out=str(tmp_path / "local"), **common))[0]
    remote = evaluate(EvalConfig(data=dest, out=str(tmp_path / "remote"), **common))[0]
    assert remote.tasks == local.tasks
    ours, theirs = predictions(tmp_path / "local" / "m"), predictions(tmp_path / "remote" / "m")
    assert [(p.key, p.reply, p.parsed) for p in ours] == [(p.key, p.reply, p.parsed) for p in theirs]
    assert {p.shard.split("/")[0] for p in theirs} == {"qa"}  # shard urls relative to the published prefix
    assert remote.data.data_hash != local.data.data_hash  # another manifest: never compared in one table


@pytest.mark.parametrize("kind", ["llava", "idefics3"])
def test_batched_generation_matches_one_question_at_a_time(kind, world, tmp_path, tmp_path_factory):
    """Left padding in a batch changes no reply, for both image layouts (LLaVA flat, Idefics3 nested)."""
    qa, _ = world
    model = cached_model(kind, tmp_path_factory)
    common = dict(data=str(qa), tasks=["expression", "gender"], bootstrap_resamples=10, max_new_tokens=12)
    for batch in (1, 16):
        evaluate(
            EvalConfig(
                out=str(tmp_path / str(batch)),
                models=[ModelSpec(label=kind, checkpoint=str(model))],
                batch_size=batch,
                **common,
            )
        )
    one, many = predictions(tmp_path / "1" / kind), predictions(tmp_path / "16" / kind)
    assert len(one) > 20
    assert [(p.key, p.reply) for p in one] == [(p.key, p.reply) for p in many]


def test_an_unreachable_endpoint_fails_every_request_and_the_command_says_so(world, tmp_path, capsys):
    qa, _ = world
    port = free_port()  # nothing listens there: every connection is refused
    args = [
        "eval",
        "--model",
        f"down=http://127.0.0.1:{port}/v1#m",
        "--data",
        str(qa),
        "--out",
        str(tmp_path),
    ]
    settings = ["--tasks", "expression", "--set", "client.max_retries=1", "--set", "client.backoff_s=0"]
    assert main([*args, *settings]) == 1
    assert "requests failed after retries; rerun" in capsys.readouterr().err
    (result,) = load_results(tmp_path)
    task = result.tasks["expression"]
    assert task.failed_requests == task.samples > 0 and task.metrics["accuracy"].value == 0.0
    assert not list(tmp_path.rglob("replies/**/*.jsonl"))  # nothing recorded: a rerun asks every question
