"""Training throughput of gemma_ft against a plain unsloth script and plain transformers + peft + TRL.

One case per process (run_all.sh runs them back to back on the same GPU):

    python benchmarks/throughput.py --case CASE --arch {270m,1b,4b} --workdir /tmp/bench \
        --tokenizer TOKENIZER_DIR --out results.jsonl

Cases (CASES below): `gemma_ft` (the full pipeline, CSV -> masking -> trainer, at the plain scripts' batch
settings), `gemma_ft_defaults` (the pipeline with its shipped defaults), `unsloth` (a plain unsloth script at
the same batch settings), `unsloth_notebook` (the seed notebook's batch 2 x 4 accumulation and adamw_8bit) and
`hf` (plain transformers + peft + TRL). Models are randomly initialised Gemma 3 text architectures (throughput
does not depend on weight values) with the real Gemma 3 tokenizer; data are synthetic conversations with a
log-normal spread of lengths, split into the same training rows for every case. Every case uses LoRA r=16 on
all 7 projections, seed 3407 and padded batches (unsloth's automatic padding-free batches did not finish a
first step within 200 s on this stack; see README "Performance"). Reported: trained (non-padding) tokens/s and s/step after warm-up steps, peak
GPU memory, time from process start to the end of the first step, and MFU against the measured bf16 peak.
FLOPs per token and the bf16 peak are gemma_ft's own (gemma_ft.speed): 4 * N_params plus attention over the mean row.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import time
from pathlib import Path

PROCESS_START = time.perf_counter()

ARCHS = {  # Gemma 3 text configs (google/gemma-3-*), vocabulary 262144
    "270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, sliding_window=512),
    "1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
               num_key_value_heads=1, head_dim=256, sliding_window=512),
    "4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, sliding_window=1024),
}
WORDS = ("the a of to and in is for on with as by at from that this it be are was move piece board square king "
         "queen rook bishop knight pawn check mate castle rank file game white black open attack defend position "
         "opening endgame tactic plan centre space tempo trade value").split()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_data(path: Path, rows: int = 3000, seed: int = 0) -> None:
    """Conversations whose prompt and reply lengths follow log-normal distributions (median ~180 / ~120 words)."""
    rng = random.Random(seed)

    def text(median: float) -> str:
        n = max(3, min(900, int(rng.lognormvariate(math.log(median), 0.8))))
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "expected_output"])
        for _ in range(rows):
            writer.writerow([text(180), text(120)])


def make_model(arch: str, tokenizer_dir: Path, target: Path) -> None:
    import shutil

    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    if target.exists():  # written under another name and renamed: complete
        return
    layers = ARCHS[arch]["num_hidden_layers"]
    config = Gemma3TextConfig(vocab_size=262144, max_position_embeddings=32768, rope_theta=1_000_000.0,
                              query_pre_attn_scalar=256, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                              bos_token_id=2,
                              layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                           for i in range(layers)], **ARCHS[arch])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    model.save_pretrained(partial)
    for item in tokenizer_dir.iterdir():
        if item.is_file() and item.name != ".complete":
            shutil.copy2(item, partial / item.name)
    partial.rename(target)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def trained_steps(args) -> int:
    """The timed steps (with their warm-up) and the profiled ones after them; -1: one whole epoch."""
    return -1 if args.epoch else args.steps + args.profile_steps


def case_settings(args) -> tuple:
    """(per-device batch, accumulation, optimizer, sampling) of the case; --batch and --sampling override theirs."""
    batch, accumulation, optim, sampling = CASES[args.case]
    return (args.batch or batch, accumulation, optim, args.sampling or sampling)


def ddp_boolean_options() -> list[str]:
    """DistributedDataParallel's on/off options, as accelerate passes them on."""
    from dataclasses import fields

    from accelerate.utils import DistributedDataParallelKwargs

    return sorted(field.name for field in fields(DistributedDataParallelKwargs) if field.type in (bool, "bool"))


def ddp_settings(handler) -> dict[str, bool]:
    """What DDP was given (accelerate's defaults where the Trainer set nothing), for the result line."""
    from accelerate.utils import DistributedDataParallelKwargs

    handler = handler or DistributedDataParallelKwargs()
    return {option: getattr(handler, option) for option in ddp_boolean_options()}


