"""The benchmark tools: the paired-step comparison (benchmarks/paired_steps.py) on synthetic logs, and the DDP
options throughput.py accepts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired_steps():
    return load_script("paired_steps")


def write_log(path: Path, steps: dict[int, tuple[float, int]]) -> Path:
    # throughput.py's lines sit inside tqdm's progress output; under torchrun each rank prints one per step.
    path.write_text("".join(f" 5%|x| 1/20 [bench] step {n}: {s} s, {t} tokens\n[bench] step {n}: 9.9 s, 1 tokens\n"
                            for n, (s, t) in steps.items()))
    return path


def test_ratio_of_summed_times_over_common_timed_steps(tmp_path):
    base = write_log(tmp_path / "a.log", {1: (90.0, 100), 6: (0.2, 300), 7: (0.4, 400), 8: (0.3, 500)})
    cand = write_log(tmp_path / "b.log", {1: (10.0, 100), 6: (0.1, 300), 7: (0.2, 400)})  # cut after step 7
    steps, ratio = paired_steps().paired_speed_ratio(base, cand, warmup=5)
    assert steps == 2 and ratio == pytest.approx(0.6 / 0.3)


def test_different_batches_are_refused(tmp_path):
    base = write_log(tmp_path / "a.log", {6: (0.2, 300)})
    cand = write_log(tmp_path / "b.log", {6: (0.2, 301)})
    with pytest.raises(SystemExit, match="not the same batches"):
        paired_steps().paired_speed_ratio(base, cand)


def test_ddp_options_are_parsed_as_booleans_and_unknown_ones_refused():
    parse = load_script("throughput").parse_ddp_options
    assert parse(["static_graph=true", "gradient_as_bucket_view=False"]) == {
        "static_graph": True, "gradient_as_bucket_view": False}
    for bad in ("static_graph=yes", "bucket_cap_mb=true", "no_such_option=true"):
        with pytest.raises(SystemExit, match=bad.split("=")[0]):
            parse([bad])


def test_batch_order_and_batch_override_a_cases_settings_and_unset_ones_keep_gemma_fts_defaults(tmp_path):
    from types import SimpleNamespace

    throughput = load_script("throughput")
    args = SimpleNamespace(case="gemma_ft", batch=None, sampling="group_by_length", steps=3, profile_steps=0,
                           max_len=256, logging_steps=5, epoch=False, set=[])
    assert throughput.case_settings(args) == (8, 1, "adamw_torch", "group_by_length")

    def config(**changes):
        return throughput.gemma_ft_config(SimpleNamespace(**{**vars(args), **changes}), tmp_path / "data.csv",
                                          tmp_path / "model")

    defaults = config(case="gemma_ft_defaults", sampling=None, batch=4)
    assert defaults.train.per_device_train_batch_size == 4
    assert (defaults.train.gradient_accumulation_steps, defaults.train.sampling) == (1, "group_by_length")
    random_order = config(case="gemma_ft_defaults", sampling="random")
    assert random_order.train.sampling == "random" and random_order.train.per_device_train_batch_size == 8
    assert random_order.train.logging_steps == 5


def test_window_timing_synchronises_only_at_the_timed_windows_ends_and_step_timing_at_every_step():
    meter_class = load_script("throughput").Meter
    window = meter_class(slice(5, 20), timing="window", profile_steps=3)
    assert [n for n in range(30) if window._synchronize_here(n)] == [5, 20, 23]  # window, then the profiled steps
    every = meter_class(slice(5, 20), timing="step")
    assert all(every._synchronize_here(n) for n in range(30))


def wrapped_in(meter):
    """A stand-in Trainer with what Meter.wrap touches (training_step, the callbacks, the pad token), and the
    Meter's timer."""
    from types import SimpleNamespace

    import torch

    class Trainer:
        callbacks = []
        processing_class = SimpleNamespace(pad_token_id=0)

        def training_step(self, model, inputs):
            return torch.tensor(0.0)

        def add_callback(self, callback):
            self.callbacks.append(callback)

    trainer = Trainer()
    meter.wrap(trainer)
    return trainer, trainer.callbacks[0]


def test_meter_records_each_steps_padded_length_and_token_id_sum():
    import torch

    meter = load_script("throughput").Meter(slice(1, 3), timing="window")
    trainer, timer = wrapped_in(meter)
    for ids in ([[5, 6, 7], [8, 9, 0]], [[1, 2], [3, 4]]):
        timer.on_step_begin(None, None, None)
        trainer.training_step(None, {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(2, len(ids[0]))})
        timer.on_step_end(None, None, None)
    assert meter.padded_lengths == [3, 2]
    assert meter.token_id_sums_counted() == [35, 10]
    assert meter.tokens_counted() == [6, 4]


def test_meter_counts_only_a_packed_bins_real_tokens():
    """A packed bin has no attention mask: its filler (pad id 0) is not a trained token."""
    import torch

    meter = load_script("throughput").Meter(slice(0, 1), timing="window")
    trainer, timer = wrapped_in(meter)
    timer.on_step_begin(None, None, None)
    trainer.training_step(None, {"input_ids": torch.tensor([[2, 5, 6, 2, 7, 0, 0, 0]])})
    timer.on_step_end(None, None, None)
    assert meter.tokens_counted() == [5] and meter.padded_lengths == [8]


def test_meter_records_the_pinned_host_blocks_each_step_allocated_and_their_time():
    import torch

    # The CUDA host allocator's running totals (blocks, seconds) as the Meter reads them: before and after each step.
    totals = iter([(0, 0.0), (0, 0.0), (0, 0.0), (18, 2.5), (18, 2.5), (18, 2.5)])
    meter = load_script("throughput").Meter(slice(0, 3), timing="window", pinned_totals=lambda: next(totals))
    trainer, timer = wrapped_in(meter)
    for _ in range(3):
        timer.on_step_begin(None, None, None)
        trainer.training_step(None, {"input_ids": torch.tensor([[1, 2]])})
        timer.on_step_end(None, None, None)
    assert meter.pinned_allocs == [(0, 0.0), (18, 2.5), (0, 0.0)]
    assert load_script("throughput").pinned_host_alloc_totals() == (0, 0.0)  # no CUDA here: nothing pinned


def _rows_read_after_preparing(workdir: str, start) -> int:
    """One torchrun rank's view: prepare the benchmark's inputs, then count the CSV's data rows."""
    import csv
    from types import SimpleNamespace

    throughput = load_script("throughput")
    start.wait()  # the ranks start together, as under torchrun
    args = SimpleNamespace(workdir=workdir, model_dir=workdir, arch="270m", tokenizer=workdir)
    data, _ = throughput.prepare_inputs(args)
    with data.open(newline="") as handle:
        return sum(1 for _ in csv.reader(handle)) - 1


def test_ranks_preparing_the_benchmark_inputs_at_once_all_read_the_whole_csv(tmp_path):
    # Two runs of 2026-11-27: one rank of two two-GPU runs read 1,393 and 1,989 of the 3,000 rows, while the other rank
    # was still writing them, and trained on other rows than its partner.
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        workdir = tmp_path / f"run{attempt}"
        start = context.Manager().Barrier(2)
        with context.Pool(2) as pool:
            rows = pool.starmap(_rows_read_after_preparing, [(str(workdir), start)] * 2)
        assert rows == [3000, 3000]
