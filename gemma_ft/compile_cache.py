"""One persistent place for compiled kernels, shared by every run and sweep job on a machine.

On a GPU, unsloth compiles each decoder block on the first training steps (minutes with an empty cache,
seconds with a warm one). Torch keeps those artifacts in /tmp by default, which clusters wipe and jobs on
other nodes cannot see; we keep them beside the model cache instead, unless the user chose a place.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemma_ft.models.builtin import cache_dir

CACHE_VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def use_persistent_compile_cache() -> Path:
    """Point torch inductor's and triton's caches at <GEMMA_FT_CACHE>/compile (a variable already set wins)."""
    root = cache_dir() / "compile"
    for variable, folder in CACHE_VARIABLES.items():
        os.environ.setdefault(variable, str(root / folder))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