def parse_ddp_options(pairs: list[str]) -> dict[str, bool]:
    """["static_graph=true", ...] -> {"static_graph": True, ...}: DistributedDataParallel's boolean options."""
    known = ddp_boolean_options()
    options = {}
    for pair in pairs:
        option, _, value = pair.partition("=")
        if option not in known or value.lower() not in ("true", "false"):
            raise SystemExit(f"--ddp {pair}: expected OPTION=true|false with OPTION one of {known}")
        options[option] = value.lower() == "true"
    return options


def pinned_host_alloc_totals() -> tuple[int, float]:
    """Pinned host blocks CUDA has allocated so far in this process, and the seconds those allocations took."""
    import torch

    stats = torch.cuda.memory.host_memory_stats() if torch.cuda.is_available() else {}
    return int(stats.get("num_host_alloc", 0)), stats.get("host_alloc_time.total", 0) / 1e6  # microseconds


class Meter:
    """Per-step time and non-padding tokens, from a wrapped training_step, and the timed window's wall time.

    timing="step" synchronises the GPU around every step (exact per-step times, for paired_steps.py); "window" only
    at the timed window's two ends. A per-step synchronisation is a meeting of the ranks under DDP that a real run
    does not have: every rank's host waits for both GPUs to finish the step. Per-step times are then the host's.
    """

    def __init__(self, timed: slice, timing: str = "step", profile_steps: int = 0, profile_out: Path | None = None,
                 pinned_totals=pinned_host_alloc_totals):
        """Profile profile_steps steps after the timed ones (into profile_out); 0 steps: no profile.

        The profiler stops at the end of the last profiled step, before the Trainer saves its final checkpoint (in
        one profile (2026-11-27) its 756 copies to the host made up most of what the profile called waits).
        """
        self.timed, self.timing = timed, timing
        self.profile_steps, self.profile_out = profile_steps, profile_out
        self._profiler, self._profiling = None, False
        self.tokens: list = []  # per step: an int, or a tensor on the GPU until tokens_counted() (window timing)
        self.padded_lengths: list[int] = []  # the batch's padded row length: each new length is a new shape
        # per step, the sum of the batch's token ids: which rows each rank trained on, comparable across runs
        # (an int, or a tensor on the GPU until token_id_sums_counted(), as the tokens)
        self.token_id_sums: list = []
        # per step: pinned host blocks CUDA allocated and the seconds spent allocating them. Two-GPU runs (2026-11-27) saw a
        # one-time wait of ~3 s at the first record-length batch; unsloth's offloaded checkpointing grows its pinned
        # buffers then (one cudaHostAlloc per layer), which these show or rule out.
        self.pinned_allocs: list[tuple[int, float]] = []
        self._pinned_totals = pinned_totals
        self._pinned_before = (0, 0.0)
        self.times: list[float] = []
        self.window_s: float | None = None  # wall time of the timed steps, GPU synchronised at both ends
        self.losses: list[float] = []
        self.first_step_end: float | None = None
        self.loss_path: dict | None = None
        self._pending = self._padded_length = self._token_id_sum = 0
        self._last = self._window_start = None

    @property
    def profile_after(self) -> int:
        return self.timed.stop  # the profiled steps follow the timed ones

    def _synchronize_here(self, step: int) -> bool:
        """Synchronise before step `step` (0-based) begins or after it ends: every step, or at the window's ends."""
        return self.timing == "step" or step in (self.timed.start, self.timed.stop) or (
            self.profile_steps and step == self.profile_after + self.profile_steps)

    def tokens_counted(self) -> list[int]:
        return [int(t) for t in self.tokens]

    def token_id_sums_counted(self) -> list[int]:
        return [int(t) for t in self.token_id_sums]

    def wrap(self, trainer) -> None:
        from transformers import TrainerCallback

        step = trainer.training_step
        meter = self

        pad = trainer.processing_class.pad_token_id

        def counted(model, inputs, *args, **kwargs):
            # Real tokens only: a padded batch's attention mask, or a packed bin's tokens that are not its filler.
            mask = inputs.get("attention_mask")
            count = mask.sum() if mask is not None else (inputs["input_ids"] != pad).sum()
            meter._pending += int(count) if meter.timing == "step" else count  # int() waits for the GPU
            meter._padded_length = inputs["input_ids"].shape[-1]
            meter._token_id_sum = inputs["input_ids"].sum()  # stays on the GPU: no wait
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = counted

        def record_loss_path(module, args, kwargs, output):
            # How the trainer's first training forward was called and what it returned: whether the loss went
            # through a fused LM head (no [tokens, vocabulary] logits) or the logits were materialised.
            import torch

            logits = getattr(output, "logits", None)  # unsloth's fused loss returns a placeholder, not a tensor
            meter.loss_path = {"fused_lm_head_kwarg": bool(kwargs.get("fused_lm_head")),
                               "output": type(output).__name__, "logits": type(logits).__name__,
                               "logits_shape": list(logits.shape) if isinstance(logits, torch.Tensor) else None}
            print(f"[bench] loss path: {meter.loss_path}", flush=True)
            handle.remove()

        if hasattr(trainer, "model"):  # a real trainer (tests pass a stand-in)
            handle = trainer.model.register_forward_hook(record_loss_path, with_kwargs=True)

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if meter.timed.stop is None:  # a whole epoch: the window ends with its last step
                    meter.timed = slice(meter.timed.start, state.max_steps)

            def on_step_begin(self, args, state, control, **kw):
                done = len(meter.times)
                if meter.profile_steps and done == meter.profile_after:
                    meter.start_profiler()
                if meter._synchronize_here(done):
                    synchronize()
                meter._pinned_before = meter._pinned_totals()
                meter._last = time.perf_counter()
                if done == meter.timed.start:
                    meter._window_start = meter._last

            def on_step_end(self, args, state, control, **kw):
                done = len(meter.times) + 1
                if meter._synchronize_here(done) or meter.first_step_end is None:
                    synchronize()
                now = time.perf_counter()
                meter.times.append(now - meter._last)
                meter.tokens.append(meter._pending)
                meter.padded_lengths.append(meter._padded_length)
                meter.token_id_sums.append(meter._token_id_sum)
                (blocks, alloc_s), (blocks_before, alloc_s_before) = meter._pinned_totals(), meter._pinned_before
                new_blocks, new_alloc_s = blocks - blocks_before, alloc_s - alloc_s_before
                meter.pinned_allocs.append((new_blocks, new_alloc_s))
                tokens = f", {meter._pending} tokens" if meter.timing == "step" else " (host)"
                pinned = f", {new_blocks} pinned host blocks allocated in {new_alloc_s:.3f} s" if new_blocks else ""
                print(f"[bench] step {done}: {meter.times[-1]:.3f} s{tokens}, padded to {meter._padded_length}{pinned}",
                      flush=True)
                meter._pending = 0
                if meter.first_step_end is None:
                    meter.first_step_end = now - PROCESS_START
                if done == meter.timed.stop:
                    meter.window_s = now - meter._window_start
                if done == meter.profile_after + meter.profile_steps:
                    meter.stop_profiler()  # what follows the last profiled step (the final checkpoint) is not a step

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    meter.losses.append(float(logs["loss"]))

        trainer.add_callback(Timer())

    def start_profiler(self) -> None:
        from torch._C._profiler import _ExperimentalConfig
        from torch.profiler import ProfilerActivity, profile

        # verbose: without it torch 2.14 records no Python stacks for the ops (their `stack` stays empty)
        self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True,
                                 experimental_config=_ExperimentalConfig(verbose=True))
        self._profiler.__enter__()
        self._profiling = True

    def stop_profiler(self) -> None:
        if self._profiling:
            self._profiler.__exit__(None, None, None)
            self._profiling = False

    def write_profile(self) -> None:
        """Where the profiled steps spent host and GPU time: is a step waiting on Python, kernels or collectives?"""
        if self._profiler is None:
            return
        self.stop_profiler()  # still running if training ended before the last profiled step
        profiled = self.times[self.profile_after:self.profile_after + self.profile_steps]
        steps, wall = len(profiled), sum(profiled)
        from torch.autograd import DeviceType

        events = self._profiler.key_averages()
        # GPU kernels only, as the table's "Self CUDA time total": not the host ops' share of them again, nor
        # annotated ranges such as DistributedDataParallel.forward. NCCL kernels count while they wait for a peer.
        gpu_s = sum(e.self_device_time_total for e in events
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
        with open(self.profile_out, "w") as handle:
            handle.write(f"{steps} profiled steps, {wall:.3f} s wall, GPU kernels {gpu_s:.3f} s "
                         f"({gpu_s / wall:.0%} of the wall time)\n\n")
            handle.write(events.table(sort_by="self_device_time_total", row_limit=35, max_name_column_width=70))
            handle.write("\n\n")
            handle.write(events.table(sort_by="self_cpu_time_total", row_limit=35, max_name_column_width=70))
            handle.write("\n\nWhere the host may wait for the GPU (Python call sites, most frequent first):\n")
            by_stack = self._profiler.key_averages(group_by_stack_n=6)
            waits = [e for e in by_stack if e.key in HOST_WAITS and e.stack]
            for event in sorted(waits, key=lambda e: -e.count)[:12]:
                handle.write(f"\n{event.count} x {event.key}\n" + "".join(f"    {frame}\n" for frame in event.stack))


# Where the host may wait for the GPU: a value copied to the host (.item(), bool(tensor)), and the CUDA calls that
# copy or synchronise (aten::_to_copy is left out: it is mostly dtype casts on the device).
HOST_WAITS = ("aten::_local_scalar_dense", "aten::is_nonzero", "cudaStreamSynchronize", "cudaMemcpyAsync")
# case -> (per-device batch, gradient accumulation, optimizer, sampling); None: gemma_ft's shipped default.
CASES = {
    "gemma_ft": (8, 1, "adamw_torch", "random"),
    "gemma_ft_defaults": (None, None, None, None),
    # The strongest setting unsloth documents for many short rows: SFTConfig(packing=True) (padding-free bins of
    # batch x max_length tokens: 8 x 2048 = 16,384, gemma_ft's step), with its notebook's offloaded checkpointing.
    "unsloth_packing": (8, 1, "adamw_torch", "random"),
    # unsloth with nothing set: it turns padding-free batches on by itself.
    "unsloth_default": (8, 1, "adamw_torch", "random"),
    # A weak extra, kept for continuity with earlier tables: padded batches of 8 rows (padding_free=False).
    "unsloth": (8, 1, "adamw_torch", "random"),
    "unsloth_notebook": (2, 4, "adamw_8bit", "random"),
    # Plain TRL as its docs advise for throughput: packing=True (BFD, padding-free), Liger kernels when they import.
    "trl_packing": (8, 1, "adamw_torch", "random"),
    "hf": (8, 1, "adamw_torch", "random"),
}
VAL_ROWS = 16


def sft_config(args, out: Path, **extra):
    from trl import SFTConfig

    batch, accumulation, optim, sampling = case_settings(args)
    return SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                     train_sampling_strategy=sampling,
                     max_steps=trained_steps(args), num_train_epochs=1, learning_rate=2e-4, weight_decay=0.001, warmup_steps=5,
                     lr_scheduler_type="linear", optim=optim, logging_steps=args.logging_steps, save_strategy="no",
                     report_to=[], seed=3407, data_seed=3407, max_length=args.max_len, bf16=True,
                     dataset_num_proc=1, **extra)


