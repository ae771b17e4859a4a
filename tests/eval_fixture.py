"""The evaluator's closed loop on the fixture data, shared by the tests and the README's table.

``build_qa`` reformats the four fixture datasets (real photos, native layouts;
pipeline/demo/face_datasets.py) into ``OUT/qa``; ``train_stage3`` runs the trainer's stage-3 config on their
train splits from the tiny random Idefics3, which gives the tiny stage-3 checkpoint the evaluator
scores in-process and over a real vLLM CPU server.

    .venv/bin/python -m tests.eval_fixture OUT    # the README's comparison, written to OUT/results
"""

from __future__ import annotations

import sys
from pathlib import Path

from facemllm.pipeline.demo.face_datasets import build_celeba, build_fairface, build_rafdb, build_utkface
from facemllm.pipeline.stages.reformat import load_reformat_config, run_reformat
from facemllm.training.config import load_train_config
from facemllm.training.loop import train

REPO = Path(__file__).resolve().parent.parent
BUILDERS = {
    "celeba": build_celeba,
    "rafdb": build_rafdb,
    "utkface": build_utkface,
    "fairface": build_fairface,
}
# three questions (one per style) per image and category task: more samples from the few images
QA_SETTINGS = ["runner.direct_running_mode=in_memory", "runner.direct_num_workers=1", "qa.styles_per_task=3"]


def build_qa(base: Path, rows_per_chunk: int = 8) -> Path:
    """``base/qa``; small chunks by default, so that every split has several shards."""
    qa = base / "qa"
    settings = [*QA_SETTINGS, f"rows_per_chunk={rows_per_chunk}"]
    for name, builder in BUILDERS.items():
        dataset = builder(base / "datasets" / name)
        run_reformat(load_reformat_config(None, settings, dataset=name, root=str(dataset.root), out=str(qa)))
    return qa


def train_stage3(qa: Path, pretrained: Path, out: Path, steps: int = 60) -> Path:
    """configs/stage3.yaml on the fixture train splits, small enough for CPU; returns ``final/``."""
    sources = ", ".join(f"{{name: {name}, urls: [{qa / name / 'train'}]}}" for name in BUILDERS)
    config = load_train_config(
        REPO / "configs" / "stage3.yaml",
        [
            f"output_dir={out}",
            f"model.pretrained={pretrained}",
            f"data.sources=[{sources}]",
            "data.batch_size=8",
            "data.num_workers=0",
            "data.shuffle_buffer=16",
            "data.segment_samples=64",
            "data.max_length=512",
            f"loop.max_steps={steps}",
            "loop.save_every=null",
            "loop.log_every=20",
            "loop.tensorboard=false",
            "loop.grad_accum=1",
            "optim.lr=0.003",
            "optim.warmup_ratio=0.05",
        ],
    )
    summary = train(config)
    if summary["status"] != "completed":
        raise RuntimeError(f"stage 3 did not complete: {summary}")
    return out / "final"


def main(out: Path) -> None:
    """The README's comparison: the tiny base model and its stage-3 checkpoint in-process, and the
    stage-3 checkpoint served by vLLM (the annotate tests' managed server mode)."""
    from facemllm.evaluation.config import EvalConfig, ModelSpec
    from facemllm.evaluation.run import evaluate
    from facemllm.training.tiny_models import build_idefics3
    from tests.vllm_server import served_checkpoint

    qa = build_qa(out)
    base = build_idefics3(out / "tiny-idefics3")
    stage3 = train_stage3(qa, base, out / "stage3")
    with served_checkpoint(stage3, out / "vllm.log") as url:
        models = [
            ModelSpec(label="tiny-base", checkpoint=str(base)),
            ModelSpec(label="tiny-stage3", checkpoint=str(stage3)),
            ModelSpec.parse(f"tiny-stage3-vllm={url}"),
        ]
        evaluate(EvalConfig(data=str(qa), out=str(out / "results"), models=models))
    print((out / "results" / "comparison.md").read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
