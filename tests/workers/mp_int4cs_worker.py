"""Run under ``torchrun --nproc_per_node 2`` by tests/io/test_parallel.py: int4cs / int4c (as PLAN_JSON says) on the
column- and row-parallel layers of a SAT GPT-2 at model-parallel size 2. Each rank quantizes its own part from the
full-precision checkpoint; the statistics that span other ranks (column scale, row scale) come from the whole
weight (all-reduced), so the saved shards merge into exactly the mp=1 conversion. argv: FP_DIR PLAN_JSON OUT_DIR."""
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(fp_dir: str, plan: str, out_dir: str) -> None:
    import torch

    import sat_quant
    from tests.conftest import SAT_MODELS, model_inputs, run_logits, sat_args
    rank = int(os.environ["RANK"])
    args = sat_args("gpt2", model_parallel_size=2, quant=4, quant_plan=plan)
    model, margs = sat_quant.from_pretrained(SAT_MODELS["gpt2"][0], fp_dir, args=args,
                                             overwrite_args={"model_parallel_size": 2})
    qkv = model.transformer.layers[0].attention.query_key_value
    assert qkv.fmt.name == "int4cs" and qkv.out_features == 3 * 256 // 2
    torch.save(qkv.neutral_tensors()["col_scale"], os.path.join(out_dir, f"col_scale_rank{rank}.pt"))
    logits = run_logits(model.eval(), model_inputs("gpt2"))
    if rank == 0:
        torch.save(logits, os.path.join(out_dir, "int4cs_mp2.pt"))
    sat_quant.save_checkpoint(model, os.path.join(out_dir, "q-int4cs-mp2"), args=margs)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
