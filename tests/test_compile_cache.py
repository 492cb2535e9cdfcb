"""Compiled kernels are cached in one documented place (GPU runs compile each decoder block once)."""

from __future__ import annotations

import os

from gemma_ft.compile_cache import import_unsloth_with_persistent_compile_cache

VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "UNSLOTH_MEGA_CACHE_DIR")


def test_compile_caches_live_under_the_gemma_ft_cache_unless_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_FT_CACHE", str(tmp_path))
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    root = import_unsloth_with_persistent_compile_cache()
    assert root == tmp_path / "compile"
    assert [os.environ[v] for v in VARIABLES] == [str(root / d) for d in ("inductor", "triton", "unsloth")]

    import torch._inductor.runtime.cache_dir_utils as inductor  # where torch will actually write

    assert inductor.cache_dir() == str(root / "inductor")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/shared/inductor")
    import_unsloth_with_persistent_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/shared/inductor"
