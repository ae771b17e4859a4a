"""``facemllm demo``: the whole Face-MLLM recipe on the bundled sample, offline, on a laptop.

Real face photos shipped inside installed packages are served from 127.0.0.1 together with routes
that must fail; ``demo.sample`` writes LAION-style metadata and a LAION-Face id list for them and
knows what a correct acquisition reports. ``demo.face_datasets`` builds CelebA, RAF-DB, UTKFace and
FairFace in their native layouts from the same photos, and ``training.tiny_models`` a tiny CLIP
vision tower and Llama LM for stage 1 to assemble. The demo then runs ``configs/demo_recipe.yaml``
(acquire, annotate with the template annotator, LAION-Face QA, reformat, train 1 -> 2 -> 3,
evaluate) and compares the acquisition's counts with the sample's, so it doubles as a smoke test.

Everything it builds is kept in OUT and reused, and the sample server takes the port it had, so a
second ``make demo`` finds every step done and does nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from facemllm.annotators.model_store import ensure_scrfd_package
from facemllm.pipeline.config import RunConfig, load_config
from facemllm.pipeline.core.files import write_json_atomic
from facemllm.pipeline.demo.face_datasets import build_celeba, build_fairface, build_rafdb, build_utkface
from facemllm.pipeline.demo.sample import DemoSample, build_demo_sample, package_photos
from facemllm.pipeline.demo.server import SampleServer
from facemllm.pipeline.recipe import FaceDataset, Recipe, RecipeConfig, load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the checkout's configs/
DEMO_CONFIG = CONFIGS / "demo.yaml"
DEMO_RECIPE = CONFIGS / "demo_recipe.yaml"
FACE_DATASETS = {
    "celeba": build_celeba,
    "rafdb": build_rafdb,
    "utkface": build_utkface,
    "fairface": build_fairface,
}
BUILT = ".facemllm-built"  # marks a folder the demo finished building


def demo_config(sample: DemoSample, out: Path, overrides: list[str] = ()) -> RunConfig:
    """configs/demo.yaml pointed at ``sample`` and ``out``; the caller's overrides win."""
    return load_config(DEMO_CONFIG, [*sample_settings(sample), f"out={json.dumps(str(out))}", *overrides])


def sample_settings(sample: DemoSample) -> list[str]:
    return [
        f"select.metadata={json.dumps([str(sample.metadata_path)])}",
        f"select.ids={json.dumps(str(sample.face_ids_path))}",
    ]


def expected_counts(sample: DemoSample) -> dict[tuple[str, str], int]:
    """(stage, outcome) -> count that a correct run of the sample reports."""
    return {
        ("urls", "rows_read"): sample.metadata_rows,
        ("urls", "selected"): sample.selected_rows,
        ("images", "success"): sample.expected_successes,
        ("images", "failures"): sample.expected_failures,
    }


def observed_counts(manifest) -> dict[tuple[str, str], int]:
    urls, images = manifest.stages["urls"].counts, manifest.stages["images"].counts
    return {
        ("urls", "rows_read"): urls.get("rows_read", 0),
        ("urls", "selected"): urls.get("selected", 0),
        ("images", "success"): images.get("success", 0),
        ("images", "failures"): images.get("failed_to_download", 0) + images.get("failed_to_resize", 0),
    }


def build_once(folder: Path, build) -> Path:
    """``build(folder)`` unless an earlier demo finished it: rebuilding would give the files new
    modification times, and the recipe would redo what reads them."""
    if not (folder / BUILT).is_file():
        build(folder)
        (folder / BUILT).touch()
    return folder


def start_server(photos: dict[str, Path], out: Path) -> SampleServer:
    """The sample server, on the port it had last time when that port is free (the metadata names
    the port, so the same port means the same inputs and the acquisition stays done)."""
    record = out / "sample" / "server.json"
    port = json.loads(record.read_text())["port"] if record.is_file() else 0
    try:
        server = SampleServer(photos, port=port)
    except OSError:
        server = SampleServer(photos)
    write_json_atomic(record, {"port": int(server.base_url.rsplit(":", 1)[1])})
    return server


def demo_recipe(out: Path, sample: DemoSample, overrides: list[str] = ()) -> RecipeConfig:
    """configs/demo_recipe.yaml with what the demo built filled in; the caller's overrides win."""
    from facemllm.training.tiny_models import build_llava_parts

    roots = {
        name: build_once(out / "datasets" / name, build).as_posix() for name, build in FACE_DATASETS.items()
    }
    parts = build_once(out / "models" / "tiny-llava-parts", build_llava_parts)
    recipe = load_recipe(DEMO_RECIPE, [f"out={json.dumps(str(out))}", *overrides])
    recipe.acquire.set = [*recipe.acquire.set, *sample_settings(sample)]
    recipe.face_datasets = [FaceDataset(dataset=name, root=root) for name, root in roots.items()]
    recipe.stage1.set = [
        *recipe.stage1.set,
        f"model.vision_tower={json.dumps(str(parts / 'vision'))}",
        f"model.language_model={json.dumps(str(parts / 'lm'))}",
    ]
    return RecipeConfig.model_validate(recipe.model_dump())


def run_demo(out: Path, overrides: list[str] = ()) -> int:
    """Serve, build, run the recipe, check; returns the process exit code."""
    from facemllm.pipeline.core.manifest import print_summary
    from facemllm.schemas import RunManifest

    out = out.resolve()
    photos = package_photos(ensure_scrfd_package())
    with start_server(photos, out) as server:
        sample = build_demo_sample(out / "sample", server.base_url, photos)
        recipe = Recipe(demo_recipe(out, sample, overrides))
        ran = recipe.run()
    manifest = RunManifest.model_validate_json((recipe.laion / "manifest.json").read_text())
    print_summary(manifest)
    expected, observed = expected_counts(sample), observed_counts(manifest)
    mismatches = {key: (expected[key], observed[key]) for key in expected if expected[key] != observed[key]}
    for (stage, outcome), (want, got) in mismatches.items():
        print(f"MISMATCH {stage}/{outcome}: expected {want}, got {got}")
    faces = manifest.stages["faces"].counts.get("samples", 0)
    annotations = manifest.stages["annotations"].counts
    answered = annotations.get("success", 0) + annotations.get("duplicate", 0)
    if answered != faces:  # the template annotator answers every face dedup kept
        mismatches[("annotations", "success")] = (faces, answered)
        print(f"MISMATCH annotations/success+duplicate: expected {faces}, got {answered}")
    print(
        f"demo: {observed[('images', 'success')]} images, {faces} faces "
        f"({'counts match the sample' if not mismatches else 'COUNTS DIFFER'}); "
        f"steps run: {', '.join(ran) or 'none (all were done)'}; the model the recipe trained, scored:"
    )
    print("\n".join(recipe.evaluation_summary()))
    print(f"dataset report: {recipe.laion / 'report.html'}")
    return 1 if mismatches else 0
