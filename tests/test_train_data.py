"""The trainer's data path: answer-only masking, collation, splitting, determinism, resumption."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from facemllm.pipeline.cli import main
from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples
from facemllm.pipeline.core.storage import StorageOptions
from facemllm.pipeline.demo.face_datasets import build_celeba
from facemllm.pipeline.stages.reformat import load_reformat_config, run_reformat
from facemllm.schemas import QAImageSample
from facemllm.training.config import DataConfig, TrainRunConfig
from facemllm.training.data import (
    Collator,
    ConversationEncoder,
    Item,
    RawSample,
    ShardBatches,
    SourceStream,
    expand_shards,
    image_tokens_estimate,
)
from facemllm.training.model import build_model
from facemllm.training.templates import conversation_to_messages
from tests.tiny_models import cached_model, color_image, qa_record, write_qa_shards

STORAGE = StorageOptions(progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    write_qa_shards(folder, shards=4, per_shard=12)
    return folder


def loaded(kind, tmp_path_factory):
    from facemllm.training.config import ModelConfig

    return build_model(ModelConfig(pretrained=str(cached_model(kind, tmp_path_factory))))


@pytest.mark.parametrize("kind", ["llava", "idefics3"])
def test_answer_only_masking_and_splice_match_the_processor(kind, tmp_path_factory):
    model = loaded(kind, tmp_path_factory)
    processor = model.processor
    encoder = ConversationEncoder(processor, 512, image_tokens_estimate(processor, model.family))
    record = qa_record("k0", "red", turns=2)
    record["conversations"][3]["value"] = "Still red."
    messages, n_images = conversation_to_messages(record["conversations"])
    assert n_images == 1
    ids, mask, text = encoder.encode_messages(messages)
    tokenizer = processor.tokenizer

    labelled = tokenizer.decode(ids[mask])
    unlabelled = tokenizer.decode(ids[~mask])
    eos = tokenizer.eos_token
    # exactly the two answers (with the end-of-turn token that teaches the model to stop) are labelled
    assert "The background is red." in labelled and "Still red." in labelled
    assert labelled.count(eos) == 2
    assert "What color" not in labelled and "The background" not in unlabelled
    assert "What color is the background" in unlabelled and "<image>" in unlabelled
    runs = np.flatnonzero(np.diff(mask.astype(int)) == 1)
    assert len(runs) == 2  # two separate labelled stretches

    # the collated batch is what the processor would give for the whole text, image tokens unlabelled
    image_bytes = color_image("red", 40, np.random.default_rng(0))
    item = Item("k0", 0, ids, mask, image_bytes, len(ids))
    data = DataConfig(sources=[{"name": "x", "urls": ["unused"]}], pad_to_multiple_of=1)
    batch = Collator(processor, model.family, data, encoder)([item], Counter())
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    reference = processor(
        text=[text],
        images=[[image]] if kind == "idefics3" else [image],
        add_special_tokens=False,
        return_tensors="pt",
    )
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.allclose(batch["pixel_values"], reference["pixel_values"])
    image_positions = batch["input_ids"][0] == encoder.image_token_id
    assert image_positions.sum() > 1  # the placeholder was expanded
    assert (batch["labels"][0][image_positions] == -100).all()
    labelled_ids = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(labelled_ids) == labelled
    assert batch["meta"]["n_label_tokens"] == int(mask.sum())


def keys_of(stream: SourceStream, n: int) -> list[str]:
    iterator = iter(stream)
    return [next(iterator).key for _ in range(n)]


@pytest.mark.parametrize(("n_shards", "nslots"), [(4, 2), (2, 4)])
def test_slots_split_the_data_disjointly_and_an_epoch_covers_it(tmp_path, n_shards, nslots):
    write_qa_shards(tmp_path, shards=n_shards, per_shard=8)
    shards = expand_shards([str(tmp_path)], STORAGE)
    assert [s.nsamples for s in shards] == [8] * n_shards  # from sizes.json
    epoch = n_shards * 8 // nslots
    seen = [
        keys_of(SourceStream(0, shards, 7, slot, nslots, False, STORAGE, Counter()), epoch)
        for slot in range(nslots)
    ]
    flat = [k for keys in seen for k in keys]
    assert len(set(flat)) == len(flat) == n_shards * 8  # disjoint, and together every sample once
    again = keys_of(SourceStream(0, shards, 7, 0, nslots, False, STORAGE, Counter()), epoch)
    assert again == seen[0]  # the same seed gives the same order


def test_a_source_resumes_from_its_position(shards):
    listed = expand_shards([f"{shards}/{{00000..00003}}.tar"], STORAGE)
    stream = SourceStream(0, listed, 3, 1, 3, True, STORAGE, Counter())
    iterator = iter(stream)
    first = [next(iterator).key for _ in range(17)]
    position = stream.position
    rest = [next(iterator).key for _ in range(20)]
    resumed = SourceStream(0, listed, 3, 1, 3, True, STORAGE, Counter())
    resumed.position = position
    assert keys_of(resumed, 20) == rest
    assert len(set(first)) > 1


def make_batches(shards, tmp_path_factory, **data_overrides):
    model = loaded("idefics3", tmp_path_factory)
    data = DataConfig.model_validate(
        {
            "sources": [
                {"name": "a", "urls": [str(shards)], "weight": 3},
                {"name": "b", "urls": [f"{shards}/00000.tar"], "weight": 1},
            ],
            "batch_size": 3,
            "num_workers": 2,
            "segment_samples": 10,
            "shuffle_buffer": 5,
            "group_by_length": 2,
            **data_overrides,
        }
    )
    return ShardBatches(
        data, [expand_shards(s.urls, STORAGE) for s in data.sources], model.processor, model.family, 5, 0, 1
    )


def test_a_stream_replays_exactly_from_a_saved_position(shards, tmp_path_factory):
    dataset = make_batches(shards, tmp_path_factory)
    stream = iter(dataset.stream(1))
    batches = [next(stream) for _ in range(9)]  # several segments
    assert {s for b in batches for s in b["meta"]["sources"]} == {0, 1}  # both sources mixed in
    position = batches[4]["position"]
    assert position["segment"] >= 1
    resumed = dataset.stream(1)
    resumed.start = json.loads(json.dumps(position))  # as saved in a checkpoint
    again = iter(resumed)
    for expected in batches[5:]:
        got = next(again)
        assert got["meta"]["keys"] == expected["meta"]["keys"]
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
    other = iter(dataset.stream(0))
    assert [next(other)["meta"]["keys"] for _ in range(3)] != [b["meta"]["keys"] for b in batches[:3]]


def test_bad_samples_and_shards_are_counted_never_fatal(tmp_path, tmp_path_factory):
    rng = np.random.default_rng(0)
    good = json.dumps(qa_record("x", "red")).encode()
    with ShardWriter(tmp_path / "00000.tar") as writer:
        writer.add("a01", {"jpg": color_image("red", 32, rng), "json": b"{broken"})
        writer.add("a02", {"jpg": b"not a jpeg at all", "json": good})
        writer.add(
            "a03", {"jpg": color_image("blue", 32, rng), "json": json.dumps({"conversations": []}).encode()}
        )
        for i in range(4, 12):
            writer.add(f"a{i:02d}", {"jpg": color_image("green", 32, rng), "json": good})
    text_only = {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
    with ShardWriter(tmp_path / "00001.tar") as writer:
        for i in range(6):
            writer.add(f"b{i}", {"json": json.dumps(text_only).encode()})
    whole = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(whole[: len(whole) // 2 + 100])  # a truncated shard
    dataset = make_batches(
        tmp_path,
        tmp_path_factory,
        sources=[{"name": "bad", "urls": [str(tmp_path)]}],
        num_workers=0,
        segment_samples=12,
        group_by_length=1,
    )
    stream = iter(dataset.stream(0))
    batches = [next(stream) for _ in range(8)]
    skipped = batches[-1]["meta"]["skipped"]
    assert skipped["bad_conversation"] >= 2 and skipped["bad_image"] >= 1 and skipped["bad_shard"] >= 1
    # text-only samples train too; in a mixed batch their rows get no image (zeros, dropped by the model)
    keys = [k for b in batches for k in b["meta"]["keys"]]
    assert any(k.startswith("b") for k in keys) and any(k.startswith("a") for k in keys)


def test_a_bad_config_stops_before_any_work(tmp_path, capsys):
    base = {
        "output_dir": str(tmp_path / "out"),
        "stage": 1,
        "model": {"pretrained": "x"},
        "data": {"sources": [{"name": "a", "urls": "x"}]},
        "loop": {"max_steps": 1},
    }
    TrainRunConfig.model_validate(base)
    with pytest.raises(ValueError, match="not both"):
        TrainRunConfig.model_validate({**base, "model": {"pretrained": "x", "vision_tower": "y"}})
    with pytest.raises(ValueError, match="exactly one of max_steps and epochs"):
        TrainRunConfig.model_validate({**base, "loop": {}})
    mixture = {"sources": [{"name": "a", "urls": "x"}, {"name": "b", "urls": "y"}]}
    with pytest.raises(ValueError, match="use max_steps"):
        TrainRunConfig.model_validate({**base, "data": mixture, "loop": {"epochs": 1}})
    with pytest.raises(ValueError, match="lora"):
        TrainRunConfig.model_validate({**base, "tune": {"lora": {"enabled": True}}})
    config = tmp_path / "bad.yaml"
    config.write_text(
        "output_dir: o\nstage: 4\nmodel: {pretrained: x}\ndata: {sources: []}\nloop: {max_steps: 1}\n"
    )
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "stage" in err and "sources" in err
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        f"output_dir: {tmp_path / 'o'}\nstage: 1\nmodel: {{pretrained: x}}\n"
        f"data: {{sources: [{{name: a, urls: {tmp_path / 'nothing-here'}}}]}}\nloop: {{max_steps: 1}}\n"
    )
    assert main(["train", str(missing)]) == 2  # no shards: stops before the model loads
    assert "nothing-here" in capsys.readouterr().err


def test_raw_sample_without_image_member_but_placeholder_is_skipped(tmp_path_factory):
    model = loaded("llava", tmp_path_factory)
    encoder = ConversationEncoder(model.processor, 512, 16)
    from facemllm.training.data import SkipSample

    raw = RawSample("k", {"json": json.dumps(qa_record("k", "red")).encode()}, 0)
    with pytest.raises(SkipSample, match="missing_image"):
        encoder.encode(raw)


def test_an_image_sample_of_the_qa_shards_labels_every_answer_and_nothing_else(tmp_path, tmp_path_factory):
    """A reformatted CelebA image sample is one multi-turn conversation: each of its answers (with
    the end-of-turn token) is a labelled stretch, in order, and no question token is labelled."""
    truth = build_celeba(tmp_path / "celeba")
    config = load_reformat_config(
        None,
        ["runner.direct_running_mode=in_memory"],
        dataset="celeba",
        root=str(truth.root),
        out=str(tmp_path / "qa"),
    )
    run_reformat(config)
    model = loaded("llava", tmp_path_factory)
    tokenizer = model.processor.tokenizer
    encoder = ConversationEncoder(model.processor, 2048, image_tokens_estimate(model.processor, model.family))
    checked = 0
    for tar in sorted((tmp_path / "qa" / "celeba" / "train").glob("*.tar")):
        for key, members in iter_tar_samples(tar):
            sample = QAImageSample.model_validate_json(members["json"])
            item = encoder.encode(RawSample(key, members, 0))
            starts = np.flatnonzero(np.diff(np.r_[0, item.label_mask.astype(int), 0]) == 1)
            ends = np.flatnonzero(np.diff(np.r_[0, item.label_mask.astype(int), 0]) == -1)
            stretches = [
                tokenizer.decode(item.input_ids[a:b]).strip() for a, b in zip(starts, ends, strict=True)
            ]
            answers = [turn.value for turn in sample.conversations[1::2]]
            assert stretches == [f"{answer}{tokenizer.eos_token}" for answer in answers], key
            checked += len(sample.questions) > 1
    assert checked >= 3  # multi-question samples were among them
