"""The whole recipe as one command: the demo recipe end to end, then a rerun and a changed setting.

``facemllm demo`` runs configs/demo_recipe.yaml on the bundled sample: real photos served from
loopback, SCRFD, the template annotator, the four fixture face datasets, a tiny LLaVA assembled
from a CLIP tower and a Llama LM, three training stages and the evaluator.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from facemllm.annotators.model_store import ensure_scrfd_package
from facemllm.pipeline.cli import main
from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples
from facemllm.pipeline.demo.run import demo_recipe, run_demo, start_server
from facemllm.pipeline.demo.sample import build_demo_sample, package_photos
from facemllm.pipeline.recipe import Recipe
from facemllm.schemas import read_qa_samples
from facemllm.schemas.evaluation import EVAL_TASKS, EvalResult

STEPS = [
    "acquire",
    "annotate",
    "laion_face_qa",
    "reformat_celeba",
    "reformat_rafdb",
    "reformat_utkface",
    "reformat_fairface",
    "stage1",
    "stage2",
    "stage3",
    "evaluate",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, scrfd_dir) -> Path:
    out = tmp_path_factory.mktemp("recipe") / "demo"
    assert run_demo(out) == 0
    return out


def step_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "recipe" / "log.jsonl").read_text().splitlines()]


def test_the_demo_recipe_runs_every_step_once_and_leaves_each_output(demo, capsys):
    assert [(line["step"], line["action"]) for line in step_log(demo)[: len(STEPS)]] == [
        (step, "ran") for step in STEPS
    ]
    for manifest in [
        "laion/manifest.json",
        "laion/qa/laion_face_caption/manifest.json",
        *(f"qa/{d}/manifest.json" for d in ("celeba", "rafdb", "utkface", "fairface")),
    ]:
        assert (demo / manifest).is_file(), manifest
    result = EvalResult.model_validate_json((demo / "eval" / "face-mllm" / "result.json").read_text())
    assert set(result.tasks) == set(EVAL_TASKS)
    assert (demo / "eval" / "face-mllm" / "report.html").is_file()

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    final = demo / "train" / "stage3" / "final"
    model = LlavaForConditionalGeneration.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the person smiling?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (64, 64), "gray"), text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_a_rerun_does_nothing_and_a_changed_setting_reruns_only_what_reads_it(demo, capsys):
    before = len(step_log(demo))
    assert run_demo(demo) == 0
    rerun = step_log(demo)[before:]
    assert [(line["step"], line["action"]) for line in rerun] == [(step, "skipped") for step in STEPS]
    assert "steps run: none (all were done)" in capsys.readouterr().out

    photos = package_photos(ensure_scrfd_package())
    with start_server(photos, demo) as server:  # the port it had: the same inputs
        config = demo_recipe(demo, build_demo_sample(demo / "sample", server.base_url, photos))
        config.face_datasets[0].set = ["qa.seed=7"]  # CelebA's questions change
        recipe = Recipe(config)
        plan = dict(recipe.plan())
        assert plan["reformat_celeba"] == "will run (changed)" and plan["acquire"] == "done"
        assert plan["stage3"] == "will run after reformat_celeba" and plan["stage2"] == "done"
        assert recipe.run() == ["reformat_celeba", "stage3", "evaluate"]
        assert all(what == "done" for _, what in Recipe(config).plan())
        with pytest.raises(ValueError, match="no step 'stage4'"):
            recipe.run(only="stage4")


def test_dry_run_of_the_real_recipe_says_what_cannot_run_yet(capsys):
    assert main(["recipe", "configs/face_mllm.yaml", "--dry-run", "--until", "stage1"]) == 0
    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert lines["acquire"].startswith("cannot run: ") and "laion_face_ids.pth" in lines["acquire"]
    assert lines["stage1"] == "will run after laion_face_qa" and "stage2" not in lines


def test_one_question_samples_of_before_are_scored_exactly_as_image_samples(demo, tmp_path):
    """Datasets published before QA shards grouped questions by image stay usable: the evaluator
    reads them, and scores the recipe's model on them exactly as on the image samples."""
    from facemllm.evaluation.config import load_eval_config
    from facemllm.evaluation.run import evaluate

    legacy = tmp_path / "qa"
    shutil.copytree(demo / "qa", legacy)
    for tar in legacy.glob("*/*/*.tar"):
        samples = list(iter_tar_samples(tar))
        with ShardWriter(tar) as writer:
            for _, members in samples:
                for question in sorted(read_qa_samples(members["json"]), key=lambda q: q.key):
                    writer.add(
                        question.key, {"jpg": members["jpg"], "json": question.model_dump_json().encode()}
                    )
    ours = {"label": "face-mllm", "checkpoint": str(demo / "train" / "stage3" / "final")}
    settings = ["device=cpu", "bootstrap_resamples=200", "max_new_tokens=16"]
    (result,) = evaluate(
        load_eval_config(None, settings, data=str(legacy), out=str(tmp_path / "eval"), models=[ours])
    )
    grouped = EvalResult.model_validate_json((demo / "eval" / "face-mllm" / "result.json").read_text())
    assert {name: task.metrics for name, task in result.tasks.items()} == {
        name: task.metrics for name, task in grouped.tasks.items()
    }
    assert result.data.data_hash == grouped.data.data_hash


def test_a_takedown_by_sample_id_reaches_every_derived_dataset(demo, tmp_path):
    """Publish the recipe's LAION-Face data (images, faces, annotations, captions), then remove one
    photo by its SAMPLE_ID: it leaves every dataset in one new version, and verify passes."""
    from facemllm.pipeline.core.storage import Storage, StorageOptions
    from facemllm.pipeline.publishing.layout import read_manifest
    from facemllm.pipeline.publishing.publish import publish
    from facemllm.pipeline.publishing.remove import RemovalRequest, remove
    from facemllm.pipeline.publishing.verify import verify

    options = StorageOptions(progress=False)
    dest = tmp_path / "published"
    publish(demo / "laion", str(dest), options)
    caption_shards = sorted((demo / "laion" / "qa" / "laion_face_caption" / "train").glob("*.tar"))
    first = json.loads(next(iter_tar_samples(caption_shards[0]))[1]["json"])
    target = first["sample_id"]

    def holders(version) -> dict[str, int]:
        """stage -> samples whose record names the target SAMPLE_ID."""
        found = {}
        for stage, manifest in version.stages.items():
            for shard in manifest.shards:
                for _, members in iter_tar_samples(dest / shard.url):
                    record = json.loads(members.get("json", b"{}"))
                    if target in (record.get("SAMPLE_ID"), record.get("sample_id")):
                        found[stage] = found.get(stage, 0) + 1
        return found

    before = holders(read_manifest(Storage(str(dest), options)))
    assert {"images", "faces", "annotations", "qa/laion_face_caption/train"} <= set(before)
    report = remove(str(dest), RemovalRequest([str(target)]), options)
    assert report.version == 2 and report.not_found == []
    assert {stage: len(keys) for stage, keys in report.removed.items()} == before
    assert holders(read_manifest(Storage(str(dest), options))) == {}
    assert verify(str(dest), options).ok
