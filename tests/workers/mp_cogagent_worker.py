"""Run under ``torchrun --nproc_per_node 2`` by tests/io/test_cogagent_checkpoints.py: the tiny real CogAgent's
mp=1 sat_quant checkpoint loaded at model-parallel size 2 (packed tensors split on load, never dequantized),
run, and saved as mp=2 shards. argv: Q1_DIR OUT_DIR."""
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(q1_dir: str, out_dir: str) -> None:
    import torch

    import sat_quant
    from sat_quant.engine.layers import QuantColumnParallelLinear, QuantLinear, QuantRowParallelLinear
    from tests.cogagent_fixture import TinyCogAgentModel, tiny_cogagent_args, tiny_cogagent_inputs
    from tests.conftest import run_logits
    args = tiny_cogagent_args(model_parallel_size=2, world_size=2, rank=int(os.environ["RANK"]))
    model, _ = sat_quant.from_pretrained(TinyCogAgentModel, q1_dir, args=args, overwrite_args={"model_parallel_size": 2})
    cross = model.transformer.layers[0].cross_attention
    assert isinstance(cross.query, QuantColumnParallelLinear) and cross.query.out_features == 128 // 2
    assert isinstance(cross.dense, QuantRowParallelLinear) and cross.dense.in_features == 128 // 2
    w3 = model.mixins["encoder"].vit.model.blocks[0].mlp.w3  # a plain nn.Linear: whole (padded) on every rank
    assert type(w3) is QuantLinear and w3.in_features == 2730 and w3.spec.padding > 0
    logits = run_logits(model.eval(), tiny_cogagent_inputs())
    if int(os.environ["RANK"]) == 0:
        torch.save(logits, os.path.join(out_dir, "cogagent_mp2.pt"))
    sat_quant.save_checkpoint(model, os.path.join(out_dir, "q-mp2"), args=args)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
