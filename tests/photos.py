"""Real face photos that installed packages ship, so face tests need no network and no mocks.

- scikit-image: ``astronaut.png`` (one face) and ``camera.png`` (one face) in ``skimage/data/``;
- the insightface wheel: ``data/images/t1.jpg`` (6 faces) and ``mask_*.jpg`` (masks, no face);
- the scrfd==0.3.0 sdist (see ``annotators.model_store``): ``images/solvay_conference_1927.jpg``
  (29 faces), ``newton.png`` and ``gauss.png`` with boxes and landmarks in ``tests/truth_faces.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, NamedTuple

import insightface
import skimage.data

from facemllm.annotators.model_store import ensure_scrfd_package

SCRFD_PHOTOS = ("solvay_conference_1927.jpg", "newton.png", "gauss.png")


class TruthFace(NamedTuple):
    """A face as the scrfd package's own test expects it (coordinates truncated to whole pixels)."""

    bbox: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    probability: float


def skimage_photo(name: str = "astronaut.png") -> Path:
    path = Path(skimage.data.data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"scikit-image does not ship {path}")
    return path


def insightface_image_dir() -> Path:
    return Path(insightface.__file__).parent / "data" / "images"


def insightface_t1() -> Path:
    """A group photo with 6 faces."""
    return insightface_image_dir() / "t1.jpg"


def insightface_masks() -> list[Path]:
    """Photos of face masks alone: the detector must find nothing in them."""
    masks = sorted(insightface_image_dir().glob("mask_*.jpg"))
    if not masks:
        raise FileNotFoundError(f"no mask_*.jpg in {insightface_image_dir()}")
    return masks


def scrfd_photo(name: str) -> Path:
    if name not in SCRFD_PHOTOS:
        raise ValueError(f"{name!r} is not one of {SCRFD_PHOTOS}")
    return ensure_scrfd_package() / "images" / name


def scrfd_truth_faces() -> dict[str, list[TruthFace]]:
    """``TRUTH_FACES`` from the sdist's ``tests/truth_faces.py``, read with ``ast``: nothing is executed.

    That file imports the ``scrfd`` package (not installed here) and builds pydantic objects; only
    its literal constructor calls are evaluated, by the whitelist below.
    """
    source = (ensure_scrfd_package() / "tests" / "truth_faces.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "TRUTH_FACES" for t in targets):
                return _evaluate(node.value)
    raise ValueError("TRUTH_FACES not found in the scrfd truth file")


def _evaluate(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str):
        return node.value
    if isinstance(node, ast.List):
        return [_evaluate(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {_evaluate(k): _evaluate(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        fields = {keyword.arg: _evaluate(keyword.value) for keyword in node.keywords}
        match node.func.id:
            case "Point":
                return (float(fields["x"]), float(fields["y"]))
            case "Bbox":
                return (*fields["upper_left"], *fields["lower_right"])
            case "FaceKeypoints":
                order = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")
                return tuple(fields[name] for name in order)
            case "Face":
                return TruthFace(fields["bbox"], fields["keypoints"], float(fields["probability"]))
    raise ValueError(f"unexpected expression in the scrfd truth file: {ast.dump(node)[:120]}")
