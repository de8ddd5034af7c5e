"""Loading a quantized checkpoint costs about the checkpoint's size in memory, not more: peak RSS of a subprocess."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = os.path.join(ROOT, "tests", "workers", "load_probe.py")


def probe(mode: str, directory: str) -> dict:
    out = subprocess.run([sys.executable, PROBE, mode, directory], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, WANDB_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_from_pretrained_peak_rss_is_about_the_checkpoint_size(tmp_path):
    directory = str(tmp_path / "gpt2-q4")
    saved = probe("save", directory)  # a first process builds the ~310M-parameter int4 model and saves it
    assert saved["params"] >= 300_000_000
    loaded = probe("load", directory)  # a second, fresh process loads it
    assert loaded["quant_layers"] == 96  # 24 layers x (qkv, dense, h_to_4h, 4h_to_h): all came back quantized
    growth = loaded["peak"] - loaded["baseline"]
    budget = 1.2 * saved["file_bytes"] + 64 * 2**20
    # the model itself must be resident (it is ~the file), so a near-zero growth would mean a broken probe
    assert growth > 0.8 * saved["file_bytes"], (growth / 2**20, saved["file_bytes"] / 2**20)
    assert growth <= budget, (f"from_pretrained peaked {growth / 2**20:.0f} MB above the post-import baseline; "
                              f"budget {budget / 2**20:.0f} MB for a {saved['file_bytes'] / 2**20:.0f} MB checkpoint")
