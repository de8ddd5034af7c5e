"""Every kind of bad input (truncated or altered file, missing/mis-shaped tensor, unknown format version, a block that
does not describe the tensors, the wrong model, a pickle that would run code, broken ``latest``/model_config.json,
--quant flags that contradict the checkpoint) is refused with an error that names the file and the fix, before
anything is loaded."""
import os

import pytest
import torch
from sat.model.official.gpt2_model import GPT2Model

import sat_quant
from sat_quant import CheckpointError, QuantConfigError
from sat_quant.io.load import load_into
from sat_quant.io.manifest import quantization_block
from sat_quant.io.tensorfile import TensorSource
from tests.conftest import INT4_CPU_BACKEND, run_logits, sat_args
from tests.io.checkpoints import (
    STATES,
    assert_refused,
    edit_config_files,
    load_logits,
    manifest_file,
    read_json,
    rewrite_tensors,
    sha256,
    tensor_file,
    write_json,
)


def test_truncated_tensor_file(q4, ckpt):
    path = tensor_file(ckpt)
    os.truncate(path, os.path.getsize(path) // 2)
    for verify in (True, False):  # the size check runs even without the checksum
        with pytest.raises(CheckpointError) as excinfo:
            sat_quant.from_pretrained(GPT2Model, ckpt, verify=verify)
        assert_refused(excinfo, path, "truncated", "re-save or re-convert")
    # truncated with a manifest that matches it (e.g. regenerated from the partial copy): the file itself
    manifest = read_json(manifest_file(ckpt))
    manifest.update(bytes=os.path.getsize(path), sha256=sha256(path))
    write_json(manifest_file(ckpt), manifest)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, path, "not a readable safetensors file", "truncated or corrupted")


def test_flipped_bytes_fail_the_checksum(ckpt):
    path = tensor_file(ckpt)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert os.path.getsize(path) == size
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, path, "sha256", "re-save or re-convert")


def test_missing_tensor(ckpt):
    gone = "transformer.layers.1.attention.dense.scale"
    rewrite_tensors(ckpt, lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, tensor_file(ckpt), f"{gone}: missing from the checkpoint", "model class and its sizes")


def test_tensor_with_wrong_shape_or_dtype(ckpt):
    def edit(t):
        t["transformer.final_layernorm.weight"] = t["transformer.final_layernorm.weight"][:128].clone()
        t["transformer.layers.0.mlp.dense_h_to_4h.zero"] = t["transformer.layers.0.mlp.dense_h_to_4h.zero"].float()
        return t
    rewrite_tensors(ckpt, edit)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, tensor_file(ckpt), "2 problems",
                   "transformer.final_layernorm.weight: checkpoint has [128] torch.float32, model needs [256]",
                   "dense_h_to_4h.zero: checkpoint has [1024, 2] torch.float32, model needs [1024, 2] torch.uint8")


def test_unknown_format_version(ckpt):
    edit_config_files(ckpt, lambda c: c["quantization"].update(format_version=99))
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, manifest_file(ckpt), "format_version 99", "upgrade sat_quant")
    # the manifest's own version, too
    manifest = read_json(manifest_file(ckpt))
    manifest["format_version"] = 99
    write_json(manifest_file(ckpt), manifest)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, manifest_file(ckpt), "format_version 99", "upgrade sat_quant")


def test_block_says_int4_but_tensors_are_int8(fp_models, q4, tmp_path):
    _, state, inputs, _ = fp_models["gpt2"]
    args = sat_args("gpt2", skip_init=True, quant=8)
    int8 = sat_quant.get_model(args, GPT2Model).eval()
    int8.load_state_dict(state, strict=False)
    d = str(tmp_path / "int8")
    sat_quant.save_checkpoint(int8, d, args=args)
    int4_block = quantization_block(q4[0])

    def relabel(config):
        config["quantization"] = int4_block
        config.update(quant=4, quant_format="int4")
    edit_config_files(d, relabel)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, d)
    assert_refused(excinfo, tensor_file(d), "does not fit this model",
                   "attention.dense.qweight: checkpoint has [256, 256] torch.int8, model needs [256, 128] torch.uint8",
                   "the quantization block describes these tensors")


