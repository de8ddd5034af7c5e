"""Run under ``torchrun --nproc_per_node 2`` by tests/io/test_parallel.py: LoRA on a 4-bit base at model-parallel size 2.

argv: LORA_DIR OUT_DIR. LORA_DIR is an mp=1 QLoRA checkpoint (adapters with non-zero B). Each rank loads its
partition (column layers: A whole, B split by rows; row layers: A split by columns, B whole), records the
logits, takes three Adam steps on a fixed batch, checks that the replicated adapter matrices stayed identical on
both ranks, saves mp=2 shards, then merges the adapters per rank (re-quantized) and records those logits.
"""
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(lora_dir: str, out_dir: str) -> None:
    import torch

    import sat_quant
    from sat_quant.engine.lora import LoraQuantLinear, merge_lora_
    from tests.conftest import SAT_MODELS, model_inputs, run_logits, sat_args
    cls = SAT_MODELS["gpt2"][0]
    inputs = model_inputs("gpt2")
    rank = int(os.environ["RANK"])
    results = {}

    model, margs = sat_quant.from_pretrained(cls, lora_dir, args=sat_args("gpt2", model_parallel_size=2),
                                             overwrite_args={"model_parallel_size": 2})
    qkv = model.transformer.layers[0].attention.query_key_value
    dense = model.transformer.layers[0].attention.dense
    assert isinstance(qkv, LoraQuantLinear) and isinstance(dense, LoraQuantLinear)
    assert qkv.lora_B.shape == (3 * 256 // 2, 4) and qkv.lora_A.shape == (4, 256), "column: B split, A whole"
    assert dense.lora_A.shape == (4, 128) and dense.lora_B.shape == (256, 4), "row: A split, B whole"
    model.eval()
    results["loaded"] = run_logits(model, inputs)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        logits = model(**inputs)[0]
        targets = inputs["input_ids"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 targets.reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    results["losses"] = losses
    # replicated adapter matrices must get the same (complete) gradient on every rank: still identical
    replicated = [p for n, p in model.named_parameters() if p.requires_grad and not getattr(p, "model_parallel", False)]
    gathered = [[torch.empty_like(p) for _ in range(2)] for p in replicated]
    for p, out in zip(replicated, gathered):
        torch.distributed.all_gather(out, p.detach().contiguous())
    results["replicated_identical"] = all(torch.equal(a, b) for a, b in gathered)
    results["n_replicated"] = len(replicated)
    results["trained"] = run_logits(model, inputs)
    sat_quant.save_checkpoint(model, os.path.join(out_dir, "lora-mp2"), args=margs)

    assert merge_lora_(model) == 8
    results["merged"] = run_logits(model, inputs)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "mp_lora.pt"))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
