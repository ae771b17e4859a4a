"""The annotate client and stage against a hostile OpenAI-compatible server (loopback).

Every misbehaviour a server has shown us, old and new: each ends as a named status row, the run
completes, nothing of the API key reaches the disk, and no reply can exhaust memory or hang a
shard. The same client serves the evaluator, so this covers its requests too.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks._common import peak_rss_mb, reset_peak_rss
from facemllm.annotators.annotate_config import AnnotateConfig
from facemllm.annotators.mllm_client import ChatClient, MLLMAnnotator, Outcome
from facemllm.annotators.request_cache import RequestCache
from facemllm.pipeline.cli import main
from facemllm.pipeline.core.shards import iter_tar_samples, shard_paths
from facemllm.pipeline.stages.annotate import CACHE_DIR_NAME, AnnotateStage
from facemllm.pipeline.stages.framework import execute_unit
from facemllm.schemas.annotation import AnnotationStatus
from tests.hostile_openai import HostileServer
from tests.test_annotate import FRONTAL, example_attributes, face_record, write_face_shard

API_KEY = "sk-hostile-test-0123456789abcdef/+xyz"
ANSWER = {"caption": "A smiling adult with short dark hair.", "attributes": example_attributes()}


def client_config(url: str, **changes) -> AnnotateConfig:
    settings = {
        "endpoint": url,
        "model": "hostile",
        "timeout_s": 1.0,
        "connect_timeout_s": 1.0,
        "deadline_s": 3.0,
        "max_retries": 1,
        "backoff_s": 0.0,
        "backoff_max_s": 0.05,
        "max_response_bytes": 1 << 20,
        "structured_output": "none",
    }
    return AnnotateConfig(**{**settings, **changes})


def annotate_one(config: AnnotateConfig) -> Outcome:
    async def go() -> Outcome:
        async with ChatClient(config.endpoint, config) as client:
            return await MLLMAnnotator(config).annotate(client, "k", b"\xff\xd8jpeg")

    return asyncio.run(go())


# behaviour -> (status, HTTP requests the client makes with max_retries=1 and one repair)
BEHAVIOURS = {
    "ok": ("success", 1),
    "trickle": ("timeout", 2),
    "stall_headers": ("timeout", 2),
    "reset": ("connection_error", 2),
    "invalid_json": ("malformed_response", 2),
    "error_object": ("malformed_response", 2),
    "null_content": ("malformed_response", 2),
    "gzip_bomb": ("malformed_response", 1),
    "huge_body": ("malformed_response", 1),
    "huge_declared": ("malformed_response", 1),
    "unknown_encoding": ("malformed_response", 1),
    "schema_violation": ("invalid_output", 2),
    "prose": ("invalid_output", 2),
    "echo_key_401": ("client_error", 1),
    "echo_key_500": ("server_error", 2),
    "rate_limited": ("rate_limited", 2),
    "rate_limited_inf": ("rate_limited", 2),
    "huge_usage": ("success", 1),
    "negative_usage": ("success", 1),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_each_misbehaviour_ends_as_its_named_status_in_bounded_time(behaviour, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    status, requests = BEHAVIOURS[behaviour]
    with HostileServer([behaviour], ANSWER, trickle_s=0.3) as server:
        started = time.monotonic()
        outcome = annotate_one(client_config(server.url))
        took = time.monotonic() - started
    assert (outcome.status, len(server.requests)) == (status, requests), outcome.error
    assert outcome.attempts == requests
    assert took < 2 * 3.0 + 2  # two attempts, each within deadline_s
    assert all(seen.authorization == f"Bearer {API_KEY}" for seen in server.requests)
    assert API_KEY not in (outcome.error or "")
    if outcome.answer is not None:
        usage = outcome.answer.provenance.usage
        assert 0 <= usage.prompt_tokens <= 10 and 0 <= usage.completion_tokens <= 5


def test_trickling_server_is_cut_off_at_the_deadline_not_per_read(monkeypatch):
    """Attack 1: one byte every 0.3 s never trips a 1 s read timeout; the deadline ends it."""
    with HostileServer(["trickle"], ANSWER, trickle_s=0.3) as server:
        started = time.monotonic()
        outcome = annotate_one(client_config(server.url, max_retries=0, deadline_s=2.0))
    assert outcome.status == "timeout" and "deadline_s=2.0" in outcome.error
    assert 1.9 < time.monotonic() - started < 4


def test_a_repaired_answer_after_a_bad_one_and_retries_after_rate_limits(monkeypatch):
    with HostileServer(["rate_limited", "prose", "ok"], ANSWER) as server:
        outcome = annotate_one(client_config(server.url, max_retries=2))
    assert outcome.status == "success" and outcome.answer.provenance.repaired
    assert server.behaviours() == ["rate_limited", "prose", "ok"] and outcome.attempts == 3


def test_gzip_bomb_is_refused_within_bounded_memory():
    """Attack 4: 0.5 MB of gzip that inflates to 512 MiB took one process to 12.4 GB."""
    with HostileServer(["gzip_bomb"], ANSWER) as server:
        config = client_config(server.url, max_response_bytes=16 << 20, max_retries=0)
        reset_peak_rss()
        before = peak_rss_mb()
        outcome = annotate_one(config)
        grew = peak_rss_mb() - before
    assert outcome.status == "malformed_response" and "once inflated" in outcome.error
    assert grew < 100, f"peak grew {grew:.0f} MiB reading a bomb"


# -- the stage: status rows, what lands on disk, the cache ---------------------------------------


def face_shard(root: Path, keys: list[str]) -> None:
    write_face_shard(
        shard_paths(root / "faces", 0)["tar"],
        {k: face_record(k, (1.0, 1.0, 50.0, 60.0), FRONTAL) for k in keys},
    )


def run_stage(root: Path, config: AnnotateConfig) -> tuple[dict, list[dict]]:
    stage = AnnotateStage(config).bind(root)
    stage.setup()
    try:
        stats, _ = execute_unit(stage, 0)
    finally:
        stage.teardown()
    return stats, pq.read_table(shard_paths(root / "annotations", 0)["parquet"]).to_pylist()


def every_byte_under(root: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file())


@pytest.mark.timeout(60)
def test_stage_writes_a_status_row_for_a_trickling_server(tmp_path):
    """Attack 1, as the run saw it: killed after 150 s with no status row."""
    face_shard(tmp_path, ["000000000_00"])
    with HostileServer(["trickle"], ANSWER, trickle_s=0.3) as server:
        stats, rows = run_stage(tmp_path, client_config(server.url, max_retries=0, deadline_s=1.5))
    assert stats["status"] == {"timeout": 1} and rows[0]["status"] == "timeout"


@pytest.mark.timeout(60)
def test_a_stalled_request_does_not_hold_back_the_faces_after_it(tmp_path):
    """The answers wait for key order on disk, not in a window of requests: while the first face's
    request stalls until its timeout, every other face is asked and answered (with a window of
    4 x concurrency answers written in key order, 8 would have been, then nothing)."""
    keys = [f"{index:09d}_00" for index in range(40)]
    face_shard(tmp_path, keys)
    with HostileServer(["stall_headers", "ok"], ANSWER) as server:
        stats, rows = run_stage(tmp_path, client_config(server.url, concurrency=2, timeout_s=1.5))
    arrived = [seen.at - server.requests[0].at for seen in server.requests]
    assert len(arrived) == len(keys) + 1 and arrived[-1] >= 1.5  # the retry of the stalled request
    assert max(arrived[:-1]) < 1.5  # every other face was asked while it stalled
    assert stats["status"] == {"success": len(keys)} and [row["key"] for row in rows] == keys


def test_api_key_echoed_by_the_server_never_reaches_the_disk(tmp_path, monkeypatch):
    """Attack 2: error bodies (and captions) that echo the Authorization header."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    keys = ["000000000_00", "000000000_01", "000000000_02"]
    face_shard(tmp_path, keys)
    with HostileServer(["echo_key_401", "echo_key_500", "echo_key_caption"], ANSWER) as server:
        stats, rows = run_stage(tmp_path, client_config(server.url, max_retries=0, concurrency=1))
    assert stats["status"] == {"client_error": 1, "server_error": 1, "success": 1}
    assert all("[redacted]" in (row["error"] or "") for row in rows if row["status"] != "success")
    captions = [
        json.loads(sample["json"])["caption"]
        for _, sample in iter_tar_samples(shard_paths(tmp_path / "annotations", 0)["tar"])
    ]
    assert captions == ["A face; the server saw the key [redacted] here."]
    written = every_byte_under(tmp_path / "annotations")
    assert API_KEY.encode() not in written and API_KEY.replace("/", "\\/").encode() not in written


