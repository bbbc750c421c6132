"""Merging real-world inputs (issue 10): quantized, tied and resized bases, key layouts,
directory inputs, zero-sum weights, initialisation-dependent adapters, permissions and
unreadable files. Every result is compared with PEFT's or transformers' own computation;
every refusal must name its reason and leave nothing written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_merge import _run_failing, assert_weighted_sum, load, make_adapter, make_base
from transformers import AutoModelForCausalLM

from poc_lora.adapters import expand_adapter_inputs
from poc_lora.cli import main
from poc_lora.errors import AdapterError, ConfigError
from poc_lora.merge import merge_adapters

IDS = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(7))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def no_output_left(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ------------------------------------------------------------------ 1. quantized bases
@pytest.fixture(scope="module")
def quant_setup(tmp_path_factory):
    """A float base (64 wide: bitsandbytes' 4-bit packing needs it), two adapters for it, and
    the same base quantized by bitsandbytes (LLM.int8 and double-quantized NF4) and saved with
    save_pretrained on the CPU: real checkpoints, as bitsandbytes writes them."""
    from transformers import BitsAndBytesConfig

    root = tmp_path_factory.mktemp("quant")
    base = make_base(num_hidden_layers=1, hidden_size=64, intermediate_size=128)
    base.save_pretrained(str(root / "fp32"))
    dirs = [make_adapter(root / f"a{j}", base, j, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
            for j in range(2)]
    try:
        import bitsandbytes  # noqa: F401  (the "quant" extra)
    except ImportError:
        pass
    else:
        for name, q in (("int8", BitsAndBytesConfig(load_in_8bit=True)), ("nf4", BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))):
            AutoModelForCausalLM.from_pretrained(str(root / "fp32"), quantization_config=q,
                                                 device_map="cpu").save_pretrained(str(root / name))
        # the int8 checkpoint with its quantization_config removed: caught by its tensors alone
        shutil.copytree(root / "int8", root / "int8_noconfig")
        cfg = json.loads((root / "int8_noconfig" / "config.json").read_text())
        del cfg["quantization_config"]
        (root / "int8_noconfig" / "config.json").write_text(json.dumps(cfg))
    # a plain quantization_config (any method) on float tensors
    shutil.copytree(root / "fp32", root / "fp8cfg")
    cfg = json.loads((root / "fp8cfg" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (root / "fp8cfg" / "config.json").write_text(json.dumps(cfg))
    # float8 weights without any config entry
    shutil.copytree(root / "fp32", root / "f8tensor")
    sd = load_file(str(root / "fp32" / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(sd, str(root / "f8tensor" / "model.safetensors"), metadata={"format": "pt"})
    return root, dirs


@pytest.mark.parametrize("kind,needle", [
    ("int8", "quant_method='bitsandbytes' (load_in_8bit)"),
    ("nf4", "quant_method='bitsandbytes' (load_in_4bit)"),
    ("int8_noconfig", "SCB"),
    ("fp8cfg", "quant_method='fp8'"),
    ("f8tensor", "model.layers.0.mlp.up_proj.weight stored as float8_e4m3fn"),
])
def test_quantized_base_is_refused_before_writing(quant_setup, kind, needle, tmp_path, capsys):
    root, dirs = quant_setup
    if not (root / kind).exists():
        pytest.skip("bitsandbytes (extra 'quant') is not installed")
    out = tmp_path / "merged_model"
    err = _run_failing(["merge", *map(str, dirs), "--output", str(out), "--merge-into-base",
                        "--base-model", str(root / kind)], out, capsys)
    assert "Traceback" not in err
    assert str(root / kind) in err and "quantized" in err and needle in err
    assert "Dequantize the base first" in err and "drop --merge-into-base" in err
    # the float base of the same model merges fine
    assert main(["merge", *map(str, dirs), "--output", str(out), "--merge-into-base",
                 "--base-model", str(root / "fp32")]) == 0


# ------------------------------------------------------------------ 2. config describes the tensors
def test_written_config_dtype_matches_written_tensors(tmp_path):
    base = make_base(num_hidden_layers=1).to(torch.bfloat16)
    base.save_pretrained(str(tmp_path / "bf16"))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    dirs = [make_adapter(tmp_path / f"a{j}", base.float(), j, r=2, lora_alpha=4, target_modules=["q_proj"])
            for j in range(2)]
    out = tmp_path / "fp32_model"
    assert main(["merge", *map(str, dirs), "--output", str(out), "--merge-into-base", "--base-model",
                 str(tmp_path / "bf16"), "--dtype", "float32"]) == 0
    written = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert {p.dtype for p in written.parameters()} == {torch.float32}
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    # and the fp32 values are the bf16 base + the merged update, as PEFT computes it in fp32
    merge_adapters(dirs, tmp_path / "adapter")
    bf16_as_fp32 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32)
    want = load(bf16_as_fp32, tmp_path / "adapter").merge_and_unload()
    assert rel(logits(written), logits(want)) < 1e-5


# ------------------------------------------------------------------ 3. tied embeddings
TIED_CASES = {
    "lora_embed": dict(target_modules=["q_proj", "embed_tokens"]),
    "lora_lm_head": dict(target_modules=["q_proj", "lm_head"]),
    "lora_both": dict(target_modules=["embed_tokens", "lm_head"]),
    "mts_embed": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "mts_lm_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    base = make_base(num_hidden_layers=1, tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base.save_pretrained(str(root / "base"))
    assert "lm_head.weight" not in load_file(str(root / "base" / "model.safetensors"))
    return base, root


@pytest.mark.parametrize("case", sorted(TIED_CASES))
def test_tied_embeddings_written_model_equals_peft_loaded_adapter(tied_base, case, tmp_path, capsys):
    base, root = tied_base
    dirs = [make_adapter(tmp_path / f"a{j}", base, 50 + j, r=2, lora_alpha=4, **TIED_CASES[case]) for j in range(2)]
    out = tmp_path / "model"
    assert main(["merge", *map(str, dirs), "--output", str(out), "--merge-into-base",
                 "--base-model", str(root / "base")]) == 0
    printed = capsys.readouterr().out
    assert "untied model.embed_tokens.weight and lm_head.weight" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(str(out / "model.safetensors"))
    written = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert written.lm_head.weight.data_ptr() != written.model.embed_tokens.weight.data_ptr()
    # reference: each input loaded by PEFT on the tied base, unmerged; their outputs averaged is
    # the merge only for modules_to_save, so compare the single-adapter merge for every case
    one = tmp_path / "one"
    assert main(["merge", str(dirs[0]), "--weights", "1", "--output", str(one), "--merge-into-base",
                 "--base-model", str(root / "base")]) == 0
    want = logits(load(base, dirs[0]))
    assert rel(logits(AutoModelForCausalLM.from_pretrained(str(one))), want) < 1e-5
    # the two-adapter model equals the PEFT-loaded merged adapter (itself checked against PEFT)
    merge_adapters(dirs, tmp_path / "adapter")
    assert rel(logits(written), logits(load(base, tmp_path / "adapter"))) < 1e-5


def test_tied_embeddings_kept_when_adapter_touches_neither(tied_base, tmp_path):
    base, root = tied_base
    dirs = [make_adapter(tmp_path / f"a{j}", base, 60 + j, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
            for j in range(2)]
    out = tmp_path / "model"
    report = merge_adapters(dirs, out, merge_into_base=True, base_model=root / "base")
    assert report.notes == []
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    written = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert written.lm_head.weight is written.model.embed_tokens.weight
    merge_adapters(dirs, tmp_path / "adapter")
    want = load(base, tmp_path / "adapter").merge_and_unload()
    assert rel(logits(written), logits(want)) < 1e-5


def test_alora_is_not_merged_into_base(tmp_path):
    """An aLoRA acts only after its invocation tokens: merging it into the weights would make it
    act on every token, so only the adapter merge is allowed."""
    base = make_base(num_hidden_layers=1)
    base.save_pretrained(str(tmp_path / "base"))
    dirs = []
    for j in range(2):
        d = make_adapter(tmp_path / f"a{j}", base, j, r=2, lora_alpha=4, target_modules=["q_proj"])
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["alora_invocation_tokens"] = [3, 5]
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        dirs.append(d)
    with pytest.raises(ConfigError, match="aLoRA"):
        merge_adapters(dirs, tmp_path / "model", merge_into_base=True, base_model=tmp_path / "base")
    assert no_output_left(tmp_path / "model")
    merge_adapters(dirs, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["alora_invocation_tokens"] == [3, 5]


# ------------------------------------------------------------------ 4. shapes against the base
def test_shape_mismatch_with_base_names_tensor_and_both_shapes(tmp_path, capsys):
    base = make_base(num_hidden_layers=1)
    base.save_pretrained(str(tmp_path / "base"))
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(50)
    vocab = [make_adapter(tmp_path / f"v{j}", resized, j, r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"])
             for j in range(2)]
    other = make_base(num_hidden_layers=1, hidden_size=8)
    wide = [make_adapter(tmp_path / f"w{j}", other, j, r=2, lora_alpha=4, target_modules=["q_proj"]) for j in range(2)]
    out = tmp_path / "out"
    for dirs, needles in ((vocab, ["lora_embedding_A [2, 50]", "[50, 16]",
                                   "model.embed_tokens.weight of shape [48, 16]"]),
                          (wide, ["q_proj.lora_A.weight [2, 8]", "[8, 8]", "q_proj.weight of shape [16, 16]"])):
        err = _run_failing(["merge", *map(str, dirs), "--output", str(out), "--merge-into-base",
                            "--base-model", str(tmp_path / "base")], out, capsys)
        assert "Traceback" not in err and str(dirs[0]) in err
        for needle in needles:
            assert needle in err, (needle, err)


def test_modules_to_save_shape_mismatch_with_base(tmp_path, capsys):
    base = make_base(num_hidden_layers=1)
    base.save_pretrained(str(tmp_path / "base"))
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(52)
    dirs = [make_adapter(tmp_path / f"m{j}", resized, j, r=2, lora_alpha=4, target_modules=["q_proj"],
                         modules_to_save=["lm_head"]) for j in range(2)]
    out = tmp_path / "out"
    err = _run_failing(["merge", *map(str, dirs), "--output", str(out), "--merge-into-base",
                        "--base-model", str(tmp_path / "base")], out, capsys)
    assert "base_model.model.lm_head.weight has shape [52, 16]" in err and "lm_head.weight of shape [48, 16]" in err


# ------------------------------------------------------------------ 5. key layouts
def _strip_prefix(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "adapter_model.safetensors"))
    save_file({k.removeprefix("base_model.model."): v for k, v in sd.items()}, str(dst / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def layout_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    base = make_base(num_hidden_layers=1)
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
    a0 = make_adapter(root / "a0", base, 70, **kw)
    a1 = make_adapter(root / "a1", base, 71, **kw)
    return base, a0, a1, _strip_prefix(a1, root / "a1_noprefix")


@pytest.mark.parametrize("order", ["prefixless_first", "prefixed_first"])
def test_key_layouts_give_peft_canonical_output(layout_set, order, tmp_path):
    base, a0, a1, bare = layout_set
    inputs, same = ([bare, a0], [a1, a0]) if order == "prefixless_first" else ([a0, bare], [a0, a1])
    merge_adapters(inputs, tmp_path / "m", weights=[0.3, 0.7])
    keys = load_file(str(tmp_path / "m" / "adapter_model.safetensors")).keys()
    assert all(k.startswith("base_model.model.") for k in keys)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        warnings.filterwarnings("error", message=".*unexpected keys.*")
        assert_weighted_sum(base, same, [0.3, 0.7], tmp_path / "m", full=True)


def test_layout_peft_cannot_load_is_refused(layout_set, tmp_path):
    _, a0, _, _ = layout_set
    mixed = tmp_path / "mixed"
    shutil.copytree(a0, mixed)
    sd = load_file(str(mixed / "adapter_model.safetensors"))
    sd = {(k.removeprefix("base_model.model.") if "q_proj" in k else k): v for k, v in sd.items()}
    save_file(sd, str(mixed / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="mixes keys with the 'base_model.model.' prefix") as info:
        merge_adapters([a0, mixed], tmp_path / "out")
    assert str(mixed) in str(info.value) and no_output_left(tmp_path / "out")
    named = tmp_path / "named"  # PEFT's in-memory names (adapter name inside the key)
    shutil.copytree(a0, named)
    sd = load_file(str(named / "adapter_model.safetensors"))
    save_file({k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in sd.items()},
              str(named / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="lora_A.default.weight"):
        merge_adapters([a0, named], tmp_path / "out")


# ------------------------------------------------------------------ 6. directory inputs
def test_directory_expansion_rule(layout_set, tmp_path, capsys):
    _, a0, a1, _ = layout_set
    runs = tmp_path / "runs"
    for name, src in (("adapter_10", a1), ("adapter_2", a0), ("adapter_0", a1)):
        shutil.copytree(src, runs / name)
    shutil.copytree(a0, runs / "checkpoint-150")  # a Trainer checkpoint: never an ensemble member
    (runs / "logs").mkdir()
    assert main(["merge", str(runs / "adapter_0"), str(runs / "adapter_2"), "--output", str(runs / "merged")]) == 0
    capsys.readouterr()
    assert main(["merge", str(runs), "--output", str(tmp_path / "merged_all")]) == 0
    printed = capsys.readouterr().out
    want = [runs / "adapter_0", runs / "adapter_2", runs / "adapter_10"]  # natural order
    for j, d in enumerate(want):
        assert f"input {j}: {d} (weight 0.333333)" in printed
    assert f"skipped: {runs / 'checkpoint-150'} (a Trainer checkpoint)" in printed
    assert f"skipped: {runs / 'merged'} (an earlier merge output" in printed
    report = json.loads((tmp_path / "merged_all" / "merge_report.json").read_text())
    assert [i["path"] for i in report["inputs"]] == list(map(str, want))
    assert {s["path"] for s in report["skipped_inputs"]} == {str(runs / "checkpoint-150"), str(runs / "merged")}
    # an explicitly named checkpoint is used as asked
    assert expand_adapter_inputs([runs / "checkpoint-150"])[0] == [runs / "checkpoint-150"]


def test_directory_expansion_refuses_broken_adapters(layout_set, tmp_path):
    _, a0, a1, _ = layout_set
    runs = tmp_path / "runs"
    shutil.copytree(a0, runs / "adapter_0")
    shutil.copytree(a1, runs / "adapter_1")
    (runs / "adapter_1" / "adapter_config.json").unlink()  # weights but no config
    with pytest.raises(AdapterError, match="adapter_1 holds adapter weights but no adapter_config.json"):
        expand_adapter_inputs([runs])
    # an adapter folder missing its config is never replaced by its checkpoint
    shutil.rmtree(runs / "adapter_1")
    (runs / "adapter_1").mkdir()
    shutil.copytree(a1, runs / "adapter_1" / "checkpoint-150")
    with pytest.raises(AdapterError, match="checkpoint-150.*never used in place of an adapter"):
        merge_adapters([runs / "adapter_0", runs / "adapter_1"], tmp_path / "out")
    assert no_output_left(tmp_path / "out")


# ------------------------------------------------------------------ 7. weights summing to zero
def test_zero_sum_weights_with_embedding_lora(llama_embed_pair, tmp_path):
    base, dirs = llama_embed_pair
    merge_adapters(dirs, tmp_path / "diff", weights=[1.0, -1.0])  # PEFT's embedding copies are identical
    assert_weighted_sum(base, dirs, [1.0, -1.0], tmp_path / "diff")
    with pytest.raises(ConfigError, match="soup"):
        merge_adapters(dirs, tmp_path / "soup", weights=[1.0, -1.0], method="soup")
    mts = [make_adapter(tmp_path / f"m{j}", base, 80 + j, r=2, lora_alpha=4, target_modules=["q_proj"],
                        modules_to_save=["lm_head"]) for j in range(2)]
    with pytest.raises(ConfigError, match="base_model.model.lm_head.weight.*cannot be averaged"):
        merge_adapters(mts, tmp_path / "mts", weights=[1.0, -1.0])
    assert no_output_left(tmp_path / "mts")


@pytest.fixture(scope="module")
def llama_embed_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    base = make_base(num_hidden_layers=1)
    dirs = [make_adapter(root / f"e{j}", base, 90 + j, r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"])
            for j in range(2)]
    saved = load_file(str(dirs[0] / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # PEFT's copy of the base embedding
    return base, dirs


# ------------------------------------------------------------------ 16. initialisation-dependent adapters
@pytest.fixture(scope="module")
def pissa_pair(tmp_path_factory):
    """Two PiSSA adapters "fine-tuned" (factors perturbed, seeded) from one base; each saved raw
    and with PEFT's conversion to plain LoRA; plus the average of the two fine-tuned models."""
    root = tmp_path_factory.mktemp("pissa")
    base = make_base(num_hidden_layers=1)
    finetuned = []
    for j in range(2):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights="pissa"))
        model.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe
        model.save_pretrained(str(root / f"init{j}"))
        model.peft_config["default"].init_lora_weights = "pissa"
        gen = torch.Generator().manual_seed(100 + j)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        model.save_pretrained(str(root / f"raw{j}"))
        model.save_pretrained(str(root / f"conv{j}"), path_initial_model_for_weight_conversion=str(root / f"init{j}"))
        finetuned.append(copy.deepcopy(model).merge_and_unload().state_dict())
    average = copy.deepcopy(base)
    average.load_state_dict({k: (finetuned[0][k] + finetuned[1][k]) / 2 for k in finetuned[0]})
    return base, root, average


