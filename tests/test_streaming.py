"""The stage executor's streamed pair (``execute_streamed``): the next stage works on each sample
while the first is still producing, and never completes on a failed or partial source."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from facemllm.pipeline.core.files import write_json_atomic
from facemllm.pipeline.stages.framework import StreamingSink, StreamingSource, UnitResult, execute_streamed


class Producer(StreamingSource):
    """Writes ``count`` samples; after the first, waits until the consumer has seen it."""

    name = "producer"

    def __init__(self, count: int, fail_after: int | None = None):
        self.count, self.fail_after = count, fail_after
        self.first_consumed = threading.Event()
        self.waited_for_consumer = False
        self.handed_over = 0

    def marker(self, unit: int) -> Path:
        return self.root / "produced" / f"{unit}.json"

    def folders(self) -> list[Path]:
        return [self.root / "produced"]

    def process(self, unit, on_sample=None) -> UnitResult:
        for index in range(self.count):
            if index == self.fail_after:
                raise OSError("the network went away")
            if on_sample is not None:
                on_sample(f"{unit:03d}{index:03d}", b"data", {"index": index})
                self.handed_over += 1
            if index == 0 and on_sample is not None:
                self.waited_for_consumer = self.first_consumed.wait(timeout=10)
        return UnitResult({"samples": self.count})


class Consumer(StreamingSink):
    name = "consumer"

    def __init__(self, producer: Producer, delay_s: float = 0.0, fail_at: int | None = None):
        self.producer, self.delay_s, self.fail_at = producer, delay_s, fail_at
        self.most_waiting = 0  # samples the producer had handed over and this had not taken yet

    def marker(self, unit: int) -> Path:
        return self.root / "consumed" / f"{unit}.json"

    def folders(self) -> list[Path]:
        return [self.root / "consumed"]

    def process(self, unit) -> UnitResult:
        produced = self.producer.marker(unit)
        return UnitResult({"keys": "read", "from": str(produced)})

    def process_stream(self, unit, samples) -> UnitResult:
        keys = []
        for key, _, _ in samples:
            if len(keys) == self.fail_at:
                raise ValueError("a sample the sink cannot take")
            keys.append(key)
            self.producer.first_consumed.set()
            self.most_waiting = max(self.most_waiting, self.producer.handed_over - len(keys))
            time.sleep(self.delay_s)
        return UnitResult({"keys": keys})


def pair(tmp_path, consumer: dict | None = None, **producer) -> tuple[Producer, Consumer]:
    source = Producer(**producer).bind(tmp_path)
    return source, Consumer(source, **(consumer or {})).bind(tmp_path)


def test_the_sink_consumes_each_sample_while_the_source_is_still_producing(tmp_path):
    source, sink = pair(tmp_path, count=5)
    (produced, skipped_source), (consumed, skipped_sink) = execute_streamed(source, sink, 2)
    assert source.waited_for_consumer, "the sink saw nothing until the source had finished"
    assert consumed == {"keys": [f"002{i:03d}" for i in range(5)]} and produced == {"samples": 5}
    assert not skipped_source and not skipped_sink
    assert source.marker(2).exists() and sink.marker(2).exists()


def test_a_failed_source_leaves_the_sink_incomplete_and_a_rerun_completes_both(tmp_path):
    source, sink = pair(tmp_path, count=5, fail_after=3)
    with pytest.raises(OSError, match="network went away"):
        execute_streamed(source, sink, 1)
    assert not source.marker(1).exists() and not sink.marker(1).exists()

    source.fail_after = None
    (_, skipped_source), (consumed, _) = execute_streamed(source, sink, 1)
    assert not skipped_source and consumed["keys"] == [f"001{i:03d}" for i in range(5)]


def test_a_completed_source_is_read_from_its_files_not_redone(tmp_path):
    source, sink = pair(tmp_path, count=5)
    write_json_atomic(source.marker(4), {"samples": 5})
    (produced, skipped_source), (consumed, skipped_sink) = execute_streamed(source, sink, 4)
    assert skipped_source and produced == {"samples": 5} and not skipped_sink
    assert consumed == {"keys": "read", "from": str(source.marker(4))}
    assert execute_streamed(source, sink, 4) == [(produced, True), (consumed, True)]


def test_a_slow_sink_holds_back_the_source_at_the_buffer(tmp_path):
    source, sink = pair(tmp_path, consumer={"delay_s": 0.005}, count=60)
    (_, _), (consumed, _) = execute_streamed(source, sink, 0, buffer=4)
    assert len(consumed["keys"]) == 60
    assert 2 <= sink.most_waiting <= 4 + 1  # the queue, plus the one being handed over


def test_a_failed_sink_lets_the_source_finish_alone_and_never_completes(tmp_path):
    """With the buffer full and nobody reading, the source must not wait forever."""
    source, sink = pair(tmp_path, consumer={"fail_at": 1}, count=40)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            execute_streamed(source, sink, 5, buffer=2)
        except ValueError as err:
            failure.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the source waited forever on a sink that had failed"
    assert failure and source.marker(5).exists() and not sink.marker(5).exists()
