"""Child of the calibration memory tests (tests/tools/test_convert_calibrate.py, text; test_convert_calibrate_images.py,
CogVLM): ``sat-quant convert SRC DST --quant 4 --quant-plan PLAN --calibrate FILE --tokenizer TOK [EXTRA...]`` in
this process, then one JSON line: the resident set after imports and the peak (``VmHWM``, never reset: see
tests/workers/convert_memory_child.py for why not ``ru_maxrss``). EXTRA ``--import utils.models``: CogVLM's snapshot
is put on sys.path and its model imported before the baseline."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402

from tests.workers.convert_memory_child import peak_bytes, rss_bytes  # noqa: E402


def main(src: str, dst: str, text: str, tokenizer: str, plan: str, *extra: str) -> None:
    import torch
    from sat.model.official.llama_model import LLaMAModel  # noqa: F401  (SAT's registry knows the class)
    from transformers import AutoTokenizer  # noqa: F401  (imported by --tokenizer)

    import sat_quant.tools.commands  # noqa: F401  (what the CLI imports after parsing)
    from sat_quant.tools.cli import main as cli
    if "utils.models" in extra:
        from tests.cogvlm_fixture import cogvlm_model_class
        cogvlm_model_class()
        import sat_quant.tools.calibration_data  # noqa: F401  (the image processors it loads are counted below)
    torch.set_num_threads(2)
    baseline = rss_bytes()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli(["convert", src, dst, "--quant", "4", "--quant-plan", plan, "--calibrate", text,
                      "--tokenizer", tokenizer, "--quiet", *extra])
    print(json.dumps({"status": status, "baseline": baseline, "peak": peak_bytes(), "out": out.getvalue()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
