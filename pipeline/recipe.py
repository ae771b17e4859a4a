"""``facemllm recipe``: the whole Face-MLLM recipe, resumable, as one command.

One YAML (``configs/face_mllm.yaml``) names the config of every part; the recipe wires their
outputs together under ``OUT`` and runs the steps in order:

- ``acquire``: select, download, faces (``facemllm run``) -> ``OUT/laion/``
- ``annotate``: the MLLM annotator over the faces -> ``OUT/laion/annotations/``
- ``laion_face_qa``: stage-1 captions and stage-2 VQA -> ``OUT/laion/qa/laion_face_{caption,vqa}/``
- ``reformat_<dataset>`` for each face dataset named -> ``OUT/qa/<dataset>/``
- ``stage1`` -> ``stage2`` -> ``stage3``: training, each stage from the previous stage's
  ``final/`` -> ``OUT/train/stageN/``
- ``evaluate``: the stage-3 model (and any baselines) on every task -> ``OUT/eval/``

A step is skipped when it finished before with the same fingerprint: the sha256 of its settings
and of its inputs' contents (the outputs of the steps it reads, by content; for ``acquire`` the
input files' sizes and modification times). So a rerun after a failure resumes, and a changed
setting reruns that step and what reads its output, nothing else. A step whose fingerprint
changed starts from a clean output folder (request caches kept); one that was interrupted with
the same fingerprint resumes where it stopped (completed shards, training checkpoints).

State: ``OUT/recipe/<step>.json`` (fingerprint, output digest, when) and ``OUT/recipe/log.jsonl``
(one line per step and invocation: ran or skipped).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from pydantic import Field, field_validator

from facemllm.pipeline.core.config import hash_config, load_yaml_config
from facemllm.pipeline.core.files import sha256_file, write_json_atomic
from facemllm.pipeline.core.storage import protocol_of
from facemllm.schemas import SourceDataset, StrictModel

ACQUIRE_STAGES = ["select", "download", "faces"]
STATE_DIR = "recipe"
OURS = "face-mllm"  # the label of the recipe's own model in the evaluation


class StepSettings(StrictModel):
    """A part's own config file (relative to the recipe file) and overrides of it."""

    config: str | None = Field(None, description="the part's config file; paths relative to the recipe file")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, as --set takes them")


class FaceDataset(StrictModel):
    dataset: SourceDataset
    root: str = Field(description="the dataset in its native layout")
    set: list[str] = Field(default_factory=list, description="overrides of this dataset's reformat settings")


class EvaluateSettings(StepSettings):
    baselines: list[str] = Field(
        default_factory=list, description="models scored beside ours, as `facemllm eval --model` takes them"
    )


class RecipeConfig(StrictModel):
    """``configs/face_mllm.yaml``: where everything goes, and each part's config."""

    out: str = Field(description="the recipe's folder: laion/, qa/, train/, eval/, recipe/")
    acquire: StepSettings = Field(description="a `facemllm run` config: the LAION-Face inputs, annotate, QA")
    face_datasets: list[FaceDataset] = Field(default_factory=list)
    reformat: StepSettings = Field(StepSettings(), description="reformat settings for every face dataset")
    stage1: StepSettings
    stage2: StepSettings
    stage3: StepSettings
    evaluate: EvaluateSettings

    @field_validator("face_datasets")
    @classmethod
    def _once_each(cls, value: list[FaceDataset]) -> list[FaceDataset]:
        names = [d.dataset for d in value]
        if len(set(names)) != len(names):
            raise ValueError(f"face_datasets: each dataset once ({names})")
        return value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    """The recipe, with every part's config path made relative to the recipe file's folder."""
    recipe = load_yaml_config(RecipeConfig, path, overrides)
    base = Path(path).resolve().parent
    for settings in (
        recipe.acquire,
        recipe.reformat,
        recipe.stage1,
        recipe.stage2,
        recipe.stage3,
        recipe.evaluate,
    ):
        if settings.config is not None:
            settings.config = str(base / settings.config)
    return recipe


# -- content digests ------------------------------------------------------------------------------


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def manifest_digest(path: Path, stages: list[str] | None = None) -> str | None:
    """Content of a manifest's stages (every shard's sha256 and the counts), or None if absent."""
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())["stages"]
    return digest({name: manifest.get(name) for name in stages} if stages else manifest)


