"""SAT training arguments on a machine without CUDA (deepspeed on CPU).

SAT 0.4.12's ``get_args`` refuses every training mode without a GPU: it sets ``args.device = 'cpu'`` and then
raises because ``LOCAL_RANK`` (an int) differs from it. deepspeed itself trains on CPU (gloo, ZeRO stage 0,
``"torch_adam": true``), so ``sat_quant.get_args`` parses the flags as SAT does for inference and then applies
SAT's own training setup: the deepspeed config (same rules as SAT: an explicit ``--deepspeed_config`` file
wins over the flags), ``deepspeed.init_distributed`` and deepspeed's checkpointing configuration.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List

from ..errors import QuantConfigError

TRAINING_MODES = ("pretrain", "finetune")


def requested_mode(argv: List[str]) -> str:
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--mode", default="pretrain")
    return early.parse_known_args(argv)[0].mode


def cpu_training_argv(argv: List[str]) -> List[str]:
    """``argv`` with ``--mode inference`` so SAT's parser accepts it on CPU; ``finish_cpu_training_args``
    restores the real mode afterwards."""
    return list(argv) + ["--mode", "inference"]


def finish_cpu_training_args(args: argparse.Namespace, mode: str) -> argparse.Namespace:
    """Apply to CPU-parsed ``args`` what SAT's ``get_args`` does for a training ``mode`` (deepspeed config and init)."""
    if getattr(args, "zero_stage", 0) > 0:
        raise QuantConfigError(f"--zero-stage {args.zero_stage} needs a GPU (ZeRO shards fp16 optimizer states); "
                               f"on CPU train with --zero-stage 0 and fp32 or bf16.")
    args.mode, args.deepspeed = mode, True
    args.no_save_rng = True  # SAT saves torch.cuda.get_rng_state() with each checkpoint, which raises without CUDA
    args.deepspeed_activation_checkpointing = bool(getattr(args, "checkpoint_activations", False))
    if args.deepspeed_config is None:  # SAT's default: its zero-0 template, filled from the flags
        import sat
        path = os.path.join(os.path.dirname(sat.__file__), "training", "deepspeed_zero0.json")
        with open(path) as f:
            config = json.load(f)
        config["fp16"]["enabled"] = bool(args.fp16)
        config["bf16"] = {"enabled": bool(args.bf16)}
        config["train_micro_batch_size_per_gpu"] = args.batch_size
        config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        config["optimizer"]["params"].update(lr=args.lr, weight_decay=args.weight_decay, torch_adam=True)
    else:  # the file wins, as in SAT
        try:
            with open(args.deepspeed_config) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise QuantConfigError(f"--deepspeed_config {args.deepspeed_config}: cannot read it as JSON ({exc}).") from None
        args.fp16 = bool(config.get("fp16", {}).get("enabled", False))
        args.bf16 = bool(config.get("bf16", {}).get("enabled", False))
        args.batch_size = config.get("train_micro_batch_size_per_gpu", args.batch_size)
        args.gradient_accumulation_steps = config.get("gradient_accumulation_steps")
        params = config.get("optimizer", {}).get("params", {})
        args.lr = params.get("lr", args.lr)
        args.weight_decay = params.get("weight_decay", args.weight_decay)
    if args.fp16:
        raise QuantConfigError("fp16 training needs a GPU (deepspeed's loss scaler); on CPU enable bf16 in the "
                               "deepspeed config (\"bf16\": {\"enabled\": true}).")
    if not args.bf16 and getattr(args, "save", None):
        # fp32 with ZeRO 0 hands SAT torch's own optimizer, and SAT 0.4.12's save_checkpoint then fails on
        # `optimizer.optimizer` after the whole run: say so before training starts
        raise QuantConfigError("SAT 0.4.12 cannot save an fp32 ZeRO-0 deepspeed run (its save_checkpoint reads "
                               "optimizer.optimizer, which only deepspeed's bf16/fp16 wrappers have); pass --bf16 "
                               "(with a --deepspeed_config file: \"bf16\": {\"enabled\": true}), or train without --save.")
    args.deepspeed_config = config
    import deepspeed
    import torch
    from sat import mpu
    port = getattr(args, "master_port", None) or os.getenv("MASTER_PORT", "6000")
    init_method = f"tcp://{os.getenv('MASTER_ADDR', 'localhost')}:{port}"
    deepspeed.init_distributed(dist_backend=args.distributed_backend, world_size=args.world_size, rank=args.rank,
                               init_method=init_method)
    assert torch.distributed.is_initialized()
    deepspeed.checkpointing.configure(mpu, deepspeed_config=config, num_checkpoints=args.num_layers)
    install_cpu_timers()
    return args


def install_cpu_timers() -> None:
    """SAT's training-loop timers call ``torch.cuda.synchronize()`` unconditionally, which raises without a
    GPU; on a machine without CUDA they time with the wall clock alone (nothing to synchronize)."""
    import time

    import torch
    from sat.training.utils import Timers
    if torch.cuda.is_available() or getattr(Timers.Timer, "_sat_quant_cpu", False):
        return

    def start(self):
        assert not self.started_, "timer has already been started"
        self.start_time, self.started_ = time.time(), True

    def stop(self):
        assert self.started_, "timer is not started"
        self.elapsed_ += time.time() - self.start_time
        self.started_ = False

    Timers.Timer.start, Timers.Timer.stop, Timers.Timer._sat_quant_cpu = start, stop, True


__all__ = ["requested_mode", "cpu_training_argv", "finish_cpu_training_args", "install_cpu_timers", "TRAINING_MODES"]
