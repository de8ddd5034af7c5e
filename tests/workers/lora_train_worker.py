"""A real SAT ``training_main`` run with deepspeed on CPU: GPT-2 with a 4-bit base and QuantLoraMixin.

Run by tests/sat/test_training_lora.py as a plain process with the environment SAT/deepspeed read (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK). argv: OUT_DIR [extra SAT flags, e.g. --model-parallel-size 2
under torchrun --nproc_per_node 2, which also works, or --load CKPT]. Writes OUT_DIR/result.pt with the losses,
whether the quantized base stayed bitwise, the trained model's logits and where the checkpoint went.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

BATCH, SEQ, ITERS = 2, 16, 8


class FixedBatch:
    """The same two sequences over and over: the loss must go down on them."""

    def __init__(self, n: int) -> None:
        import torch
        gen = torch.Generator().manual_seed(0)
        self.samples = torch.randint(0, 1000, (BATCH, SEQ), generator=gen)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"input_ids": self.samples[i % BATCH]}


def main(out_dir: str, *extra: str) -> None:
    import torch
    from sat.model.official.gpt2_model import GPT2Model
    from sat.training.deepspeed_training import training_main

    import sat_quant
    from sat_quant.engine.layers import QuantLinear
    from sat_quant.sat.lora_mixin import QuantLoraMixin, add_lora_args
    from tests.conftest import SAT_MODELS

    ds_config = os.path.join(out_dir, "ds_config.json")
    # ZeRO 0 and torch's Adam (no fused CPU op to build); bf16, because with fp32 deepspeed hands SAT the bare
    # torch optimizer and SAT 0.4.12's save_checkpoint fails on `optimizer.optimizer`
    with open(ds_config, "w") as f:
        json.dump({"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
                   "zero_optimization": {"stage": 0}, "fp16": {"enabled": False}, "bf16": {"enabled": True},
                   "optimizer": {"type": "Adam", "params": {"lr": 0.1, "torch_adam": True, "weight_decay": 0.0}}},
                  f)
    arch = SAT_MODELS["gpt2"][1]
    argv = ["--mode", "finetune", "--quant", "4", "--lora_rank", "8", "--lora_alpha", "16",
            "--layer_range", "0", "1", "--lora_targets", "attention.query_key_value", "attention.dense",
            "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
            "--train-iters", str(ITERS), "--train-data", "fixed", "--split", "1", "--batch-size", str(BATCH),
            "--deepspeed_config", ds_config, "--zero-stage", "0", "--lr-decay-style", "constant",
            "--save", os.path.join(out_dir, "ckpt"), "--summary-dir", os.path.join(out_dir, "runs"),
            "--save-interval", str(ITERS), "--experiment-name", "qlora",
            "--log-interval", "1", "--num-workers", "0", "--seed", "1234",
            "--num-layers", str(arch["num_layers"]), "--hidden-size", str(arch["hidden_size"]),
            "--num-attention-heads", str(arch["num_attention_heads"]), "--vocab-size", str(arch["vocab_size"]),
            "--max-sequence-length", str(arch["max_sequence_length"]), "--hidden-dropout", "0",
            "--attention-dropout", "0"] + list(extra)
    parser = add_lora_args(GPT2Model.add_model_specific_args(argparse.ArgumentParser()))
    args = sat_quant.get_args(argv, parser=parser)
    assert args.deepspeed and args.device == "cpu", (args.deepspeed, args.device)

    model = sat_quant.get_model(args, GPT2Model)  # 4-bit base, random init
    model.add_mixin("lora", QuantLoraMixin.from_args(args), reinit=True)
    base_before = {n: {k: v.clone() for k, v in m.neutral_tensors().items()}
                   for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    losses = []

    def forward_step(data_iterator, model, args, timers):
        ids = next(data_iterator)["input_ids"]
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        mask = torch.ones(1, 1, ids.shape[1], ids.shape[1]).tril()
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask)[0]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))
        losses.append(loss.item())
        return loss, {}

    engine_model = training_main(args, model_cls=model, forward_step_function=forward_step,
                                 create_dataset_function=lambda path, args: FixedBatch(64))
    trained = engine_model.module if hasattr(engine_model, "module") else engine_model
    base_same = all(torch.equal(m.neutral_tensors()[k], v)
                    for n, m in trained.named_modules() if isinstance(m, QuantLinear)
                    for k, v in base_before[n].items())
    trained.eval()
    ids = FixedBatch(1).samples
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = trained(input_ids=ids, position_ids=pos, attention_mask=torch.ones(1, 1, SEQ, SEQ).tril())[0]
    trainable = sorted(n for n, p in trained.named_parameters() if p.requires_grad)
    if int(os.environ.get("RANK", "0")) == 0:
        base = {n: m.neutral_tensors() for n, m in trained.named_modules() if isinstance(m, QuantLinear)}
        torch.save({"losses": losses, "base_same": base_same, "logits": logits, "save": args.save,
                    "trainable": trainable, "input_ids": ids, "base": base}, os.path.join(out_dir, "result.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