def test_absurd_usage_is_ignored_and_a_poisoned_cache_entry_is_asked_again(tmp_path):
    """Attack 3: usage.prompt_tokens = 2**70 raised OverflowError in a counter, after the reply was
    cached, so every rerun crashed again without asking."""
    face_shard(tmp_path, ["000000000_00"])
    with HostileServer(["huge_usage"], ANSWER) as server:
        stats, rows = run_stage(tmp_path, client_config(server.url))
    assert stats["status"] == {"success": 1} and rows[0]["prompt_tokens"] == 0
    assert rows[0]["completion_tokens"] == 5

    # A cache written by a version without the bound: the entry holds the absurd count.
    cache_file = tmp_path / "annotations" / CACHE_DIR_NAME / "00000.jsonl"
    entry = json.loads(cache_file.read_text().splitlines()[0])
    entry["value"]["provenance"]["usage"]["prompt_tokens"] = 2**70
    cache_file.write_text(json.dumps(entry) + "\n")
    for path in shard_paths(tmp_path / "annotations", 0).values():
        path.unlink()
    with HostileServer(["ok"], ANSWER) as server:
        stats, rows = run_stage(tmp_path, client_config(server.url))
        assert server.behaviours() == ["ok"]  # the bad entry was discarded and asked again
    assert stats["status"] == {"success": 1} and rows[0]["prompt_tokens"] == 10 and not rows[0]["cached"]
    assert len(RequestCache(cache_file)) == 1
    AnnotationStatus.model_validate(rows[0])


