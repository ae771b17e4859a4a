"""The bundled demo: a LAION-400M-style metadata part and LAION-Face id list over a ``SampleServer``.

The real inputs are 32 metadata parquet files and a 443 MB id list. The demo writes one small part
in the same format, whose urls point at a loopback ``SampleServer``, so the whole pipeline runs
offline and every count it reports can be checked against the counts returned here.

Photos come from installed packages (``package_photos``), so the demo needs neither the network
nor the tests folder.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from facemllm.pipeline.demo.server import PHOTO_PREFIX

METADATA_FILE = "laion400m-meta-part-00000.parquet"
FACE_IDS_FILE = "laion_face_ids.pth"
ROW_GROUP_SIZE = 8  # small, so readers that stream by row group cross several groups

# Column types where REFERENCE.md leaves them open are our choice: the parsers must accept others.
LAION_SCHEMA = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("HEIGHT", pa.int32()),
        ("WIDTH", pa.int32()),
        ("LICENSE", pa.string()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
    ]
)

# package -> (folder inside it, photo files): human faces first, then no-face negatives.
_PACKAGE_PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "insightface": (
        "data/images",
        (
            "t1.jpg",
            "Tom_Hanks_54745.png",
            "mask_black.jpg",
            "mask_blue.jpg",
            "mask_green.jpg",
            "mask_white.jpg",
        ),
    ),
    "skimage": ("data", ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg")),
}
SCRFD_PHOTOS = ("solvay_conference_1927.jpg", "newton.png", "gauss.png")

ALT_TEXTS = {
    "t1.jpg": "Six friends laughing around a poker table at a party",
    "Tom_Hanks_54745.png": "Tom Hanks close-up portrait",
    "mask_black.jpg": "Black disposable face mask, pack of 50",
    "mask_blue.jpg": "Blue 3-ply surgical face mask product photo",
    "mask_green.jpg": "Green medical face mask on white background",
    "mask_white.jpg": "White non-woven face mask",
    "astronaut.png": "Astronaut Eileen Collins official NASA portrait in flight suit",
    "camera.png": "Black and white photo of a cameraman with a vintage camera on a tripod",
    "chelsea.png": "Chelsea the tabby cat looking into the camera",
    "coffee.png": "Cup of espresso on a saucer, top view",
    "rocket.jpg": "Falcon 9 rocket on the launch pad before liftoff",
    "solvay_conference_1927.jpg": "Solvay Conference 1927 group photo of physicists",
    "newton.png": "Portrait of Isaac Newton by Godfrey Kneller",
    "gauss.png": "Carl Friedrich Gauss portrait painting",
}

# What img2dataset 1.47 records for each fault route, with the guard installed (allow_loopback),
# its default X-Robots-Tag directives, and a client timeout below the server's stall.
FAULT_EXPECTED_STATUS = {
    "/fault/404": "failed_to_download",
    "/fault/500": "failed_to_download",
    "/fault/timeout": "failed_to_download",
    "/fault/truncated.jpg": "failed_to_resize",
    "/fault/not-an-image.jpg": "failed_to_resize",
    "/fault/empty.jpg": "failed_to_resize",
    "/fault/bomb.png": "failed_to_resize",
    "/fault/redirect-private": "failed_to_download",
    "/fault/noai.jpg": "failed_to_download",
}

DUPLICATED_PHOTOS = 3  # LAION lists the same image under several urls and sample ids
UNSELECTED_ROWS = 4
ABSENT_IDS = 3  # ids in the LAION-Face list whose rows live in other metadata parts
LICENSES = (
    "?",
    "?",
    "?",
    "https://creativecommons.org/licenses/by/2.0/",
    "https://creativecommons.org/licenses/by-nc-sa/3.0/",
)


@dataclass(frozen=True)
class DemoSample:
    """Where the demo inputs are and what a correct run must report for them."""

    metadata_path: Path
    face_ids_path: Path
    photo_names: tuple[str, ...]
    metadata_rows: int
    selected_rows: int
    expected_successes: int
    expected_failures: int
    expected_status: Mapping[int, str] = field(repr=False)  # SAMPLE_ID -> img2dataset status


def package_photos(scrfd_dir: Path | None = None) -> dict[str, Path]:
    """Real photos that installed packages ship, by file name; ``scrfd_dir`` adds the scrfd sdist's.

    Packages are located without importing them (importing insightface loads onnxruntime).
    A missing package just contributes nothing; an explicit ``scrfd_dir`` must hold its images.
    """
    photos: dict[str, Path] = {}
    for package, (folder, names) in _PACKAGE_PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations))) / folder
        photos.update({name: root / name for name in names if (root / name).is_file()})
    if scrfd_dir is not None:
        missing = [name for name in SCRFD_PHOTOS if not (scrfd_dir / "images" / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{scrfd_dir}/images lacks {missing}: pass the extracted scrfd-0.3.0 sdist"
            )
        photos.update({name: scrfd_dir / "images" / name for name in SCRFD_PHOTOS})
    return photos


@dataclass
class _Row:
    url: str
    text: str
    size: tuple[int, int] | None  # (width, height) as the page declared it
    expected_status: str | None  # None: not in the LAION-Face id list
    nsfw: str = "UNLIKELY"


def _photo_rows(base_url: str, photos: Mapping[str, Path]) -> list[_Row]:
    rows = []
    for name, path in photos.items():
        with Image.open(path) as image:  # reads the header only
            size = image.size
        rows.append(
            _Row(f"{base_url}{PHOTO_PREFIX}{quote(name)}", ALT_TEXTS.get(name, name), size, "success")
        )
    for row in rows[:DUPLICATED_PHOTOS]:
        rows.append(_Row(f"{row.url}?size=large", f"{row.text} (large)", row.size, "success"))
    return rows


def _fault_rows(base_url: str) -> list[_Row]:
    return [
        _Row(f"{base_url}{route}", f"Stock photo {route.rsplit('/', 1)[-1]}", (640, 480), status)
        for route, status in FAULT_EXPECTED_STATUS.items()
    ]


def _unselected_rows(base_url: str, photos: Mapping[str, Path]) -> list[_Row]:
    first = next(iter(photos))
    nsfw_cycle = ("UNLIKELY", "NSFW", "UNSURE", "UNLIKELY")
    return [
        _Row(
            f"{base_url}{PHOTO_PREFIX}{quote(first)}?ref=unselected-{i}",
            f"Mountain lake landscape wallpaper {i}",
            None,
            None,
            nsfw_cycle[i % len(nsfw_cycle)],
        )
        for i in range(UNSELECTED_ROWS)
    ]


def build_demo_sample(out_dir: Path, base_url: str, photos: Mapping[str, Path] | None = None) -> DemoSample:
    """Write the demo metadata part and id list for a server at ``base_url`` serving ``photos``.

    ``photos`` must be the mapping the server was given (default: ``package_photos()``).
    Selected rows: one per photo, a second url for the first ``DUPLICATED_PHOTOS`` photos, and one
    per fault route; one selected photo row is tagged UNSURE and one NSFW. ``UNSELECTED_ROWS`` more
    rows are absent from the id list, and the id list holds ``ABSENT_IDS`` ids with no row here.
    """
    photos = dict(package_photos() if photos is None else photos)
    if not photos:
        raise ValueError("no photos found: install scikit-image or insightface, or pass photos")
    base_url = base_url.rstrip("/")
    selected = _photo_rows(base_url, photos) + _fault_rows(base_url)
    selected[1].nsfw, selected[2].nsfw = "UNSURE", "NSFW"
    rows = selected + _unselected_rows(base_url, photos)
    rng = random.Random(1927)
    rng.shuffle(rows)  # interleave selected, unselected and faults across row groups

    first_id = 1_630_000_000
    sample_ids = [first_id + 37 * i + rng.randrange(37) for i in range(len(rows))]
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata_path = out_dir / METADATA_FILE
    table = pa.table(
        {
            "SAMPLE_ID": sample_ids,
            "URL": [row.url for row in rows],
            "TEXT": [row.text for row in rows],
            "HEIGHT": [row.size[1] if row.size else None for row in rows],
            "WIDTH": [row.size[0] if row.size else None for row in rows],
            "LICENSE": [rng.choice(LICENSES) for _ in rows],
            "NSFW": [row.nsfw for row in rows],
            "similarity": [round(rng.uniform(0.30, 0.42), 6) for _ in rows],
        },
        schema=LAION_SCHEMA,
    )
    pq.write_table(table, metadata_path, row_group_size=ROW_GROUP_SIZE)

    expected_status = {
        sample_id: row.expected_status
        for sample_id, row in zip(sample_ids, rows, strict=True)
        if row.expected_status is not None
    }
    absent_ids = [first_id + 37 * (len(rows) + i) for i in range(ABSENT_IDS)]
    face_ids_path = out_dir / FACE_IDS_FILE
    _write_face_ids(face_ids_path, sorted(expected_status) + absent_ids)

    successes = sum(status == "success" for status in expected_status.values())
    return DemoSample(
        metadata_path=metadata_path,
        face_ids_path=face_ids_path,
        photo_names=tuple(photos),
        metadata_rows=len(rows),
        selected_rows=len(expected_status),
        expected_successes=successes,
        expected_failures=len(expected_status) - successes,
        expected_status=expected_status,
    )


def _write_face_ids(path: Path, part0_ids: list[int]) -> None:
    """The published layout: ``torch.save`` of a list indexed by part, part 0 an int64 tensor."""
    import torch  # only the id list needs it, and importing torch costs about a second

    torch.save([torch.tensor(part0_ids, dtype=torch.int64)], path)
