"""Import ``facemllm.*`` from this checkout in an interpreter where the package is not installed.

The vLLM server's venv (``scripts/build_tiny_idefics3.py``) and a bare GPU machine
(``scripts/gpu_train_check.py``) run scripts straight from a checkout: the installed package maps
``facemllm.schemas`` to ``schemas/`` with setuptools' ``package-dir``, and this does the same by
giving the ``facemllm`` namespace the checkout root as its path.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def use_checkout() -> None:
    """Make ``facemllm.<folder>`` (and ``tests``) importable from the checkout, once."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if "facemllm" not in sys.modules and importlib.util.find_spec("facemllm") is None:
        namespace = types.ModuleType("facemllm")
        namespace.__path__ = [str(REPO)]
        sys.modules["facemllm"] = namespace
