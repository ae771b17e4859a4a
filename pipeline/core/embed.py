"""Images inside self-contained HTML pages (the run report, the evaluation report): data URIs, so a
page loads nothing from anywhere."""

from __future__ import annotations

import base64
import io


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def jpeg_thumbnail_uri(image: bytes, side: int) -> str:
    """``image`` shrunk to fit ``side`` x ``side``, as a JPEG data URI (OSError/ValueError when
    the bytes are not an image PIL can read)."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as opened:
        picture = opened.convert("RGB")
        picture.thumbnail((side, side))
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=80)
    return data_uri(buffer.getvalue(), "image/jpeg")