def test_pissa_raw_refused_with_recipe(pissa_pair, tmp_path, capsys):
    _, root, _ = pissa_pair
    out = tmp_path / "out"
    assert json.loads((root / "raw0" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    err = _run_failing(["merge", str(root / "raw0"), str(root / "raw1"), "--output", str(out)], out, capsys)
    assert "init_lora_weights='pissa'" in err and "path_initial_model_for_weight_conversion" in err
    assert str(root / "raw0") in err


def test_pissa_converted_merges_to_average_of_finetuned_models(pissa_pair, tmp_path):
    base, root, average = pissa_pair
    merge_adapters([root / "conv0", root / "conv1"], tmp_path / "m")
    merged = load(base, tmp_path / "m")  # on the original, unmodified base
    assert rel(logits(merged), logits(average)) < 1e-5
    assert rel(logits(base), logits(average)) > 1e-3  # the fine-tuning did change the model


def _copy_with_config(src, dst, **changes):
    """A copy of adapter ``src`` at ``dst`` with ``changes`` applied to its adapter_config.json."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("field,value,needle", [
    ("init_lora_weights", "olora", "path_initial_model_for_weight_conversion"),
    ("init_lora_weights", "loftq", "LoftQ"),
    ("init_lora_weights", "some_future_init", "only adapters initialised with"),
    ("use_dora", True, "DoRA"),
    ("layer_replication", [[0, 1], [0, 1]], "layer replication"),
    ("a_future_peft_field", {"enabled": True}, "not known to leave the update a plain"),
])
def test_config_allowlist_refuses(layout_set, tmp_path, field, value, needle):
    _, a0, _, _ = layout_set
    bad = _copy_with_config(a0, tmp_path / "bad", **{field: value})
    with pytest.raises(AdapterError, match=field) as info:
        merge_adapters([a0, bad], tmp_path / "out")
    assert needle in str(info.value) and str(bad) in str(info.value)


@pytest.mark.parametrize("field,value", [("a_future_peft_field", None), ("init_lora_weights", "gaussian"),
                                         ("init_lora_weights", "eva"), ("ensure_weight_tying", False)])
def test_config_allowlist_accepts_plain(layout_set, tmp_path, field, value):
    base, a0, a1, _ = layout_set
    ok = _copy_with_config(a1, tmp_path / "ok", **{field: value})
    merge_adapters([ok, a0], tmp_path / "m")
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert_weighted_sum(base, [a1, a0], [0.5, 0.5], tmp_path / "m", full=True)


# ------------------------------------------------------------------ 14. permissions
def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_respect_umask(layout_set, tmp_path, umask):
    """Modes as plain mkdir/open give them under the umask (0755/0644 under 022), not the 0700/0600
    of temporary files. (save_pretrained is no reference for files here: safetensors 0.x in this
    environment writes model.safetensors / adapter_model.safetensors 0600 whatever the umask.)"""
    base, a0, a1, _ = layout_set
    old = os.umask(umask)
    try:
        (tmp_path / "ref").mkdir()
        (tmp_path / "ref" / "f").write_text("x")
        base.save_pretrained(str(tmp_path / "base"))
        merge_adapters([a0, a1], tmp_path / "adapter")
        merge_adapters([a0, a1], tmp_path / "model", merge_into_base=True, base_model=tmp_path / "base")
    finally:
        os.umask(old)
    want = _modes(tmp_path / "ref")
    assert want == {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}
    assert _modes(tmp_path / "adapter") == want
    assert _modes(tmp_path / "model") == want


# ------------------------------------------------------------------ 11. unreadable inputs
def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 40])


def _hostile(p: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sd = load_file(str(p / "adapter_model.safetensors"))
    (p / "adapter_model.safetensors").unlink()
    torch.save({**sd, "x": Payload()}, p / "adapter_model.bin")


def _dir_for_file(p: Path) -> None:
    (p / "adapter_config.json").unlink()
    (p / "adapter_config.json").mkdir()


def _weights_dir(p: Path) -> None:
    (p / "adapter_model.safetensors").unlink()
    (p / "adapter_model.safetensors").mkdir()


UNREADABLE = {  # name: (damage the copy of adapter 1, the file the error must name)
    "truncated_safetensors": (lambda p, m: _truncate(p / "adapter_model.safetensors"), "adapter_model.safetensors"),
    "hostile_pickle": (_hostile, "adapter_model.bin"),
    "empty_safetensors": (lambda p, m: (p / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors"),
    "empty_bin": (lambda p, m: ((p / "adapter_model.safetensors").unlink(), (p / "adapter_model.bin").write_bytes(b"")),
                  "adapter_model.bin"),
    "empty_config": (lambda p, m: (p / "adapter_config.json").write_text(""), "adapter_config.json"),
    "garbage_config": (lambda p, m: (p / "adapter_config.json").write_text("{not json"), "adapter_config.json"),
    "config_is_dir": (lambda p, m: _dir_for_file(p), "adapter_config.json"),
    "weights_are_dir": (lambda p, m: _weights_dir(p), "adapter_model.safetensors"),
    "file_for_dir": (lambda p, m: (shutil.rmtree(p), p.write_text("x")), ""),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_adapter_inputs(layout_set, case, tmp_path, capsys):
    _, a0, a1, _ = layout_set
    bad = tmp_path / "bad"
    shutil.copytree(a1, bad)
    damage, name = UNREADABLE[case]
    marker = tmp_path / "MARKER"
    damage(bad, marker)
    out = tmp_path / "out"
    err = _run_failing(["merge", str(a0), str(bad), "--output", str(out)], out, capsys)
    assert "Traceback" not in err and str(bad / name).rstrip("/") in err, err
    assert not marker.exists()


@pytest.mark.parametrize("case", ["truncated_shard", "no_config", "garbage_index", "file_for_dir"])
def test_unreadable_base_model(layout_set, case, tmp_path, capsys):
    base, a0, a1, _ = layout_set
    b = tmp_path / "base"
    base.save_pretrained(str(b), max_shard_size="4KB")
    shard = sorted(b.glob("model-*.safetensors"))[0]
    name = {"truncated_shard": shard, "no_config": b / "config.json",
            "garbage_index": b / "model.safetensors.index.json", "file_for_dir": b}[case]
    if case == "file_for_dir":
        shutil.rmtree(b)
        b.write_text("not a model")
    elif case == "truncated_shard":
        _truncate(shard)
    elif case == "no_config":
        (b / "config.json").unlink()
    else:
        (b / "model.safetensors.index.json").write_text("[")
    out = tmp_path / "out"
    err = _run_failing(["merge", str(a0), str(a1), "--output", str(out), "--merge-into-base", "--base-model", str(b)],
                       out, capsys)
    assert "Traceback" not in err and str(name) in err, err
