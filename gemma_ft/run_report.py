"""What a run reports about itself: memory and time around training (metrics.json; printed with debug.verbose),
and one fully worked training example (debug.show_examples)."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

from gemma_ft.data.encoding import trained_label_spans


def peak_rss_gib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


@dataclass
class MemoryStats:
    """Memory and time around training: GPU reserved memory on CUDA, process peak RSS on a CPU."""

    verbose: bool
    start_reserved_gib: float = 0.0
    started_at: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        import torch

        self.started_at = time.perf_counter()
        if torch.cuda.is_available():
            self.start_reserved_gib = torch.cuda.max_memory_reserved() / 2**30
            if self.verbose:
                props = torch.cuda.get_device_properties(0)
                total = props.total_memory / 2**30
                print(f"GPU = {props.name}. Max memory = {total:.3f} GB.")
                print(f"{self.start_reserved_gib:.3f} GB of memory reserved.")
        elif self.verbose:
            print(f"CPU run. Peak RSS so far = {peak_rss_gib():.3f} GB.")

    def finish(self) -> dict:
        """Print the after-training report (when verbose) and return the training time and peak memory."""
        import torch

        runtime = time.perf_counter() - self.started_at
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            peak = torch.cuda.max_memory_reserved() / 2**30
            used_for_training = peak - self.start_reserved_gib
            if self.verbose:
                print(f"Training took {runtime:.1f} s.")
                print(f"Peak reserved memory = {peak:.3f} GB.")
                print(f"Peak reserved memory for training = {used_for_training:.3f} GB.")
                print(f"Peak reserved memory % of max memory = {100 * peak / total:.3f} %.")
                print(f"Peak reserved memory for training % of max memory = {100 * used_for_training / total:.3f} %.")
            return {"train_runtime_s": runtime, "peak_memory_gib": peak, "device": torch.cuda.get_device_name(0)}
        peak = peak_rss_gib()
        if self.verbose:
            print(f"Training took {runtime:.1f} s.")
            print(f"Peak process memory (RSS) = {peak:.3f} GB.")
        return {"train_runtime_s": runtime, "peak_memory_gib": peak, "device": "cpu"}


def show_example(rows, tokenizer, conversations, index: int) -> None:
    """Print one training row at each stage: the conversation as read, formatted text, tokens, and the labels that
    train (one line per assistant turn).

    `rows` are the encoded training rows (gemma_ft.data.encoding.EncodedRows) before any batching or packing."""
    index = max(0, min(index, len(rows.input_ids) - 1))
    input_ids, labels = rows.input_ids[index], rows.labels[index]
    conversation = conversations[rows.kept[index]]
    print("=== Dataset Example ===")
    print(f"row {conversation.row} of the data file")
    for message in conversation.messages():
        print(f"  {message['role']:>9}: {message['content']!r}")
    print("=== Formatted Text ===")
    print(tokenizer.decode(input_ids))
    print("=== Tokenized Input ===")
    print(input_ids)
    print("=== Masked Labels (only assistant responses) ===")
    for turn, span in enumerate(trained_label_spans(labels), start=1):
        print(f"  reply {turn}: {tokenizer.decode(span)!r}")

