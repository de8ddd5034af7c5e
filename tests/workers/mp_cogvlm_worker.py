"""Run under ``torchrun --nproc_per_node 2`` by tests/io/test_parallel.py: the tiny real CogVLMModel at
model-parallel size 2, quantized per rank from a full-precision checkpoint. argv: FP_DIR OUT_DIR."""
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(fp_dir: str, out_dir: str) -> None:
    import torch

    import sat_quant
    from sat_quant.engine.layers import QuantColumnParallelLinear
    from tests.cogvlm_fixture import _cogvlm_model_class, tiny_cogvlm_args, tiny_cogvlm_inputs
    from tests.conftest import run_logits
    args = tiny_cogvlm_args(quant=4, quant_group_size=64, model_parallel_size=2, world_size=2,
                            rank=int(os.environ["RANK"]))  # tiny EVA: 1920/2 = 960 columns per rank
    model, _ = sat_quant.from_pretrained(_cogvlm_model_class(), fp_dir, args=args,
                                         overwrite_args={"model_parallel_size": 2})
    expert = model.mixins["mlp"].vision_dense_h_to_4h_list["0"]
    assert isinstance(expert, QuantColumnParallelLinear) and expert.out_features == 512 // 2
    logits = run_logits(model.eval(), tiny_cogvlm_inputs())
    if int(os.environ["RANK"]) == 0:
        torch.save(logits, os.path.join(out_dir, "cogvlm_mp2.pt"))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