def gemma_ft_config(args, data: Path, model_dir: Path):
    from hydra import compose, initialize_config_dir

    from gemma_ft.cli_checks import CONF_DIR
    from gemma_ft.config import register_configs, to_typed

    batch, accumulation, optim, sampling = case_settings(args)
    overrides = [f"model.name_or_path={model_dir}", f"data.path={data}", "data.columns.system=null",
                 f"data.val_size={VAL_ROWS}", "lora.train_lm_head=false", f"train.max_steps={trained_steps(args)}",
                 f"train.max_seq_length={args.max_len}", "train.eval_steps=0", "train.exact_match_rows=0",
                 "train.report_to=none", "train.save_steps=100000", f"train.logging_steps={args.logging_steps}",
                 "optim.warmup_steps=5"]
    settings = {"train.per_device_train_batch_size": batch, "train.gradient_accumulation_steps": accumulation,
                "optim.name": optim, "train.sampling": sampling}
    overrides += [f"{key}={value}" for key, value in settings.items() if value is not None]  # None: the default
    overrides += args.set
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_typed(compose("config", overrides=overrides))


def training_rows(args, data: Path, model_dir: Path) -> list:
    """The rows gemma_ft trains on (its seeded hold-out removed), so that every case sees the same data."""
    from gemma_ft.data.conversations import load_conversations, split_conversations

    cfg = gemma_ft_config(args, data, model_dir)
    return split_conversations(load_conversations(cfg.data), cfg.data.val_size, cfg.data.split_seed).train


