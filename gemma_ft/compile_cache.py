"""One persistent place for compiled kernels, shared by every run and sweep job that sees the same cache dir.

On a GPU, unsloth compiles each decoder block on the first training steps: measured on an H200, 170-220 s
for the first two steps with nothing cached, 11-15 s once unsloth's compile bundle ("mega cache") holds the
shapes. Its bundle and torch's own caches would otherwise live in ~/.cache/unsloth and /tmp (which clusters
wipe and other nodes cannot see); we keep all three under <GEMMA_FT_CACHE>/compile unless the user chose.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemma_ft.models.builtin import cache_dir


def holds_compiled_kernels() -> bool:
    """Whether an earlier run on this machine (or a shared cache) left compiled kernels: a warm start."""
    root = cache_dir() / "compile"
    return any(any((root / name).glob("*")) for name in ("inductor", "unsloth", "triton") if (root / name).is_dir())


def import_unsloth_with_persistent_compile_cache() -> Path:
    """Import unsloth (before transformers, trl and peft: it patches them) with its compile caches under
    <GEMMA_FT_CACHE>/compile; a cache variable the user set wins. Returns that folder."""
    root = cache_dir() / "compile"
    users_inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ.setdefault("UNSLOTH_MEGA_CACHE_DIR", str(root / "unsloth"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    import unsloth  # noqa: F401

    # unsloth_zoo removes TORCHINDUCTOR_CACHE_DIR when it patches; torch reads it at each compile, so set it after.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = users_inductor_dir or str(root / "inductor")
    return root
