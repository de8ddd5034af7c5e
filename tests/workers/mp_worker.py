"""Run under ``torchrun --nproc_per_node 2`` by tests/io/test_parallel.py (gloo on CPU, model-parallel size 2).

argv: FP_DIR Q1_DIR OUT_DIR. Loads (a) the full-precision checkpoint with --quant 4 (each rank quantizes
only its own partition), saves it as an mp=2 quantized checkpoint, reloads that, and (b) the mp=1
quantized checkpoint Q1_DIR resharded to mp=2, by sat_quant and by SAT's own AutoModel.from_pretrained (as
CogVLM's scripts call it); rank 0 writes each run's logits to OUT_DIR.
"""
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(fp_dir: str, q1_dir: str, out_dir: str) -> None:
    import torch

    import sat_quant
    from tests.conftest import SAT_MODELS, model_inputs, run_logits, sat_args
    cls = SAT_MODELS["gpt2"][0]
    inputs = model_inputs("gpt2")
    rank = int(os.environ["RANK"])

    def args(**kw):
        return sat_args("gpt2", model_parallel_size=2, **kw)

    def record(name, model):
        logits = run_logits(model.eval(), inputs)
        if rank == 0:
            torch.save(logits, os.path.join(out_dir, f"{name}.pt"))

    model, margs = sat_quant.from_pretrained(cls, fp_dir, args=args(quant=4), overwrite_args={"model_parallel_size": 2})
    local = model.transformer.layers[0].attention.query_key_value
    assert local.out_features == 3 * 256 // 2, "each rank holds half the fused QKV rows"
    record("fp_to_mp2", model)
    q2_dir = os.path.join(out_dir, "q-mp2")
    sat_quant.save_checkpoint(model, q2_dir, args=margs)
    model, _ = sat_quant.from_pretrained(cls, q2_dir, args=args())
    record("mp2_reload", model)
    model, _ = sat_quant.from_pretrained(cls, q1_dir, args=args(), overwrite_args={"model_parallel_size": 2})
    record("mp1_to_mp2", model)
    # SAT's own AutoModel, called as CogVLM's unpatched cli_demo_sat.py calls it under torchrun
    from sat.model.base_model import AutoModel
    world = torch.distributed.get_world_size()
    model, _ = AutoModel.from_pretrained(q1_dir, args=args(world_size=world, rank=rank, local_rank=rank, deepspeed=None,
                                                           skip_init=True, use_gpu_initialization=False),
                                         overwrite_args={"model_parallel_size": world})
    record("sat_automodel_mp1_to_mp2", model)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
