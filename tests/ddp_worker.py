"""Run by torchrun in test_distill: a tiny distillation on 2 CPU ranks (gloo); each rank dumps its state."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from wid.distill import DistillArguments, run_distillation
from distill_fixtures import distill_argv


class DumpState(TrainerCallback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = dist.get_rank()
        self.out.mkdir(parents=True, exist_ok=True)
        dump = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save({"world_size": dist.get_world_size(), "mask_updates": int(model.wid_state.mask_updates),
                    "state": dump}, self.out / f"rank{rank}.pt")


if __name__ == "__main__":
    teacher, corpus, out = sys.argv[1:4]
    argv = distill_argv(teacher, corpus, Path(out) / "run", "--ddp_backend", "gloo", "--use_cpu", "true",
                        "--head_warmup_steps", "3", "--ddp_find_unused_parameters", "false")
    args, training_args = HfArgumentParser((DistillArguments, TrainingArguments)).parse_args_into_dataclasses(args=argv)
    run_distillation(args, training_args, callbacks=[DumpState(Path(out))])
