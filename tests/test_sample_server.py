"""The loopback sample server, the demo sample built on it, and img2dataset's own downloader over both."""

from __future__ import annotations

import http.client
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from benchmarks._common import peak_rss_mb
from facemllm.pipeline.demo.sample import (
    FAULT_EXPECTED_STATUS,
    LAION_SCHEMA,
    ROW_GROUP_SIZE,
    SCRFD_PHOTOS,
    DemoSample,
    build_demo_sample,
    package_photos,
)
from facemllm.pipeline.demo.server import FAULT_ROUTES, PRIVATE_REDIRECT_TARGET, SampleServer
from facemllm.pipeline.stages.netguard import DestinationPolicy

CLIENT_TIMEOUT_S = 2
# cv2 refuses to decode images above this many pixels; 64 Mpx keeps every real photo and refuses
# the 400 Mpx bomb from its header, before allocating anything.
MAX_DECODED_PIXELS = 1 << 26


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    return package_photos()


@pytest.fixture(scope="module")
def server(photos: dict[str, Path]) -> Iterator[SampleServer]:
    with SampleServer(photos, stall_s=CLIENT_TIMEOUT_S + 2) as running:
        yield running


def fetch(server: SampleServer, path: str, timeout: float = 5) -> tuple[http.client.HTTPResponse, bytes]:
    """A plain HTTP GET that follows no redirect, so each route is seen exactly as served."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", int(server.base_url.rsplit(":", 1)[1]), timeout=timeout
    )
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def test_package_photos_are_real_images(photos: dict[str, Path]) -> None:
    assert {"t1.jpg", "Tom_Hanks_54745.png", "astronaut.png", "camera.png"} <= set(photos)
    for path in photos.values():
        with Image.open(path) as image:
            image.verify()


def test_package_photos_adds_the_scrfd_images(tmp_path: Path, photos: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="scrfd"):
        package_photos(tmp_path)
    (tmp_path / "images").mkdir()
    for name in SCRFD_PHOTOS:
        shutil.copy(photos["t1.jpg"], tmp_path / "images" / name)
    assert set(SCRFD_PHOTOS) <= set(package_photos(tmp_path))


def test_photos_are_served_with_their_content_type(server: SampleServer, photos: dict[str, Path]) -> None:
    for name, path in photos.items():
        response, body = fetch(server, f"/img/{name}")
        assert response.status == 200
        assert response.headers["Content-Type"] == ("image/png" if name.endswith(".png") else "image/jpeg")
        assert body == path.read_bytes()


@pytest.mark.parametrize(
    ("path", "status"), [("/fault/404", 404), ("/fault/500", 500), ("/img/nope.jpg", 404)]
)
def test_error_routes(server: SampleServer, path: str, status: int) -> None:
    assert fetch(server, path)[0].status == status


def test_truncated_jpeg_is_the_first_half_of_a_real_photo(server: SampleServer) -> None:
    response, body = fetch(server, "/fault/truncated.jpg")
    original = server.fault_source.read_bytes()
    assert response.headers["Content-Type"] == "image/jpeg"
    assert body == original[: len(original) // 2]
    with Image.open(io.BytesIO(body)) as image, pytest.raises(OSError, match="truncated"):
        image.load()


def test_not_an_image_is_html_labelled_jpeg(server: SampleServer) -> None:
    response, body = fetch(server, "/fault/not-an-image.jpg")
    assert response.headers["Content-Type"] == "image/jpeg"
    assert body.startswith(b"<!doctype html>")
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(body))


def test_empty_jpeg(server: SampleServer) -> None:
    response, body = fetch(server, "/fault/empty.jpg")
    assert (response.status, response.headers["Content-Type"], body) == (200, "image/jpeg", b"")


def test_bomb_is_tiny_on_the_wire_and_declares_400_megapixels(server: SampleServer) -> None:
    response, body = fetch(server, "/fault/bomb.png")
    assert response.headers["Content-Type"] == "image/png"
    assert len(body) < 200
    with pytest.raises(Image.DecompressionBombError, match="400000000 pixels"):
        Image.open(io.BytesIO(body))


def test_redirect_points_into_a_private_network(server: SampleServer) -> None:
    response, _ = fetch(server, "/fault/redirect-private")
    assert response.status == 302
    assert response.headers["Location"] == PRIVATE_REDIRECT_TARGET == "http://10.255.255.1/x.jpg"


def test_noai_photo_carries_the_opt_out(server: SampleServer) -> None:
    response, body = fetch(server, "/fault/noai.jpg")
    assert response.headers["X-Robots-Tag"] == "noai"
    assert body == server.fault_source.read_bytes()


def test_timeout_route_outlasts_the_client(server: SampleServer) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        fetch(server, "/fault/timeout", timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_close_ends_a_stalled_response_at_once(photos: dict[str, Path]) -> None:
    stalled = SampleServer(photos, stall_s=60)
    outcome: list[BaseException] = []

    def wait_for_stall() -> None:
        try:
            fetch(stalled, "/fault/timeout", timeout=60)
        except OSError as err:
            outcome.append(err)

    client = threading.Thread(target=wait_for_stall)
    client.start()
    while stalled.request_count("/fault/timeout") == 0:
        time.sleep(0.01)
    started = time.monotonic()
    stalled.close()
    client.join(timeout=5)
    assert time.monotonic() - started < 1
    assert len(outcome) == 1 and isinstance(outcome[0], http.client.RemoteDisconnected)


def test_request_counter_is_exact_under_concurrency(server: SampleServer) -> None:
    before = server.request_count("/img/t1.jpg")
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: fetch(server, f"/img/t1.jpg?i={i}")[0].status, range(40)))
    assert statuses == [200] * 40
    assert server.request_count("/img/t1.jpg") == before + 40


def test_latency_delays_every_response(photos: dict[str, Path]) -> None:
    with SampleServer(photos, latency_s=0.2) as slow:
        started = time.monotonic()
        fetch(slow, "/fault/404")
        assert time.monotonic() - started >= 0.2


def test_server_needs_a_jpeg(photos: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"\.jpg"):
        SampleServer({"astronaut.png": photos["astronaut.png"]})


def test_every_fault_route_has_an_expected_status() -> None:
    assert set(FAULT_EXPECTED_STATUS) == set(FAULT_ROUTES)


@pytest.fixture(scope="module")
def demo(
    tmp_path_factory: pytest.TempPathFactory, server: SampleServer, photos: dict[str, Path]
) -> DemoSample:
    return build_demo_sample(tmp_path_factory.mktemp("demo"), server.base_url, photos)


def selected_rows(demo: DemoSample) -> pa.Table:
    """Select like the pipeline does: metadata rows whose SAMPLE_ID is in part 0 of the id list."""
    face_ids = torch.load(demo.face_ids_path)
    assert isinstance(face_ids, list) and face_ids[0].dtype == torch.int64
    table = pq.read_table(demo.metadata_path)
    return table.filter(pa.compute.is_in(table["SAMPLE_ID"], pa.array(face_ids[0].tolist())))


def test_demo_metadata_has_the_laion_layout(demo: DemoSample) -> None:
    metadata = pq.ParquetFile(demo.metadata_path)
    assert metadata.schema_arrow.equals(LAION_SCHEMA)
    assert metadata.metadata.num_rows == demo.metadata_rows
    assert metadata.num_row_groups == -(-demo.metadata_rows // ROW_GROUP_SIZE) > 2


def test_demo_counts_match_its_files(demo: DemoSample, server: SampleServer) -> None:
    selected = selected_rows(demo)
    assert selected.num_rows == demo.selected_rows == len(demo.expected_status)
    assert demo.metadata_rows > demo.selected_rows  # some rows are not LAION-Face rows
    assert set(selected["SAMPLE_ID"].to_pylist()) == set(demo.expected_status)
    urls = selected["URL"].to_pylist()
    assert {f"{server.base_url}{route}" for route in FAULT_ROUTES} <= set(urls)
    photo_rows = sum("/img/" in url for url in urls)
    assert 12 <= photo_rows <= 20
    assert demo.expected_successes == photo_rows
    assert demo.expected_failures == len(FAULT_ROUTES)
    assert set(selected["NSFW"].to_pylist()) == {"UNLIKELY", "UNSURE", "NSFW"}


def _download_in_fresh_interpreter(feather_path: str, output_folder: str, report_path: str) -> None:
    """Run img2dataset's Downloader on one shard, the way its ``download()`` builds it.

    Runs in a spawned interpreter because cv2 reads OPENCV_IO_MAX_IMAGE_PIXELS once, when it is
    imported: setting it later in a process that already imported cv2 has no effect.
    """

    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(MAX_DECODED_PIXELS)
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    from facemllm.pipeline.stages.netguard import install_guarded_opener

    install_guarded_opener(DestinationPolicy(allow_loopback=True))
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=Resizer(image_size=256, resize_mode="no", resize_only_if_bigger=False),
        thread_count=4,
        save_caption=True,
        extract_exif=True,
        output_folder=output_folder,
        column_list=["SAMPLE_ID", "caption", "url"],
        timeout=CLIENT_TIMEOUT_S,
        number_sample_per_shard=10_000,
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=0,
        user_agent_token=None,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )
    ok, _ = downloader((0, feather_path))
    # VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts at its parent's (pytest's) peak
    Path(report_path).write_text(json.dumps({"ok": ok, "peak_rss_mb": peak_rss_mb()}))


def test_img2dataset_downloader_accounts_for_every_route(
    demo: DemoSample, server: SampleServer, tmp_path: Path
) -> None:
    selected = selected_rows(demo)
    shard = pa.table(
        {"SAMPLE_ID": selected["SAMPLE_ID"], "caption": selected["TEXT"], "url": selected["URL"]}
    )
    feather_path, output_folder, report_path = (
        tmp_path / "00000.feather",
        tmp_path / "images",
        tmp_path / "run.json",
    )
    output_folder.mkdir()
    with pa.OSFile(str(feather_path), "wb") as sink, pa.ipc.new_file(sink, shard.schema) as writer:
        writer.write_table(shard)

    child = multiprocessing.get_context("spawn").Process(
        target=_download_in_fresh_interpreter, args=(str(feather_path), str(output_folder), str(report_path))
    )
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    report = json.loads(report_path.read_text())
    assert report["ok"]

    status = pq.read_table(output_folder / "00000.parquet").to_pandas()
    assert len(status) == demo.selected_rows
    assert sorted(status["url"]) == sorted(selected["URL"].to_pylist())
    assert dict(zip(status["SAMPLE_ID"], status["status"], strict=True)) == demo.expected_status
    errors = dict(zip(status["url"].str.removeprefix(server.base_url), status["error_message"], strict=True))
    assert errors["/fault/404"] == "HTTP Error 404: Not Found"
    assert errors["/fault/500"] == "HTTP Error 500: Internal Server Error"
    assert errors["/fault/timeout"] == "timed out"
    assert errors["/fault/redirect-private"] == (
        "<urlopen error refused destination 10.255.255.1 (private) for host 10.255.255.1>"
    )
    assert errors["/fault/noai.jpg"] == "Use of image disallowed by X-Robots-Tag directive"
    assert errors["/fault/truncated.jpg"] == errors["/fault/not-an-image.jpg"] == "Image decoding error"
    assert "!buf.empty()" in errors["/fault/empty.jpg"]
    # Refused from the PNG header by cv2's pixel limit, not after allocating 1.2 GB.
    assert "pixels <= CV_IO_MAX_IMAGE_PIXELS" in errors["/fault/bomb.png"]
    assert report["peak_rss_mb"] < 1000

    stats = json.loads((output_folder / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"]) == (demo.selected_rows, demo.expected_successes)
    assert stats["failed_to_download"] + stats["failed_to_resize"] == demo.expected_failures
    with tarfile.open(output_folder / "00000.tar") as tar:
        images = [name for name in tar.getnames() if name.endswith(".jpg")]
    assert len(images) == demo.expected_successes
