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

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set download.timeout=5 --set runner.direct_num_workers=4",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.manifest import print_summary
    from pipeline.run import run

    config = load_config(args.config, args.overrides)
    print_summary(run(config))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(Path(args.out), args.overrides)


def cmd_detect(args: argparse.Namespace) -> int:
    from annotators.faces import FaceConfig, detect_paths
    from pipeline.config import apply_overrides

    config = FaceConfig.model_validate(apply_overrides({}, args.overrides))
    for line in detect_paths([Path(p) for p in args.images], config):
        print(json.dumps(line), flush=True)
    return 0


def cmd_schema_export(args: argparse.Namespace) -> int:
    from schemas import export_json_schemas

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
    _add_overrides(run)
    run.set_defaults(func=cmd_run)

    demo = commands.add_parser(
        "demo",
        help="run the pipeline on the bundled sample, served from loopback",
        description="Serve the bundled sample photos on 127.0.0.1, run select -> "
        "download -> faces on them and check the counts.",
    )
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    _add_overrides(demo)
    demo.set_defaults(func=cmd_demo)

    detect = commands.add_parser(
        "detect",
        help="print the faces of images as JSON lines",
        description="Detect faces with SCRFD; one JSON line per image.",
    )
    detect.add_argument("images", nargs="+", help="image files")
    _add_overrides(detect)
    detect.set_defaults(func=cmd_detect)

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # pydantic's ValidationError is a ValueError: a bad config stops here, before any work
        print(f"facemllm {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
