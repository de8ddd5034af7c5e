"""Run under ``torchrun --nproc_per_node 2`` by tests/io/test_parallel.py: bad model-parallel inputs must give
every rank the same clear error, never a hang. argv: BROKEN_DIR OUT_DIR (BROKEN_DIR lacks rank 1's file).
Each rank writes the messages it got, separated by '---': world size, straddling group, int4c odd group count,
missing rank file."""
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(broken_dir: str, out_dir: str) -> None:
    import sat_quant
    from tests.conftest import SAT_MODELS, sat_args
    rank = int(os.environ["RANK"])
    cls = SAT_MODELS["gpt2"][0]
    messages = []
    try:  # world size 2 is not a multiple of --model-parallel-size 4: refused before SAT starts distributed
        sat_quant.get_args(["--model-parallel-size", "4"])
    except sat_quant.QuantConfigError as exc:
        messages.append(f"world: {exc}")
    try:  # a group that would straddle the two ranks' halves of a row-parallel layer
        sat_quant.get_model(sat_args("gpt2", model_parallel_size=2, quant=4, quant_group_size=256), cls)
    except sat_quant.QuantConfigError as exc:
        messages.append(f"group: {exc}")
    try:  # int4c packs two groups' zero-points per byte: one group per rank of a row-parallel layer cannot be cut
        sat_quant.get_model(sat_args("gpt2", model_parallel_size=2, quant=4, quant_format="int4c",
                                     quant_group_size=128), cls)
    except sat_quant.QuantConfigError as exc:
        messages.append(f"rowscale: {exc}")
    try:  # rank 1's shard is missing: rank 0 must not go on alone
        sat_quant.from_pretrained(cls, broken_dir, args=sat_args("gpt2", model_parallel_size=2))
    except sat_quant.CheckpointError as exc:
        messages.append(f"missing: {exc}")
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n---\n".join(messages))


if __name__ == "__main__":
    main(*sys.argv[1:3])
