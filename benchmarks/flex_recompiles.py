"""Which padded lengths make compiled flex attention (unsloth's attention for Gemma 3 on GPUs) compile again?

Calls torch.compile(flex_attention), as transformers does, with a causal block mask on a series of sequence
lengths (the padded lengths of length-grouped batches: falling, then the next megabatch's longest) and prints
each length's time; TORCH_LOGS-style lines name the guard behind every recompile. On CPU flex attention has no
backward, so it runs the forward pass only; on a GPU it also runs the backward.

    python benchmarks/flex_recompiles.py                       # lengths 400 380 360 300 200 150 140 127 600 500 120
    python benchmarks/flex_recompiles.py --lengths 300 129 128 600
    python benchmarks/flex_recompiles.py --lengths 400 300 320 310 --batches 4 4 3 4   # an epoch's short last batch
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[400, 380, 360, 300, 200, 150, 140, 127, 600, 500, 120])
    parser.add_argument("--batches", type=int, nargs="+",
                        help="rows per call, one per length (default 2 for every length)")
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    batches = args.batches or [2] * len(args.lengths)
    if len(batches) != len(args.lengths):
        parser.error(f"--batches needs one value per length ({len(args.lengths)}), got {len(batches)}")

    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._logging.set_logs(recompiles=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiled = torch.compile(flex_attention)

    def causal(batch, head, q_index, kv_index):
        return q_index >= kv_index

    for length, batch in zip(args.lengths, batches):
        q, k, v = (torch.randn(batch, 4, length, args.head_dim, device=device, requires_grad=device == "cuda")
                   for _ in range(3))
        block_mask = create_block_mask(causal, None, None, length, length, device=device)
        start = time.perf_counter()
        out = compiled(q, k, v, block_mask=block_mask)
        if device == "cuda":
            out.sum().backward()
            torch.cuda.synchronize()
        print(f"length {length}, {batch} rows: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
