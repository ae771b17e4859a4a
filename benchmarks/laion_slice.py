"""A synthetic LAION-400M slice in the real schema, for the scale benchmarks.

Metadata parts ``part-NNNNN.parquet`` with LAION-400M's columns, served by the demo's loopback
server: the package photos, each under many urls (the same bytes: exact duplicates), and a failure
mix like a crawl's: dead links (404s and refused connections), stalls (the server holds the
request past ``download.timeout``), HTML pages where an image was expected, and NSFW tags. The id
list is the published LAION-Face container: a ``.pth`` list of one int64 tensor per part, in no
order, holding the ids of most rows (the rest are not LAION-Face) and ids of no row.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

FIRST_ID = 1_630_000_000
DEAD = 0.20  # half 404s, half refused connections
STALLS = 0.02
HTML = 0.03
NOT_IN_ID_LIST = 0.10
NSFW = {"UNLIKELY": 0.9, "UNSURE": 0.07, "NSFW": 0.03}


LATENCY_S = 0.02  # per request, as a near image host answers


@contextmanager
def slice_server(timeout_s: float) -> Iterator[tuple[object, dict[str, Path]]]:
    """The loopback server the slice's urls point at, and the package photos it serves: every
    request answered after ``LATENCY_S``, a stall held three times past ``timeout_s``."""
    from facemllm.annotators.model_store import ensure_scrfd_package
    from facemllm.pipeline.demo.sample import package_photos
    from facemllm.pipeline.demo.server import SampleServer

    photos = package_photos(ensure_scrfd_package())
    with SampleServer(photos, latency_s=LATENCY_S, stall_s=3 * timeout_s) as server:
        yield server, photos


@dataclass(frozen=True)
class Slice:
    metadata: list[Path]
    ids: Path
    rows: int
    selected: int
    photo_rows: int  # selected rows that point at a photo (the rest are failures by design)


def refused_url() -> str:
    """A loopback url nothing listens on (connection refused at once)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.jpg"


def build_slice(folder: Path, base_url: str, photos: dict[str, Path], rows: int, parts: int = 1) -> Slice:
    """``rows`` rows over ``parts`` metadata files and their id list (deterministic for a seed)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from facemllm.pipeline.demo.sample import ALT_TEXTS
    from facemllm.pipeline.demo.server import PHOTO_PREFIX

    rng = random.Random(400)
    names = sorted(photos)
    dead = refused_url()
    folder.mkdir(parents=True, exist_ok=True)
    metadata, id_parts = [], []
    selected = photo_rows = 0
    per_part = -(-rows // parts)
    for part in range(parts):
        urls, texts, nsfw, ids = [], [], [], []
        for index in range(part * per_part, min(rows, (part + 1) * per_part)):
            draw = rng.random()
            if draw < DEAD / 2:
                url, text = f"{base_url}/fault/404?i={index}", "a page that is gone"
            elif draw < DEAD:
                url, text = f"{dead}?i={index}", "a host that is gone"
            elif draw < DEAD + STALLS:
                url, text = f"{base_url}/fault/timeout?i={index}", "a slow host"
            elif draw < DEAD + STALLS + HTML:
                url, text = f"{base_url}/fault/not-an-image.jpg?i={index}", "a hotlink wall"
            else:
                name = names[index % len(names)]
                url, text = f"{base_url}{PHOTO_PREFIX}{quote(name)}?i={index}", ALT_TEXTS.get(name, name)
            urls.append(url)
            texts.append(text)
            nsfw.append(rng.choices(list(NSFW), weights=list(NSFW.values()))[0])
            ids.append(FIRST_ID + 37 * index + rng.randrange(37))
        in_list = [i for i in ids if rng.random() >= NOT_IN_ID_LIST]
        listed_here = set(in_list)
        selected += len(in_list)
        photo_rows += sum(1 for i, u in zip(ids, urls, strict=True) if i in listed_here and PHOTO_PREFIX in u)
        absent = [FIRST_ID - 1 - k for k in range(len(ids) // 10)]  # LAION-Face ids of rows not here
        listed = np.array(in_list + absent, dtype=np.int64)
        np.random.default_rng(part).shuffle(listed)
        id_parts.append(torch.from_numpy(listed))
        path = folder / f"part-{part:05d}.parquet"
        pq.write_table(
            pa.table(
                {
                    "SAMPLE_ID": pa.array(ids, pa.int64()),
                    "URL": urls,
                    "TEXT": texts,
                    "HEIGHT": pa.array([512] * len(ids), pa.int32()),
                    "WIDTH": pa.array([512] * len(ids), pa.int32()),
                    "LICENSE": ["?"] * len(ids),
                    "NSFW": nsfw,
                    "similarity": [0.31] * len(ids),
                }
            ),
            path,
        )
        metadata.append(path)
    id_list = folder / "laion_face_ids.pth"
    torch.save(id_parts, id_list)
    return Slice(metadata, id_list, rows, selected, photo_rows)