def case_gemma_ft(args, data: Path, model_dir: Path):
    from gemma_ft.pipeline import prepare

    cfg = gemma_ft_config(args, data, model_dir)
    return prepare(cfg, run_dir=Path(args.workdir) / f"run_{args.case}_{args.arch}_{os.getpid()}")


def rows_attend_only_to_themselves(prepared) -> float:
    """Packed path on this machine's model and kernels: change tokens in the second of four rows packed in one bin,
    return the largest change of any later row's logits (0.0 when no row sees another)."""
    import torch

    rows, model = prepared.train_rows, prepared.model
    features = [{"input_ids": list(rows.input_ids[i]), "labels": rows.labels[i],
                 "seq_lengths": [len(rows.input_ids[i])]} for i in range(4)]

    def logits(features):
        bin_ = {key: sum((f[key] for f in features), []) for key in ("input_ids", "labels", "seq_lengths")}
        batch = prepared.trainer.data_collator([bin_])
        batch = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            return model(**batch).logits[0].float()

    before = logits(features)
    features[1]["input_ids"][5:9] = [1000, 2000, 3000, 4000]
    after = logits(features)
    second_end = sum(len(rows.input_ids[i]) for i in range(2))
    own = (before[:second_end] - after[:second_end]).abs().max().item()
    print(f"[bench] isolation: own row changed by {own:.3g}", flush=True)
    return (before[second_end:] - after[second_end:]).abs().max().item()