def test_annotate_command_exits_1_loudly_when_too_many_faces_fail(tmp_path, capsys):
    """45 of 45 faces invalid_output used to exit 0 with nothing but the summary table."""
    keys = [f"000000000_{n:02d}" for n in range(4)]
    face_shard(tmp_path, keys)
    (tmp_path / "faces" / "00000_stats.json").write_text("{}")
    with HostileServer(["ok", "prose"], ANSWER) as server:
        args = ["annotate", "--in", str(tmp_path / "faces"), "--out", str(tmp_path / "annotations")]
        args += ["--endpoint", server.url, "--model", "hostile", "--concurrency", "1"]
        args += ["--set", "annotate.max_retries=0", "--set", "annotate.repair=false"]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "FAILED: 3 of 4 faces sent got no valid annotation (invalid_output 3)" in err
        assert "annotate.max_failure_rate=0.05" in err
        # a tolerated rate: the same complete shards (trusted, nothing asked again), exit 0
        assert main([*args, "--set", "annotate.max_failure_rate=0.8"]) == 0
        assert len(server.requests) == 4


def test_the_annotate_client_keeps_to_its_request_rate():
    """annotate.max_requests_per_second: concurrency 8, but no more than 10 requests a second."""

    async def ask_many(config: AnnotateConfig) -> float:
        async with ChatClient(config.endpoint, config) as client:
            annotator = MLLMAnnotator(config)
            started = time.monotonic()
            await asyncio.gather(*(annotator.annotate(client, f"k{i}", b"\xff\xd8jpeg") for i in range(12)))
            return time.monotonic() - started

    with HostileServer(["ok"], ANSWER) as server:
        assert (
            asyncio.run(ask_many(client_config(server.url, concurrency=8, max_requests_per_second=10)))
            >= 1.05
        )
        assert len(server.requests) == 12
