"""Runs `python -m gemma_ft <overrides>` and interrupts it at a chosen training step, as a crash would.

    python -m tests.helpers.interrupted_cli MODE STEP [overrides...]

MODE: sigkill-after-save  SIGKILL once checkpoint-STEP is completely written
      sigkill-during-save SIGKILL while checkpoint-STEP is being written (weights saved, trainer state not yet)
      sigint / sigterm    send that signal to itself at the end of step STEP
      sigterm-during-eval send SIGTERM to itself during the evaluation at step STEP (its first batch)
      sigterm-during-exact-match  send SIGTERM to itself while the trained model generates (STEP unused)
      disk-full-saving-adapter  the disk fills up while the finished run saves its adapter (STEP unused)
      disk-full-saving-checkpoint  the disk fills up while checkpoint-STEP saves its optimizer state, which torch
                          reports as a RuntimeError of its zip writer, not an OSError
      none                no interruption (for a resumed run of several CPU ranks, see cpu_ranks_load_on_cpu)
"""

from __future__ import annotations

import os
import signal
import sys

from gemma_ft.distributed import use_local_gpu

use_local_gpu()  # as gemma_ft does, before unsloth touches CUDA: else rank 1 opens a context on GPU 0
import unsloth  # noqa: F401, E402, I001

from transformers import Trainer, TrainerCallback

import gemma_ft.training as training


class Interrupt(TrainerCallback):
    def __init__(self, mode: str, step: int):
        self.mode, self.step = mode, step

    def on_save(self, args, state, control, **kwargs):
        if self.mode == "sigkill-after-save" and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode in ("sigint", "sigterm") and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT if self.mode == "sigint" else signal.SIGTERM)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.mode == "sigterm-during-eval" and state.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def cpu_ranks_load_on_cpu() -> None:
    """Several ranks on CPU processes only: transformers loads a resumed optimizer state with map_location=
    args.device, which is torch.device("cpu", 0) there, and torch cannot map to "cpu:0". On GPUs it is cuda:N."""
    import torch

    from gemma_ft.distributed import world_size

    if world_size() == 1 or torch.cuda.is_available():
        return
    load = torch.load

    def load_on_cpu(*args, map_location=None, **kwargs):
        if isinstance(map_location, torch.device) and map_location.type == "cpu":
            map_location = "cpu"
        return load(*args, map_location=map_location, **kwargs)

    torch.load = load_on_cpu


def main() -> None:
    mode, step, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    build_trainer = training.build_trainer

    def build_with_interrupt(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(Interrupt(mode, step))  # after gemma_ft's callbacks: the marker is written first
        return trainer

    training.build_trainer = build_with_interrupt
    cpu_ranks_load_on_cpu()
    if mode == "sigkill-during-save":
        save_rng_state = Trainer._save_rng_state

        def killed_mid_save(self, output_dir):
            if self.state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return save_rng_state(self, output_dir)

        Trainer._save_rng_state = killed_mid_save
    if mode == "disk-full-saving-adapter":
        import errno

        from peft import PeftModel

        save_pretrained = PeftModel.save_pretrained

        def fills_the_disk(self, save_directory, *args, **kwargs):
            if "checkpoint-" in os.path.basename(save_directory):
                return save_pretrained(self, save_directory, *args, **kwargs)
            os.makedirs(save_directory, exist_ok=True)
            with open(os.path.join(save_directory, "adapter_model.safetensors"), "wb") as partial:
                partial.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device")

        PeftModel.save_pretrained = fills_the_disk
    if mode == "sigterm-during-exact-match":
        import gemma_ft.replies as replies

        generate_replies = replies.generate_replies

        def signalled(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return generate_replies(*args, **kwargs)

        replies.generate_replies = signalled
    if mode == "disk-full-saving-checkpoint":
        save_optimizer = Trainer._save_optimizer_and_scheduler

        def fills_the_disk_in_torch_save(self, output_dir):
            if self.state.global_step == step:
                with open(os.path.join(output_dir, "optimizer.pt"), "wb") as partial:
                    partial.write(b"\0" * 1024)
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 2048: "
                                   "PytorchStreamWriter failed writing file data/0: file write failed")
            return save_optimizer(self, output_dir)

        Trainer._save_optimizer_and_scheduler = fills_the_disk_in_torch_save

    from gemma_ft.__main__ import cli

    sys.argv = ["gemma_ft", *overrides]
    cli()


if __name__ == "__main__":
    main()
