"""The ``facemllm`` command.

Subcommands stay thin: they parse arguments, load a config and call one function of a stage.
Heavy imports (Beam, insightface, torch) happen inside the subcommand that needs them, so
``facemllm --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from facemllm.pipeline.core.config import add_override_argument

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def cmd_run(args: argparse.Namespace) -> int:
    from facemllm.pipeline.config import load_config
    from facemllm.pipeline.core.manifest import print_summary
    from facemllm.pipeline.run import run

    config = load_config(args.config, args.overrides)
    manifest = run(config, progress=not args.no_progress)
    print_summary(manifest)
    annotations = manifest.stages.get("annotations")
    return _annotate_exit_code("run", config.annotate, annotations.counts if annotations else {})


def cmd_recipe(args: argparse.Namespace) -> int:
    from facemllm.pipeline.recipe import Recipe, load_recipe

    recipe = Recipe(load_recipe(args.config, args.overrides))
    if args.dry_run:
        for step, what in recipe.plan(args.until, args.only):
            print(f"{step:<20} {what}")
        return 0
    ran = recipe.run(args.until, args.only)
    print(
        f"recipe: ran {', '.join(ran) or 'nothing (every step was done)'}; state in {recipe.out / 'recipe'}"
    )
    print("\n".join(recipe.evaluation_summary()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from facemllm.pipeline.demo.run import run_demo

    return run_demo(Path(args.out), args.overrides)


def cmd_annotate(args: argparse.Namespace) -> int:
    from facemllm.pipeline.cli.annotate import annotate_job_from_args
    from facemllm.pipeline.core.manifest import print_summary
    from facemllm.pipeline.stages.annotate import run_annotate
    from facemllm.schemas import RunManifest

    annotate, runner = annotate_job_from_args(args)
    manifest = run_annotate(Path(args.input), Path(args.out), annotate, runner)
    print_summary(RunManifest(config_hash="-", package_versions={}, stages={"annotations": manifest}))
    return _annotate_exit_code("annotate", annotate, manifest.counts)


def _annotate_exit_code(command: str, annotate, counts: dict[str, int]) -> int:
    """1, with a loud message, when too many faces got no annotation (``annotate.max_failure_rate``)."""
    if (report := annotate.failure_report(counts)) is None:
        return 0
    print(f"facemllm {command}: FAILED: {report}", file=sys.stderr)
    return 1


def cmd_detect(args: argparse.Namespace) -> int:
    from facemllm.annotators.faces import FaceConfig, detect_paths
    from facemllm.pipeline.core.config import apply_overrides

    config = FaceConfig.model_validate(apply_overrides({}, args.overrides))
    for line in detect_paths([Path(p) for p in args.images], config):
        print(json.dumps(line), flush=True)
    return 0


def cmd_reformat(args: argparse.Namespace) -> int:
    from facemllm.pipeline.core.manifest import print_summary
    from facemllm.pipeline.stages.reformat import load_reformat_config, run_reformat

    config = load_reformat_config(
        args.config,
        args.overrides,
        dataset=args.dataset,
        root=args.root,
        out=args.out,
        llava=True if args.format == "llava" else None,
    )
    print_summary(run_reformat(config))
    return 0


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (default: $FACEMLLM_S3_ENDPOINT, else AWS); credentials come "
        "from the AWS environment variables or config files only",
    )
    parser.add_argument("--parallel", type=int, default=8, help="objects transferred at once (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _storage_options(args: argparse.Namespace):
    from facemllm.pipeline.core.storage import StorageOptions

    return StorageOptions(
        endpoint_url=args.endpoint_url, parallel=args.parallel, progress=not args.no_progress
    )


def cmd_publish(args: argparse.Namespace) -> int:
    from facemllm.pipeline.publishing.publish import publish

    print(publish(Path(args.out), args.dest, _storage_options(args)).model_dump_json(indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from facemllm.pipeline.publishing.verify import verify

    report = verify(args.dest, _storage_options(args), args.version)
    for problem in report.problems:
        print(f"MISMATCH {problem.url}: {problem.problem}", file=sys.stderr)
    print(report.model_dump_json(indent=2))
    return 0 if report.ok else 1


def cmd_remove(args: argparse.Namespace) -> int:
    from facemllm.pipeline.publishing.remove import RemovalRequest, remove

    report = remove(args.dest, RemovalRequest.from_file(Path(args.ids)), _storage_options(args))
    print(report.model_dump_json(indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from facemllm.pipeline.core.storage import is_remote
    from facemllm.pipeline.publishing.report import REPORT_HTML, write_published_report, write_run_report

    local = None if is_remote(args.source) else Path(args.source)
    if local is not None and not local.is_dir():
        print(f"facemllm report: {args.source} is not a folder", file=sys.stderr)
        return 2
    if local is not None and not (local / "manifest.v1.json").exists() and args.version is None:
        if not (local / "manifest.json").is_file():
            print(f"facemllm report: {local}/manifest.json is missing; finish the run first", file=sys.stderr)
            return 2
        print(write_run_report(local))
        return 0
    output = Path(args.output or REPORT_HTML)
    print(write_published_report(args.source, output, args.version, _storage_options(args)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from facemllm.evaluation.config import ModelSpec, load_eval_config

    models = [ModelSpec.parse(spec).model_dump(exclude_none=True) for spec in args.model] or None
    config = load_eval_config(
        args.config,
        args.overrides,
        models=models,
        tasks=args.tasks,
        data=args.data,
        out=args.out,
        max_samples_per_task=args.max_samples_per_task,
    )
    from facemllm.evaluation.run import evaluate, summary_lines

    results = evaluate(config)
    print("\n".join(summary_lines(results)))
    print(f"reports: {Path(config.out) / 'comparison.html'} and {config.out}/<model>/report.html")
    failed = sum(task.failed_requests for result in results for task in result.tasks.values())
    if failed:  # scored as wrong for now; a rerun asks exactly these again
        print(
            f"facemllm eval: {failed} requests failed after retries; rerun to ask them again", file=sys.stderr
        )
        return 1
    return 0


def cmd_laion_face_qa(args: argparse.Namespace) -> int:
    from facemllm.pipeline.core.config import apply_overrides
    from facemllm.pipeline.stages.laion_face_qa import run_laion_face_qa, summary
    from facemllm.reformatters.laion_face import LaionFaceQAConfig

    config = LaionFaceQAConfig.model_validate(apply_overrides({}, args.overrides))
    print(
        json.dumps(summary(run_laion_face_qa(args.annotations, args.out, config)), indent=2, sort_keys=True)
    )
    return 0


def cmd_schema_export(args: argparse.Namespace) -> int:
    from facemllm.schemas import export_json_schemas

    for path in export_json_schemas(args.dir):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facemllm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run the acquisition pipeline (select -> download -> faces)",
        description="Run the stages of a YAML config on the configured Beam runner.",
    )
    run.add_argument("config", help=f"YAML run config (examples in {REPO_CONFIGS})")
    run.add_argument(
        "--no-progress", action="store_true", help="no live table (OUT/logs/progress.jsonl is written anyway)"
    )
    add_override_argument(run)
    run.set_defaults(func=cmd_run)

    recipe = commands.add_parser(
        "recipe",
        help="the whole Face-MLLM recipe: acquire, annotate, QA sets, reformat, train 1-2-3, evaluate",
        description="Run every step of the recipe a config names, skipping each step whose output is "
        "complete and whose settings and inputs are unchanged (by content hash).",
    )
    recipe.add_argument("config", help="recipe YAML (configs/face_mllm.yaml)")
    recipe.add_argument("--until", metavar="STEP", help="run the steps up to and including STEP")
    recipe.add_argument("--only", metavar="STEP", help="run STEP alone (the steps it reads must be done)")
    recipe.add_argument("--dry-run", action="store_true", help="print the plan: what is done, what would run")
    add_override_argument(recipe)
    recipe.set_defaults(func=cmd_recipe)

    demo = commands.add_parser(
        "demo",
        help="the whole recipe on the bundled sample, served from loopback, in minutes",
        description="Serve the bundled sample photos on 127.0.0.1, build the fixture face datasets "
        "and a tiny model, run configs/demo_recipe.yaml on them (acquire, annotate, QA sets, "
        "reformat, train 1-2-3, evaluate) and check the acquisition's counts.",
    )
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    add_override_argument(demo)
    demo.set_defaults(func=cmd_demo)

    annotate = commands.add_parser(
        "annotate",
        help="caption and label face shards with an MLLM server (or the template annotator)",
        description="Annotate face shards: each face crop goes to an OpenAI-compatible server (a "
        "running one with --endpoint, or a vLLM server the stage starts with --server-model); "
        "writes annotation shards and a status row per face.",
    )
    from facemllm.pipeline.cli.annotate import add_annotate_arguments

    add_annotate_arguments(annotate)
    add_override_argument(annotate)
    annotate.set_defaults(func=cmd_annotate)

    detect = commands.add_parser(
        "detect",
        help="print the faces of images as JSON lines",
        description="Detect faces with SCRFD; one JSON line per image.",
    )
    detect.add_argument("images", nargs="+", help="image files")
    add_override_argument(detect)
    detect.set_defaults(func=cmd_detect)

    reformat = commands.add_parser(
        "reformat",
        help="rewrite CelebA, RAF-DB, UTKFace or FairFace into QA shards",
        description="Turn a dataset in its native layout into QA WebDataset shards per split under "
        "OUT/<dataset>/<split>/, with a status table and a manifest, on the configured Beam runner.",
    )
    reformat.add_argument("dataset", choices=["celeba", "rafdb", "utkface", "fairface"])
    reformat.add_argument("--root", required=True, help="the dataset's folder, in its native layout")
    reformat.add_argument("--out", required=True, help="QA output folder (e.g. OUT/qa)")
    reformat.add_argument(
        "--format",
        choices=["webdataset", "llava"],
        default="webdataset",
        help="llava: also write LLaVA's JSON conversation lists and an image folder",
    )
    reformat.add_argument("--config", help=f"YAML reformat config (examples in {REPO_CONFIGS})")
    add_override_argument(reformat)
    reformat.set_defaults(func=cmd_reformat)

    publish = commands.add_parser(
        "publish",
        help="upload a finished run's shards, then its manifest, to a URL",
        description="Upload OUT's shards (and the QA datasets under it) to DEST (s3://, gs:// or any "
        "fsspec URL), then the manifest as the commit point. A rerun resumes: shards already there "
        "with the right sha256 are skipped.",
    )
    publish.add_argument("out", help="the run's output folder (holds manifest.json)")
    publish.add_argument("dest", help="where to publish, e.g. s3://bucket/facemllm/v1")
    _add_storage_options(publish)
    publish.set_defaults(func=cmd_publish)

    verify = commands.add_parser(
        "verify",
        help="check every published shard against the manifest",
        description="Read back every shard of DEST and compare its sha256, sample count and size with "
        "the manifest; names every shard that differs and exits 1 if any does.",
    )
    verify.add_argument("dest")
    verify.add_argument("--version", type=int, help="a published version (default: the current one)")
    _add_storage_options(verify)
    verify.set_defaults(func=cmd_verify)

    remove = commands.add_parser(
        "remove",
        help="take samples out of a published dataset (takedown and opt-out requests)",
        description="Rewrite only the shards holding the listed samples, in every stage, and publish "
        "the result as a new manifest version; earlier versions stay readable.",
    )
    remove.add_argument("dest")
    remove.add_argument("--ids", required=True, help="file with one SAMPLE_ID or source url per line")
    _add_storage_options(remove)
    remove.set_defaults(func=cmd_remove)

    report = commands.add_parser(
        "report",
        help="rebuild the HTML report of a run or a published version",
        description="OUT: rebuild OUT/report.json and OUT/report.html from the run's markers and "
        "shards. DEST (a published dataset, local or any fsspec URL): write the report of its current "
        "(or --version) version to --output, from that version's shards and published report data.",
    )
    report.add_argument("source", help="a run's output folder, or a published DEST")
    report.add_argument("--version", type=int, help="a published version (default: the current one)")
    report.add_argument("--output", help="where a DEST's report goes (default ./report.html)")
    _add_storage_options(report)
    report.set_defaults(func=cmd_report)

    train = commands.add_parser(
        "train",
        help="run one training stage (1 alignment, 2 basic VQA, 3 face tasks)",
        description="Train one stage of a YAML training config on the WebDataset shards it names. "
        "One process here; for several GPUs: torchrun --nproc_per_node N -m facemllm.training CONFIG.",
    )
    from facemllm.training import command as train_command

    train_command.add_arguments(train)
    train.set_defaults(func=train_command.run)

    evaluate = commands.add_parser(
        "eval",
        help="score models on the face perception tasks and the zero-shot attribute task",
        description="Ask each model the QA test questions (CelebA attributes, RAF-DB expression, UTKFace "
        "age, gender and race on UTKFace and FairFace, held-out CelebA attributes), parse the replies "
        "strictly and write result.json, results.md and report.html per model, and a comparison.",
    )
    evaluate.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[LABEL=]TARGET",
        help="a checkpoint folder (scored in-process) or an OpenAI-compatible URL with the model name "
        "after '#', e.g. http://gpu:8000/v1#Qwen/Qwen2-VL-7B-Instruct; repeat to compare models",
    )
    evaluate.add_argument("--tasks", help="comma-separated tasks, or all (default)")
    evaluate.add_argument("--data", help="the QA data folder or URL (OUT/qa)")
    evaluate.add_argument("--out", help="results folder")
    evaluate.add_argument(
        "--max-samples-per-task", type=int, help="score about N seeded-random samples per task"
    )
    evaluate.add_argument("--config", help="YAML eval config (see configs/eval.yaml)")
    add_override_argument(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    laion_qa = commands.add_parser(
        "laion-face-qa",
        help="annotation shards -> stage-1 caption and stage-2 VQA shards",
        description="Turn LAION-Face annotation shards (KEY.jpg, KEY.txt, KEY.json FaceAnnotation) into "
        "QA shards: OUT/laion_face_caption/<split>/ for stage 1, OUT/laion_face_vqa/<split>/ for stage 2.",
    )
    laion_qa.add_argument("annotations", help="folder of annotation shards (OUT/annotations)")
    laion_qa.add_argument("--out", required=True, help="QA output folder (e.g. OUT/qa)")
    add_override_argument(laion_qa)
    laion_qa.set_defaults(func=cmd_laion_face_qa)

    schema = commands.add_parser("schema", help="record schemas", description="Record schema tools.")
    schema_commands = schema.add_subparsers(dest="schema_command", required=True)
    export = schema_commands.add_parser(
        "export",
        help="write the JSON Schema of every record",
        description="Write <Record>.schema.json files into DIR.",
    )
    export.add_argument("dir")
    export.set_defaults(func=cmd_schema_export)
    return parser


def _not_beam_import_noise(record: logging.LogRecord) -> bool:
    """Beam warns at import that the optional GCP client is missing, which no facemllm path uses."""
    return not record.getMessage().startswith("apitools not found")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().addFilter(_not_beam_import_noise)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # pydantic's ValidationError is a ValueError: a bad config stops here, before any work
        print(f"facemllm {args.command}: {err}", file=sys.stderr)
        return 2
