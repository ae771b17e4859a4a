"""The `facemllm` command as a user runs it: help everywhere, detect, schema export, bad configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from facemllm.pipeline.cli import build_parser, main
from facemllm.pipeline.config import load_config
from facemllm.schemas.export import exported_records
from tests.photos import insightface_masks, scrfd_photo


def facemllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facemllm.pipeline.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "command", [[], ["run"], ["demo"], ["detect"], ["schema"], ["schema", "export"]], ids=" ".join
)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: facemllm" in capsys.readouterr().out


def test_detect_prints_one_json_line_per_image(scrfd_dir):
    images = [scrfd_photo("newton.png"), insightface_masks()[0]]
    result = facemllm("detect", *map(str, images))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(path) for path in images]
    newton, mask = lines
    assert len(newton["faces"]) == 1 and mask["faces"] == []
    face = newton["faces"][0]
    assert len(face["bbox"]) == 4 and len(face["landmarks"]) == 5 and 0.5 < face["score"] <= 1


def test_schema_export_writes_every_record(tmp_path, capsys):
    assert main(["schema", "export", str(tmp_path)]) == 0
    assert {r.__name__ for r in exported_records()} >= {"FaceRecord", "QASample", "FaceAnnotation"}
    for record in exported_records():
        schema = json.loads((tmp_path / f"{record.__name__}.schema.json").read_text())
        assert schema["title"] == record.__name__


def test_bad_config_stops_before_any_work_naming_the_field(tmp_path):
    config = tmp_path / "bad.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump({"out": str(out), "select": {"metadata": ["x"], "ids": "y"}}))
    result = facemllm("run", str(config), "--set", "download.timeout=-1")
    assert result.returncode == 2
    assert "download.timeout" in result.stderr and "greater than 0" in result.stderr
    result = facemllm("run", str(config), "--set", "faces.typo=1")
    assert result.returncode == 2 and "faces.typo" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["run", "{config}"],
        ["train", "{config}"],
        ["eval", "--config", "{config}"],
        ["reformat", "rafdb", "--root", ".", "--out", "o", "--config", "{config}"],
    ],
)
def test_a_yaml_syntax_error_is_a_clear_message_and_exit_2(args, tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("out: x\nselect: {metadata: [a.parquet\n")  # an unclosed flow sequence
    assert main([arg.format(config=config) for arg in args]) == 2
    err = capsys.readouterr().err
    assert f"{config}: not valid YAML" in err and "Traceback" not in err
    config.write_text("out: x\nselect: {metadata: [a.parquet], ids: b.txt}\n")
    assert main(["run", str(config), "--set", "select.ids=[unclosed"]) == 2
    assert "override 'select.ids=[unclosed': not valid YAML" in capsys.readouterr().err


def test_missing_metadata_is_reported_before_the_pipeline_starts(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"out": str(tmp_path / "out"), "select": {"metadata": ["nope-*.parquet"], "ids": "y"}})
    )
    result = facemllm("run", str(config))
    assert result.returncode == 2 and "nothing matches 'nope-*.parquet'" in result.stderr


def test_overrides_parse_yaml_values(tmp_path):
    config = load_config(
        None,
        [
            "out=/o",
            "select.metadata=[a.parquet, b.parquet]",
            "select.ids=ids.pth",
            "select.nsfw=[UNLIKELY]",
            "download.timeout=2.5",
            "runner.direct_num_workers=4",
            "faces.max_faces=3",
        ],
    )
    assert config.select.metadata == ["a.parquet", "b.parquet"] and config.select.nsfw == ["UNLIKELY"]
    assert (
        config.download.timeout == 2.5
        and config.runner.direct_num_workers == 4
        and config.faces.max_faces == 3
    )
    with pytest.raises(ValueError, match=r"dotted\.key=value"):
        load_config(None, ["no-equals-sign"])


def test_config_hash_ignores_destination_and_parallelism():
    base = ["out=/a", "select.metadata=[m]", "select.ids=i"]
    reference = load_config(None, base).config_hash()
    assert (
        load_config(
            None, [*base, "out=/b", "runner.direct_num_workers=8", "download.thread_count=3"]
        ).config_hash()
        == reference
    )
    assert load_config(None, [*base, "faces.min_score=0.9"]).config_hash() != reference


def test_portable_runner_needs_an_endpoint():
    with pytest.raises(ValueError, match="job_endpoint"):
        load_config(None, ["out=/a", "select.metadata=[m]", "select.ids=i", "runner.runner=portable"])


def test_missing_id_list_is_reported_before_the_pipeline_starts(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"")
    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    config.write_text(
        yaml.safe_dump(
            {"out": str(out), "select": {"metadata": [str(tmp_path / "m.parquet")], "ids": "gone.pth"}}
        )
    )
    result = facemllm("run", str(config))
    assert result.returncode == 2 and "select.ids" in result.stderr and not out.exists()


def test_direct_runner_is_the_fn_api_runner_never_prism():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from facemllm.pipeline.runners import RunnerConfig, make_runner, pipeline_options

    assert isinstance(make_runner(RunnerConfig()), FnApiRunner)
    options = pipeline_options(RunnerConfig()).get_all_options()
    assert options["direct_running_mode"] == "multi_processing" and options["direct_num_workers"] == 2
    flink = pipeline_options(
        RunnerConfig(runner="flink", options=["--flink_master=host:8081"])
    ).get_all_options()
    assert flink["runner"] == "FlinkRunner" and flink["flink_master"] == "host:8081"
    assert make_runner(RunnerConfig(runner="flink")) is None