def case_unsloth(args, data: Path, model_dir: Path):
    """unsloth's Gemma 3 notebook as a user writes it; the case picks the batching (see CASES)."""
    from unsloth import FastModel
    from unsloth.chat_templates import get_chat_template, train_on_responses_only

    from datasets import Dataset
    from trl import SFTTrainer

    model, tokenizer = FastModel.from_pretrained(str(model_dir), max_seq_length=args.max_len, load_in_4bit=False)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                     use_gradient_checkpointing="unsloth", random_state=3407)
    tokenizer = get_chat_template(tokenizer, chat_template="gemma-3")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": row.user},
                                            {"role": "assistant", "content": row.assistant}],
                                           tokenize=False).removeprefix("<bos>")
             for row in training_rows(args, data, model_dir)]
    batching = {"unsloth_packing": dict(packing=True), "unsloth_default": {}}.get(args.case, dict(padding_free=False))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": texts}),
                         args=sft_config(args, Path(args.workdir) / args.case, dataset_text_field="text", **batching))
    return train_on_responses_only(trainer, instruction_part="<start_of_turn>user\n",
                                   response_part="<start_of_turn>model\n")


def case_trl_packing(args, data: Path, model_dir: Path):
    """Plain TRL + PEFT with packing=True (BFD bins, padding-free: transformers keeps each row to itself from the
    restarting position_ids), completion-only loss, TRL's default checkpointing, Liger kernels if they import."""
    import importlib.util

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map="cuda",
                                                 attn_implementation="sdpa")
    examples = training_rows(args, data, model_dir)
    prompt = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
    dataset = Dataset.from_dict({"prompt": [prompt.format(r.user) for r in examples],
                                 "completion": [r.assistant + "<end_of_turn>\n" for r in examples]})
    liger = importlib.util.find_spec("liger_kernel") is not None
    print(f"[bench] trl_packing: liger kernels {'on' if liger else 'not installed'}", flush=True)
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                      peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"),
                      args=sft_config(args, Path(args.workdir) / args.case, packing=True, completion_only_loss=True,
                                      use_liger_kernel=liger))