def folder_digest(folder: Path) -> str | None:
    """sha256 of every file of a folder (names and contents), or None if absent."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return digest([(p.relative_to(folder).as_posix(), sha256_file(p)) for p in files])


SMALL_INPUT_BYTES = 64 << 20


def inputs_digest(urls: list[str]) -> str:
    """The input files' contents: sha256 for local files up to 64 MiB, else size and modification
    time (or ETag): cheap for 32 metadata parquets of gigabytes, and changed whenever one is replaced."""
    found = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        for name in sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]:
            info = fs.info(name)
            if protocol_of(url) == "file" and info["size"] <= SMALL_INPUT_BYTES:
                found.append((name, sha256_file(Path(name))))
            else:
                stamp = info.get("mtime") or info.get("ETag") or info.get("LastModified")
                found.append((name, info["size"], stamp))
    return digest(found)


# -- steps -----------------------------------------------------------------------------------------


@dataclass
class Step:
    """One step: what it reads (upstream steps), how its settings hash, how it runs, what it makes."""

    name: str
    upstream: list[str]
    settings: Callable[[], str]  # hash of the step's own settings (and its outside inputs)
    run: Callable[[], None]
    output: Callable[[], str | None]  # digest of the step's output, None while it has none
    folders: list[Path]  # removed before a run with a new fingerprint
    keep: tuple[str, ...] = ()  # names kept inside those folders (request caches)


class Recipe:
    """The steps of one recipe config, and the decisions about them."""

    def __init__(self, config: RecipeConfig, log: Callable[[str], None] = print):
        self.config = config
        self.out = Path(config.out)
        self.laion = self.out / "laion"
        self.qa = self.out / "qa"
        self.log = log
        self.steps = self._steps()
        self._outputs: dict[str, str | None] = {}

    # -- the parts' configs, wired together -------------------------------------------------------

    def run_config(self, stages: list[str]):
        from facemllm.pipeline.config import load_config

        placed = [f"out={json.dumps(str(self.laion))}", f"stages={json.dumps(stages)}"]
        return load_config(self.config.acquire.config, [*self.config.acquire.set, *placed])

    def reformat_config(self, source: FaceDataset):
        from facemllm.pipeline.stages.reformat import load_reformat_config

        return load_reformat_config(
            self.config.reformat.config,
            [*self.config.reformat.set, *source.set],
            dataset=source.dataset,
            root=source.root,
            out=str(self.qa),
        )

    def stage_settings(self, stage: int) -> StepSettings:
        settings: StepSettings = getattr(self.config, f"stage{stage}")
        if settings.config is None:
            raise ValueError(f"stage{stage}.config: a training config is required")
        return settings

    def train_dir(self, stage: int) -> Path:
        return self.out / "train" / f"stage{stage}"

    def train_config(self, stage: int):
        """The stage's config with its sources pointed at the recipe's datasets (by source name;
        sources the recipe does not make are dropped) and its model at the previous stage's."""
        from facemllm.training.config import TrainRunConfig, load_train_config

        settings = self.stage_settings(stage)
        placed = [f"output_dir={json.dumps(str(self.train_dir(stage)))}"]
        if stage > 1:
            placed.append(f"model.pretrained={json.dumps(str(self.train_dir(stage - 1) / 'final'))}")
        config = load_train_config(settings.config, [*settings.set, *placed])
        made = self.datasets()
        sources = [
            s.model_copy(update={"urls": [made[s.name]]}) for s in config.data.sources if s.name in made
        ]
        if not sources:
            names = [s.name for s in config.data.sources]
            raise ValueError(
                f"stage{stage}: none of its data.sources {names} is made by this recipe ({sorted(made)})"
            )
        document = config.model_dump(mode="json")
        document["data"]["sources"] = [s.model_dump(mode="json") for s in sources]
        return TrainRunConfig.model_validate(document)

    def datasets(self) -> dict[str, str]:
        """Training sources the recipe made: name -> the train split's folder, where it holds shards
        (template annotations, for one, give captions but no attribute VQA)."""
        folders = {
            name: self.laion / "qa" / name / "train" for name in ("laion_face_caption", "laion_face_vqa")
        }
        folders.update({d.dataset: self.qa / d.dataset / "train" for d in self.config.face_datasets})
        return {name: str(folder) for name, folder in folders.items() if any(folder.glob("*.tar"))}

    def source_steps(self, stage: int) -> list[str]:
        """The steps that make the datasets a training stage reads (by its sources' names)."""
        from facemllm.training.config import load_train_config

        settings = self.stage_settings(stage)
        makers = {"laion_face_caption": "laion_face_qa", "laion_face_vqa": "laion_face_qa"}
        makers.update({d.dataset: f"reformat_{d.dataset}" for d in self.config.face_datasets})
        names = [source.name for source in load_train_config(settings.config, settings.set).data.sources]
        return list(dict.fromkeys(makers[name] for name in names if name in makers))

    def eval_config(self):
        from facemllm.evaluation.config import ModelSpec, load_eval_config

        settings = self.config.evaluate
        ours = ModelSpec(label=OURS, checkpoint=str(self.train_dir(3) / "final"))
        models = [ours, *(ModelSpec.parse(spec) for spec in settings.baselines)]
        return load_eval_config(
            settings.config,
            settings.set,
            data=str(self.qa),
            out=str(self.out / "eval"),
            models=[model.model_dump(exclude_none=True) for model in models],
        )

    # -- the steps ---------------------------------------------------------------------------------

    def _steps(self) -> dict[str, Step]:
        laion_manifest = self.laion / "manifest.json"
        steps = [
            Step(
                "acquire",
                [],
                self._acquire_fingerprint,
                lambda: self._run_pipeline(ACQUIRE_STAGES),
                lambda: manifest_digest(laion_manifest, ["urls", "images", "faces"]),
                [self.laion / name for name in ("urls", "images", "faces")],
            ),
            Step(
                "annotate",
                ["acquire"],
                lambda: self.run_config(["annotate"]).config_hash(),
                lambda: self._run_pipeline(["annotate"]),
                lambda: manifest_digest(laion_manifest, ["annotations"]),
                [self.laion / "annotations"],
                keep=("_cache",),
            ),
            Step(
                "laion_face_qa",
                ["annotate"],
                lambda: self.run_config(["laion_face_qa"]).config_hash(),
                lambda: self._run_pipeline(["laion_face_qa"]),
                lambda: _joined(
                    [
                        manifest_digest(self.laion / "qa" / n / "manifest.json")
                        for n in ("laion_face_caption", "laion_face_vqa")
                    ]
                ),
                [self.laion / "qa"],
            ),
        ]
        for source in self.config.face_datasets:
            steps.append(
                Step(
                    f"reformat_{source.dataset}",
                    [],
                    lambda s=source: self._reformat_fingerprint(s),
                    lambda s=source: self._reformat(s),
                    lambda s=source: manifest_digest(self.qa / s.dataset / "manifest.json"),
                    [self.qa / source.dataset],
                )
            )
        reformats = [f"reformat_{d.dataset}" for d in self.config.face_datasets]
        for stage in (1, 2, 3):
            previous = [f"stage{stage - 1}"] if stage > 1 else []
            steps.append(
                Step(
                    f"stage{stage}",
                    [*previous, *self.source_steps(stage)],
                    lambda n=stage: self.train_config(n).config_hash(),
                    lambda n=stage: self._train(n),
                    lambda n=stage: folder_digest(self.train_dir(n) / "final"),
                    [self.train_dir(stage)],
                )
            )
        steps.append(
            Step(
                "evaluate",
                ["stage3", *reformats],
                lambda: hash_config(
                    self.eval_config(), exclude={"out": True, "client": True, "storage": True}
                ),
                self._evaluate,
                lambda: _joined([folder_digest(self.out / "eval" / OURS)]),
                [self.out / "eval"],
            )
        )
        return {step.name: step for step in steps}

    def _acquire_fingerprint(self) -> str:
        config = self.run_config(ACQUIRE_STAGES)
        return digest([config.config_hash(), inputs_digest([*config.select.metadata, config.select.ids])])

    def _run_pipeline(self, stages: list[str]) -> None:
        from facemllm.pipeline.run import run

        run(self.run_config(stages))

    def _reformat_fingerprint(self, source: FaceDataset) -> str:
        from facemllm.pipeline.stages.reformat import ReformatStage

        config = self.reformat_config(source)
        return digest([config.config_hash(), ReformatStage(config).reformatter.listing_digest()])

    def _reformat(self, source: FaceDataset) -> None:
        from facemllm.pipeline.stages.reformat import run_reformat

        manifest = run_reformat(self.reformat_config(source))
        counts = manifest.stages[f"qa/{source.dataset}"].counts
        if not counts.get("ok"):
            raise ValueError(f"reformat_{source.dataset}: no row of {source.root} was usable ({counts})")

    def _train(self, stage: int) -> None:
        from facemllm.training.loop import train

        summary = train(self.train_config(stage))
        if summary["status"] != "completed":
            raise RuntimeError(
                f"stage{stage} did not complete ({summary['status']}); rerun the recipe to resume it"
            )

    def _evaluate(self) -> None:
        from facemllm.evaluation.run import evaluate

        evaluate(self.eval_config())

    def evaluation_summary(self) -> list[str]:
        """The evaluation's table and where its report is, from the results on disk ([] before)."""
        from facemllm.evaluation.report import load_results
        from facemllm.evaluation.run import summary_lines

        results_dir = self.out / "eval"
        if not (results_dir / OURS).is_dir():
            return []
        return [
            *summary_lines(load_results(results_dir)),
            f"evaluation report: {results_dir / OURS / 'report.html'}",
        ]

    # -- deciding and running ----------------------------------------------------------------------

    def state_path(self, name: str) -> Path:
        return self.out / STATE_DIR / f"{name}.json"

    def state(self, name: str) -> dict | None:
        path = self.state_path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def output(self, name: str) -> str | None:
        """A step's output digest, computed once per invocation (a checkpoint is hashed once)."""
        if name not in self._outputs:
            self._outputs[name] = self.steps[name].output()
        return self._outputs[name]

    def fingerprint(self, step: Step) -> str:
        """The step's settings and the digests of its upstream steps' outputs."""
        return digest({"settings": step.settings(), "upstream": {u: self.output(u) for u in step.upstream}})

    def is_done(self, step: Step, fingerprint: str) -> bool:
        state = self.state(step.name)
        return (
            state is not None
            and state.get("status") == "done"
            and state["fingerprint"] == fingerprint
            and state["output"] == self.output(step.name)
        )

    def selected(self, until: str | None = None, only: str | None = None) -> list[str]:
        names = list(self.steps)
        for name in (until, only):
            if name is not None and name not in self.steps:
                raise ValueError(f"no step {name!r}; the steps are {names}")
        if only is not None:
            return [only]
        return names[: names.index(until) + 1] if until is not None else names

    def plan(self, until: str | None = None, only: str | None = None) -> list[tuple[str, str]]:
        """(step, what would happen) without running anything: done, or why it would run."""
        rows, pending = [], set()
        for name in self.selected(until, only):
            step = self.steps[name]
            waiting = [u for u in step.upstream if u in pending]
            pending.add(name)
            if waiting:
                rows.append((name, f"will run after {', '.join(waiting)}"))
                continue
            try:
                fingerprint = self.fingerprint(step)
            except (ValueError, OSError) as err:  # e.g. an input that is not there yet
                rows.append((name, f"cannot run: {err}"))
                continue
            state = self.state(name)
            if self.is_done(step, fingerprint):
                rows.append((name, "done"))
                pending.discard(name)
            elif state is None:
                rows.append((name, "will run (never ran)"))
            else:
                rows.append(
                    (
                        name,
                        "will run (changed)"
                        if state["fingerprint"] != fingerprint
                        else "will run (unfinished)",
                    )
                )
        return rows

    def run(self, until: str | None = None, only: str | None = None) -> list[str]:
        """Run the selected steps that are not done, in order; returns the names of those run."""
        ran = []
        for name in self.selected(until, only):
            step = self.steps[name]
            missing = [u for u in step.upstream if not self._finished(u)]
            if missing:
                raise ValueError(
                    f"{name}: first run {', '.join(missing)} (--until {name}, or without --only)"
                )
            fingerprint = self.fingerprint(step)
            if self.is_done(step, fingerprint):
                self._record(name, "skipped", fingerprint)
                continue
            state = self.state(name)
            if state is None or state["fingerprint"] != fingerprint:
                self._clean(step)  # new settings or inputs: nothing of the old output is reused
            self.log(f"recipe: {name} ...")
            started = time.time()
            write_json_atomic(self.state_path(name), {"fingerprint": fingerprint, "status": "running"})
            step.run()
            seconds = round(time.time() - started, 1)
            self._outputs.pop(name, None)
            write_json_atomic(
                self.state_path(name),
                {
                    "fingerprint": fingerprint,
                    "status": "done",
                    "output": self.output(name),
                    "seconds": seconds,
                },
            )
            self._record(name, "ran", fingerprint, seconds)
            self.log(f"recipe: {name} done in {seconds} s")
            ran.append(name)
        return ran

    def _finished(self, name: str) -> bool:
        state = self.state(name)
        return state is not None and state.get("status") == "done" and state["output"] == self.output(name)

    def _clean(self, step: Step) -> None:
        for folder in step.folders:
            if not folder.is_dir():
                continue
            for child in folder.iterdir():
                if child.name in step.keep:
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def _record(self, name: str, action: str, fingerprint: str, seconds: float | None = None) -> None:
        line = {
            "step": name,
            "action": action,
            "fingerprint": fingerprint,
            "at": time.time(),
            "seconds": seconds,
        }
        log = self.out / STATE_DIR / "log.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            handle.write(json.dumps(line) + "\n")


def _joined(digests: list[str | None]) -> str | None:
    return None if any(d is None for d in digests) else digest(digests)