@pytest.mark.parametrize("how", ["hidden_size", "other_class"])
def test_checkpoint_into_a_model_of_other_sizes(ckpt, how):
    from sat.model.official.llama_model import LLaMAModel
    kw = dict(overwrite_args={"hidden_size": 512}) if how == "hidden_size" else dict(cls=LLaMAModel)
    cls = kw.pop("cls", GPT2Model)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(cls, ckpt, **kw)
    assert_refused(excinfo, tensor_file(ckpt), "does not fit this model", "model class and its sizes")
    if how == "hidden_size":
        assert_refused(excinfo, "checkpoint has [256] torch.float32, model needs [512] torch.float32")
    else:
        assert_refused(excinfo, "mixins.gpt2-final.lm_head.weight: in the checkpoint but not in the model")


class _WritesAFile:
    """Unpickling this calls open(marker, "w"): arbitrary code, as far as a loader is concerned."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_pt_whose_pickle_would_run_code_is_refused(tmp_path, legacy):
    """A full-precision SAT checkpoint (.pt, no manifest) loaded with --quant goes through torch.load with
    weights_only=True: the payload never runs."""
    fp_args = sat_args("gpt2")
    d = tmp_path / "fp"
    (d / "1").mkdir(parents=True)
    (d / "latest").write_text("1")
    from sat.model.base_model import get_model as sat_get_model
    from sat.training.model_io import extract_model_specific_args_to_dump
    write_json(d / "model_config.json", extract_model_specific_args_to_dump(fp_args, sat_get_model(fp_args, GPT2Model)))
    marker = str(tmp_path / "pwned")
    pt = str(d / "1" / f"{STATES}.pt")
    torch.save({"module": {"transformer.word_embeddings.weight": _WritesAFile(marker)}}, pt,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, str(d), args=sat_args("gpt2", quant=4))
    assert_refused(excinfo, pt, "weights_only=True", "refuses it", "trusted code")
    assert not os.path.exists(marker)
    # the payload is live: an unsafe load would have run it
    torch.load(pt, weights_only=False)
    assert os.path.exists(marker)


def test_latest_missing_or_wrong(ckpt):
    latest = os.path.join(ckpt, "latest")
    with open(latest, "w") as f:
        f.write("7")
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, latest, "names iteration 7", os.path.join(ckpt, "7"),
                   "point 'latest' at an existing iteration folder")
    with open(latest, "w") as f:
        f.write("one")
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, latest, "not an iteration number")
    os.unlink(latest)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, latest, "does not exist", "not a SAT checkpoint directory")


def test_model_config_missing(ckpt):
    path = os.path.join(ckpt, "model_config.json")
    os.unlink(path)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, path, "does not exist", "SAT's save_checkpoint writes")


def test_quant_flags_that_contradict_the_checkpoint(q4, ckpt):
    with pytest.raises(QuantConfigError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt, args=sat_args("gpt2", quant=8))
    assert_refused(excinfo, ckpt, "already quantized to 4-bit (int4 group 128)", "--quant 8",
                   "Drop the --quant flags")
    # flags that agree are fine
    _, _, inputs, ref = q4
    assert torch.equal(load_logits(ckpt, inputs, args=sat_args("gpt2", quant=4)), ref)


def test_a_refused_load_leaves_the_model_untouched(q4, ckpt):
    """load_into checks every tensor before copying any: a model it refuses is exactly as it was."""
    model, args, inputs, ref = q4
    gone = "transformer.layers.1.mlp.dense_4h_to_h.qweight"

    def edit(t):
        t = {k: (v + 1 if v.is_floating_point() else v) for k, v in t.items()}  # every other tensor differs
        del t[gone]
        return t
    rewrite_tensors(ckpt, edit)
    with pytest.raises(CheckpointError, match=f"{gone}: missing"):
        load_into(model, TensorSource(tensor_file(ckpt)))
    assert torch.equal(run_logits(model, inputs), ref)


# -- strict loading (issue 11) ----------------------------------------------------------------------

def test_a_sat_quant_tensor_file_without_its_manifest_is_refused(ckpt):
    """No manifest, flipped bytes: nothing could tell the load was wrong, so a missing manifest is refused."""
    os.remove(manifest_file(ckpt))
    path = tensor_file(ckpt)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 64)
        f.write(b"\x55" * 16)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, manifest_file(ckpt), "is missing", "cannot be verified", "sat-quant convert")


@pytest.mark.parametrize("field,value", [("num_layers", 200000), ("hidden_size", 512)])
def test_sizes_edited_in_the_config_are_refused_before_building(ckpt, field, value):
    import time
    edit_config_files(ckpt, lambda c: c.update({field: value}))
    start = time.monotonic()
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert time.monotonic() - start < 5, "refused only after building"
    assert_refused(excinfo, manifest_file(ckpt), f"{field} is {value}", "Restore the original values")


@pytest.mark.parametrize("dtype", [torch.uint16, torch.float8_e4m3fn])
def test_a_packed_tensor_rewritten_in_another_dtype_is_refused_before_any_copy(ckpt, dtype):
    name = "transformer.layers.0.attention.dense.qweight"
    rewrite_tensors(ckpt, lambda t: {**t, name: torch.zeros(t[name].shape, dtype=dtype)})
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, tensor_file(ckpt), name, str(dtype), "torch.uint8")


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.pop("bytes"), "'bytes' is missing"),
    (lambda m: m.update(tensors=[]), "'tensors' is missing or not a dict"),
    (lambda m: m.update(quantization=[1, 2]), "'quantization' must be a JSON object"),
])
def test_hand_edited_manifest_fields_are_named(ckpt, edit, needle):
    manifest = read_json(manifest_file(ckpt))
    edit(manifest)
    write_json(manifest_file(ckpt), manifest)
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt)
    assert_refused(excinfo, manifest_file(ckpt), needle)


@pytest.mark.parametrize("case", ["latest-is-a-folder", "latest-binary", "config-is-a-list", "mp-not-a-number",
                                  "src-is-a-file"])
def test_broken_layout_files_are_named(ckpt, tmp_path, case):
    target = ckpt
    if case == "latest-is-a-folder":
        os.remove(os.path.join(ckpt, "latest"))
        os.mkdir(os.path.join(ckpt, "latest"))
        needle = "is a folder"
    elif case == "latest-binary":
        with open(os.path.join(ckpt, "latest"), "wb") as f:
            f.write(b"\xff\xfe\x00")
        needle = "latest"
    elif case == "config-is-a-list":
        write_json(os.path.join(ckpt, "model_config.json"), [1, 2])
        needle = "not an object"
    elif case == "mp-not-a-number":
        edit_config_files(ckpt, lambda c: c.update(model_parallel_size="two"))
        needle = "not a positive integer"
    else:
        target = str(tmp_path / "file")
        with open(target, "w") as f:
            f.write("x")
        needle = "not a directory"
    with pytest.raises(CheckpointError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, target)
    assert needle in str(excinfo.value)


@pytest.mark.parametrize("flags", [dict(quant_skip=["*.dense"]), dict(quant_lm_head=True),
                                   dict(quant_plan="plan.json")])
def test_layer_choice_flags_on_a_quantized_checkpoint_are_refused(ckpt, flags):
    args = sat_args("gpt2", **flags)
    with pytest.raises(QuantConfigError) as excinfo:
        sat_quant.from_pretrained(GPT2Model, ckpt, args=args)
    assert "already quantized" in str(excinfo.value) and "cannot apply" in str(excinfo.value)


def test_the_backend_flag_is_honoured_on_a_quantized_checkpoint(q4, ckpt):
    _, _, inputs, ref = q4
    model, _ = sat_quant.from_pretrained(GPT2Model, ckpt, args=sat_args("gpt2", quant_backend="reference"))
    layers = [m for m in model.modules() if isinstance(m, sat_quant.QuantLinear)]
    assert layers and {m.backend.name for m in layers} == {"reference"}
    torch.testing.assert_close(run_logits(model.eval(), inputs), ref, rtol=0.05, atol=0.05)
    default, _ = sat_quant.from_pretrained(GPT2Model, ckpt)
    assert {m.backend.name for m in default.modules() if isinstance(m, sat_quant.QuantLinear)} == {INT4_CPU_BACKEND}