def case_hf(args, data: Path, model_dir: Path):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map="cuda",
                                                 attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    examples = training_rows(args, data, model_dir)
    prompt = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
    dataset = Dataset.from_dict({"prompt": [prompt.format(r.user) for r in examples],
                                 "completion": [r.assistant + "<end_of_turn>\n" for r in examples]})
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                      args=sft_config(args, Path(args.workdir) / "hf", completion_only_loss=True))


def prepare_inputs(args) -> tuple[Path, Path]:
    """The CSV in --workdir and the model (--model-dir, or a random --arch one built there once).

    Under torchrun every rank calls this at once: one writes while the others wait for the lock, and each is
    written under another name and renamed into place. Before, a rank could read the CSV while another was still
    writing it: in two runs (2026-11-27) one rank of two two-GPU runs trained on 1,393 and 1,989 of the 3,000 rows.
    """
    from filelock import FileLock

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.csv"
    model_dir = Path(args.model_dir) if args.model_dir else work / f"gemma3-{args.arch}-random"
    with FileLock(str(work / ".prepare.lock")):
        if not data.exists():
            partial = work / ".data.csv.partial"
            make_data(partial)
            partial.replace(data)
        if not args.model_dir:
            make_model(args.arch, Path(args.tokenizer), model_dir)
    return data, model_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=list(CASES), help="required unless --prepare-only")
    parser.add_argument("--prepare-only", action="store_true", help="write the data and the random model, then stop")
    parser.add_argument("--arch", default="270m", choices=list(ARCHS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=None, help="per-device batch instead of the case's")
    parser.add_argument("--sampling", choices=["random", "group_by_length"], default=None,
                        help="batch order instead of the case's (gemma_ft's default groups rows by length)")
    parser.add_argument("--timing", choices=["step", "window"], default="step",
                        help="step: GPU synchronised around every step (per-step times, for paired_steps.py); window: "
                             "only around the timed steps, as a run without a benchmark (tokens/s of several GPUs)")
    parser.add_argument("--logging-steps", type=int, default=1,
                        help="log the loss every N steps (1: the whole loss curve; gemma_ft's default is 5)")
    parser.add_argument("--epoch", action="store_true", help="train one whole epoch and time every step after "
                        "--warmup (instead of --steps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a gemma_ft config override for the gemma_ft cases, e.g. train.batching=padded")
    parser.add_argument("--check-isolation", action="store_true",
                        help="packed gemma_ft cases: check on this machine that no packed row attends to another")
    parser.add_argument("--isolation-only", action="store_true",
                        help="gemma_ft cases with packed batches: only check that no packed row attends to another")
    parser.add_argument("--model-dir", default=None, help="this model folder instead of a random --arch one")
    parser.add_argument("--workdir", default="/tmp/bench")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="run torch.profiler over this many extra steps after the timed ones; tables to --profile-out")
    parser.add_argument("--profile-out", help="the profile tables' file (each rank adds _rankN)")
    parser.add_argument("--rank-local-metrics", action="store_true",
                        help="under torchrun: TRL's per-step metrics are not gathered from the ranks (an experiment: "
                             "what that per-step meeting of the ranks costs; the logged metrics are rank 0's)")
    parser.add_argument("--ddp", action="append", default=[], metavar="OPTION=true|false",
                        help="under torchrun: a DistributedDataParallel option set on top of the Trainer's, e.g. "
                             "find_unused_parameters=true (the Trainer's default for PEFT), static_graph=true, "
                             "gradient_as_bucket_view=true; repeatable")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="[%(name)s|%(levelname)s] %(message)s")  # gemma_ft's stage lines
    if args.prepare_only:
        prepare_inputs(args)
        return
    if not (args.case and args.out):
        parser.error("--case and --out are required (or --prepare-only)")
    ddp_options = parse_ddp_options(args.ddp)  # a mistyped option fails now, not after the model has loaded
    if os.environ.get("BENCH_STACK_DUMP_S"):  # diagnosing a slow step: every thread's Python stack, periodically
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["BENCH_STACK_DUMP_S"]), repeat=True)

    from gemma_ft.distributed import gather_from_ranks, is_main_process, use_local_gpu, world_size
    from gemma_ft.models.builtin import cache_dir

    use_local_gpu()  # as gemma_ft does: each rank on its own GPU before any CUDA call
    compile_cache = cache_dir() / "compile"  # every case shares it: the first case of an arch compiles
    compile_cache_was_warm = compile_cache.is_dir() and any(compile_cache.rglob("*.*"))
    if args.case not in ("hf", "trl_packing"):
        from gemma_ft.compile_cache import import_unsloth_with_persistent_compile_cache

        import_unsloth_with_persistent_compile_cache()  # as gemma_ft and every unsloth script: before transformers
    import torch

    data, model_dir = prepare_inputs(args)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prepared = None
    if args.case.startswith("gemma_ft"):
        prepared = case_gemma_ft(args, data, model_dir)
        trainer = prepared.trainer
    elif args.case.startswith("unsloth"):
        trainer = case_unsloth(args, data, model_dir)
    elif args.case == "trl_packing":
        trainer = case_trl_packing(args, data, model_dir)
    else:
        trainer = case_hf(args, data, model_dir)
    if args.isolation_only:  # no training: the packed rows' isolation on this machine's kernels, then stop
        change = rows_attend_only_to_themselves(prepared)
        print(f"[bench] isolation: later rows' logits changed by at most {change:.3g}", flush=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps({"case": args.case, "arch": args.arch, "overrides": args.set,
                                     "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
                                     "cross_row_logit_change": change}) + "\n")
        return
    if args.rank_local_metrics:
        # TRL gathers its logged metrics (entropy, token accuracy, token count) from every rank after each forward pass
        # and reads them on the host: a meeting of the ranks at every step. Left on each rank, the host waits for its
        # own GPU only (as with one GPU); the logged metrics are then rank 0's. For measuring that meeting only.
        trainer.accelerator.gather_for_metrics = lambda tensor, *args, **kwargs: tensor
    if ddp_options:
        from accelerate.utils import DistributedDataParallelKwargs

        handler = trainer.accelerator.ddp_handler or DistributedDataParallelKwargs()
        for option, value in ddp_options.items():
            setattr(handler, option, value)
        trainer.accelerator.ddp_handler = handler
    profile_out = None
    if args.profile_steps:
        profile_out = Path(args.profile_out or "profile.txt")
        profile_out = profile_out.with_name(f"{profile_out.stem}_rank{os.environ.get('RANK', '0')}{profile_out.suffix}")
    timed = slice(args.warmup, None if args.epoch else args.steps)
    meter = Meter(timed, args.timing, args.profile_steps, profile_out)
    meter.wrap(trainer)
    trainer.train()
    meter.write_profile()
    eval_loss = None
    if prepared is not None:  # batching-independent: row by row over the held-out rows
        from gemma_ft.evaluate import masked_loss

        eval_loss = masked_loss(prepared.model, prepared.tokenizer, prepared.split.validation, args.max_len)
    timed = meter.timed
    isolation = None  # after the timed epoch: its forward passes without gradients compile once more
    if prepared is not None and prepared.batch_plan.packed and args.check_isolation:
        isolation = rows_attend_only_to_themselves(prepared)
        print(f"[bench] isolation: later rows' logits changed by at most {isolation:.3g}", flush=True)

    if len(meter.times) <= args.warmup:
        raise SystemExit(f"only {len(meter.times)} steps ran; need more than --warmup {args.warmup}")
    step_tokens = meter.tokens_counted()
    # window: the timed steps' wall time, including the Trainer's work between steps, which per-step times leave out
    seconds = meter.window_s if args.timing == "window" else sum(meter.times[timed])
    tokens = sum(step_tokens[timed])
    gpus = world_size()
    # Every rank's batches: runs on the same rows have the same ones (in two runs of 2026-11-27 a rank that had read part
    # of the CSV, see prepare_inputs, trained on other batches, seen only in its banner's row count).
    batches_by_rank = gather_from_ranks(
        {"padded_lengths": meter.padded_lengths, "token_id_sums": meter.token_id_sums_counted(),
         "pinned_allocs": meter.pinned_allocs})
    # Every rank counted its own tokens; rank 0's clock times the steps (synchronised at the window's ends).
    tokens = sum(gather_from_ranks(tokens))
    if not is_main_process():
        return
    model = trainer.model
    n_params = sum(p.numel() for p in model.parameters())
    # the attention's context is a row, packed or not (TRL's packed datasets keep each bin's row lengths)
    if prepared is not None:
        lengths = [len(ids) for ids in prepared.train_rows.input_ids]
    elif "seq_lengths" in trainer.train_dataset.column_names:
        lengths = [n for bin_lengths in trainer.train_dataset["seq_lengths"] for n in bin_lengths]
    else:
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    mean_len = sum(lengths) / len(lengths)
    # MFU as gemma_ft reports it of itself (gemma_ft.speed): the same FLOP count against the same measured peak
    from gemma_ft.speed import flops_per_token, measure_matmul_flops

    peak = measure_matmul_flops() / 1e12 if cuda else float("nan")
    tokens_per_s = tokens / seconds
    result = {
        "case": args.case, "arch": args.arch, "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": gpus,
        "batch": trainer.args.per_device_train_batch_size, "grad_accum": trainer.args.gradient_accumulation_steps,
        "optim": str(trainer.args.optim), "sampling": str(trainer.args.train_sampling_strategy),
        "steps": args.steps, "warmup_steps": args.warmup, "tokens_per_s": tokens_per_s,
        "s_per_step": seconds / len(meter.times[timed]),
        "median_s_per_step": statistics.median(meter.times[timed]),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "time_to_first_step_s": meter.first_step_end, "params": n_params, "mean_tokens_per_row": mean_len,
        "bf16_peak_tflops": peak, "mfu": tokens_per_s * flops_per_token(model.config.get_text_config(), n_params, mean_len) / (peak * 1e12),
        "losses": meter.losses[:20], "eval_loss": eval_loss, "trained_steps": len(meter.times),
        "epoch": args.epoch, "overrides": args.set, "loss_path": meter.loss_path, "cross_row_logit_change": isolation,
        "batching": ("packed" if prepared.batch_plan.packed else "padded") if prepared is not None else "padded",
        "tokens_per_step": prepared.batch_plan.tokens_per_step if prepared is not None else None,
        "gradient_checkpointing": str(prepared.batch_plan.gradient_checkpointing) if prepared is not None else "unsloth",
        "distinct_step_shapes": len(set(meter.padded_lengths)), "compile_cache": str(compile_cache), "compile_cache_was_warm": compile_cache_was_warm,
        "compile_disabled": os.environ.get("UNSLOTH_COMPILE_DISABLE", "0") == "1",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "ddp": ddp_settings(trainer.accelerator.ddp_handler) if gpus > 1 else None,
        "rank_local_metrics": args.rank_local_metrics,
        "timing": args.timing, "logging_steps": trainer.args.logging_steps,
        "step_times_s": meter.times, "step_tokens_rank0": step_tokens,
        "step_padded_lengths_rank0": meter.padded_lengths,
        "step_padded_lengths_by_rank": [r["padded_lengths"] for r in batches_by_rank],
        "step_token_id_sums_by_rank": [r["token_id_sums"] for r in batches_by_rank],
        "step_pinned_host_allocs_by_rank": [r["pinned_allocs"] for r in batches_by_rank],  # (blocks, seconds)
    }
    if prepared is not None:  # what the product measured of itself (metrics.json's fields), beside the meter's
        from gemma_ft.pipeline import speed_metrics

        result["gemma_ft_metrics"] = speed_metrics(prepared)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    from gemma_ft.distributed import end_process_group

    try:
        main()
    finally:
        end_process_group()  # as `python -m gemma_ft` does: no NCCL "destroy_process_group() was not called" warning
