"""Runs `python -m gemma_ft <overrides>` with rank 1 reading one row fewer than the CSV holds, as a rank does that
reads the file while another process is still writing it.

    torchrun --nproc_per_node 2 -m tests.helpers.uneven_data_cli [overrides...]
"""

from __future__ import annotations

import os
import sys

from gemma_ft.distributed import use_local_gpu

use_local_gpu()  # as gemma_ft does, before unsloth touches CUDA
import unsloth  # noqa: F401, E402, I001

import gemma_ft.pipeline as pipeline  # noqa: E402


def main() -> None:
    if os.environ.get("RANK") == "1":
        load_conversations = pipeline.load_conversations
        pipeline.load_conversations = lambda cfg: load_conversations(cfg)[:-1]

    from gemma_ft.__main__ import cli

    sys.argv = ["gemma_ft", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
