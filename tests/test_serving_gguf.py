"""Serving through llama.cpp: ``poc-lora export``'s LoRA GGUF read back, refused where llama.cpp
cannot apply it, and (the ``llama_cpp`` group, run whenever llama-cpp-python is importable:
``pip install -e .[serve]``) loaded in llama.cpp itself and compared with PEFT on transformers.

The independent references: PEFT's own ``get_delta_weight`` and forward pass; llama.cpp's own
scale rule (``alpha / rank`` of each tensor) and row order for Llama's q/k (written here as an
index formula); llama.cpp's own ``convert_lora_to_gguf.py`` (the copy vendored in
llama-cpp-python's source distribution, found through ``$LLAMA_CPP_CONVERTERS``, the directory
holding it, which ``.ci/run`` unpacks) run as a subprocess; llama.cpp's forward pass.

The tiny model's word-level tokenizer is not one llama.cpp's ``convert_hf_to_gguf.py`` converts
(it knows SentencePiece and hashed BPE pre-tokenizers only), so its float32 base GGUF is written
here (:func:`write_llama_gguf`, llama.cpp's Llama layout) and token ids are fed to llama.cpp.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from test_merge import make_adapter, make_base

from poc_lora.cli import main
from poc_lora.errors import AdapterError, ConfigError
from poc_lora.merge import merge_adapters
from poc_lora.merge.gguf_export import export_gguf, export_merged_gguf
from poc_lora.models import load_model, load_tokenizer
from poc_lora.testing.tiny_model import build_tiny_model

gguf = pytest.importorskip("gguf", reason="the gguf package (the gguf / all extra) writes and reads GGUF files")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_test(test):
    """The ``llama_cpp`` group: runs when llama-cpp-python is importable, else skipped saying why."""
    skip = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install -e .[serve])")
    return pytest.mark.llama_cpp(skip(test))


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # llama.cpp's llama names
SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def llama_cpp_rows(n_rows: int, heads: int) -> list[int]:
    """For each row of llama.cpp's q/k layout, the Hugging Face row it holds: within a head of
    size d, llama.cpp's row 2i + j is HF's row j * d/2 + i (rotary halves interleaved)."""
    d = n_rows // heads
    return [h * d + (q % 2) * (d // 2) + q // 2 for h, q in (divmod(p, d) for p in range(n_rows))]


def read_gguf(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(fields, {tensor name: float32 array in numpy layout}) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(data, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
    return fields, tensors


def peft_deltas(base, adapter) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    return {n: m.get_delta_weight("default").double() for n, m in model.base_model.model.named_modules()
            if isinstance(m, LoraLayer)}


def llama_cpp_updates(path, config) -> dict[str, torch.Tensor]:
    """Each module's update as llama.cpp applies it (alpha / rank of the tensor * B @ A), rows put
    back in Hugging Face order, keyed by the HF module name."""
    fields, tensors = read_gguf(path)
    alpha = fields["adapter.lora.alpha"]
    back = {v: k for k, v in GGUF_NAMES.items()}
    out = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        stem = name[: -len(".weight.lora_a")]
        b = torch.from_numpy(tensors[stem + ".weight.lora_b"]).double()
        delta = alpha / b.shape[1] * b @ torch.from_numpy(a).double()
        _, layer, kind = stem.split(".")
        leaf = back[kind]
        if leaf in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if leaf == "q_proj" else config.num_key_value_heads
            rows = llama_cpp_rows(delta.shape[0], heads)
            delta = delta[torch.argsort(torch.tensor(rows))]  # llama.cpp row p holds HF row rows[p]
        part = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        out[f"model.layers.{layer}.{part}.{leaf}"] = delta
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small GQA Llama base (saved: its config.json names the architecture) and adapters."""
    root = tmp_path_factory.mktemp("export")
    base = make_base(**SMALL)
    base.config.architectures = ["LlamaForCausalLM"]
    base.save_pretrained(root / "base")
    ads = {
        "plain": make_adapter(root / "plain", base, 1, r=4, lora_alpha=8, target_modules=ALL),
        "patterns": make_adapter(root / "patterns", base, 2, r=4, lora_alpha=8, use_rslora=True, target_modules=ALL,
                                 rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 32}),
    }
    return base, root, ads


@pytest.mark.parametrize("name", ["plain", "patterns"])
def test_export_metadata_and_the_update_llama_cpp_applies_equal_peft(small, name, tmp_path):
    base, root, ads = small
    out = export_gguf(ads[name], tmp_path / "a.gguf", base_model=str(root / "base"))
    fields, tensors = read_gguf(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    want = {f"blk.{i}.{GGUF_NAMES[m]}.weight.lora_{p}" for i in range(2) for m in ALL for p in "ab"}
    assert set(tensors) == want
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 64)  # A (r, in), B (out, r): PEFT's layout
    assert tensors["blk.1.attn_k.weight.lora_b"].shape == (32, 2 if name == "patterns" else 4)
    got, ref = llama_cpp_updates(out, base.config), peft_deltas(base, ads[name])
    assert set(got) == set(ref)
    for module, delta in ref.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-5, atol=1e-6, msg=module)


@pytest.mark.parametrize("outtype,a_type", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_outtypes(small, outtype, a_type, tmp_path):
    base, root, ads = small
    out = export_gguf(ads["plain"], tmp_path / "a.gguf", outtype=outtype, base_model=str(root / "base"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == a_type  # rows of 64
    # B's rows (rank 4) are no multiple of Q8_0's block of 32: f16, as llama.cpp's converter does
    assert types["blk.0.attn_q.weight.lora_b"] == ("F16" if outtype == "q8_0" else a_type)
    ref, got = peft_deltas(base, ads["plain"]), llama_cpp_updates(out, base.config)
    for module, delta in ref.items():
        assert (got[module] - delta).abs().max() <= 0.02 * delta.abs().max(), module


REFUSED = {
    "embedding": (dict(target_modules=["q_proj", "embed_tokens"]), "model.embed_tokens"),
    "lm_head": (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
    "modules_to_save": (dict(target_modules=["q_proj"], modules_to_save=["model.norm"]), "model.norm"),
    "lora_bias": (dict(target_modules=["q_proj", "v_proj"], lora_bias=True), "self_attn.q_proj"),
    "bias_all": (dict(target_modules=["q_proj"], bias="all"), r"self_attn.k_proj.bias"),  # on a base with biases
    "dora": (dict(target_modules=["q_proj"], use_dora=True), "use_dora"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_llama_cpp_cannot_apply_is_refused_naming_the_module(small, case, tmp_path, capsys):
    base, root, _ = small
    kwargs, named = REFUSED[case]
    if case == "bias_all":
        base = make_base(**SMALL, attention_bias=True)
    ad = make_adapter(tmp_path / "ad", base, 5, r=4, lora_alpha=8, **kwargs)
    with pytest.raises(AdapterError, match=named.replace(".", r"\.")):
        export_gguf(ad, tmp_path / "a.gguf", base_model=str(root / "base"))
    assert not (tmp_path / "a.gguf").exists()
    assert main(["export", str(ad), "--output", str(tmp_path / "b.gguf"), "--base_model", str(root / "base")]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "b.gguf").exists()


def test_an_architecture_without_a_checked_mapping_is_refused(tmp_path):
    gpt2 = make_base("gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    ad = make_adapter(tmp_path / "ad", gpt2, 1, r=2, target_modules=["c_attn"])
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        export_gguf(ad, tmp_path / "a.gguf", base_model=str(tmp_path / "gpt2"))


def test_cli_export_writes_and_refuses_overwrite(small, tmp_path, capsys):
    _, root, ads = small
    args = ["export", str(ads["plain"]), "--format", "gguf", "--output", str(tmp_path / "a.gguf"),
            "--base_model", str(root / "base")]
    assert main(args) == 0 and (tmp_path / "a.gguf").is_file()
    assert main(args) == 1 and "already exists" in capsys.readouterr().err
    # --merge_into_base needs the base as a GGUF file: a Hugging Face directory is refused, saying so
    assert main([*args, "--merge_into_base", "--output", str(tmp_path / "m.gguf")]) == 1
    assert "FILE.gguf" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("into_base", [False, True])
def test_export_without_the_gguf_package_is_a_clear_error(small, tmp_path, capsys, monkeypatch, into_base):
    _, root, ads = small
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    args = ["export", str(ads["plain"]), "--format", "gguf", "--output", str(tmp_path / "a.gguf"),
            "--base_model", str(root / "base"), *(["--merge_into_base"] if into_base else [])]
    assert main(args) == 1
    assert "needs the gguf package" in capsys.readouterr().err and not (tmp_path / "a.gguf").exists()


# ------------------------------------------------------------------ inside llama.cpp itself
def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """A Hugging Face Llama directory as a float32 llama.cpp GGUF: llama.cpp's tensor names and
    q/k row order, its hyperparameter keys, and the vocabulary as a token list (ids are fed to
    llama.cpp directly, so its text tokenizer never runs)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    sd = load_file(model_dir / "model.safetensors")
    tok = load_tokenizer(str(model_dir))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    heads, kv_heads, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    w = gguf.GGUFWriter(out, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(rope))
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_vocab_size(len(vocab))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_scores([0.0] * len(vocab))
    special = {tok.unk_token_id: gguf.TokenType.UNKNOWN, tok.bos_token_id: gguf.TokenType.CONTROL,
               tok.eos_token_id: gguf.TokenType.CONTROL, tok.pad_token_id: gguf.TokenType.CONTROL}
    w.add_token_types([special.get(i, gguf.TokenType.NORMAL) for _, i in vocab])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for key, t in sd.items():
        t = t.float()
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            t = t[llama_cpp_rows(t.shape[0], heads if "q_proj" in key else kv_heads)]
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llama_logits(base_gguf, lora, ids: list[int], n_ctx: int = 128) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(base_gguf), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=n_ctx,
                n_ubatch=n_ctx, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


PROMPTS = ["Please choose the correct answer to the question : which is red ?",
           "the correct answer is answer1 . Answer format : true / false",
           "### Instruction : solve the problem ### Response : the correct answer is"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama (random weights) as a model directory and a float32 GGUF; adapters of mixed
    rank and alpha (one with a prompt-template record), their PoC merge and an SVD-truncated merge,
    each exported."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    tiny_dir = build_tiny_model(root / "tiny")
    base = load_model(str(tiny_dir), "float32").eval()
    dirs = {
        "single": make_adapter(root / "single", base, 1, r=4, lora_alpha=8, target_modules=ALL),
        "r8": make_adapter(root / "r8", base, 2, r=8, lora_alpha=4, target_modules=ALL),
    }
    (dirs["single"] / "poc_lora_template.json").write_text(json.dumps({"prompt_template": "alpaca"}))
    merge_adapters([dirs["single"], dirs["r8"]], root / "poc")
    merge_adapters([dirs["single"], dirs["r8"]], root / "svd", method="svd", rank=3)
    dirs.update(poc=root / "poc", svd=root / "svd")
    ggufs = {k: export_gguf(d, root / f"{k}.gguf") for k, d in dirs.items()}
    tok = load_tokenizer(str(tiny_dir))
    return dict(root=root, dir=tiny_dir, base=base, gguf=write_llama_gguf(tiny_dir, root / "tiny.f32.gguf"),
                dirs=dirs, ggufs=ggufs, tok=tok, ids=[tok(p)["input_ids"] for p in PROMPTS])


@pytest.mark.parametrize("name", ["single", "poc", "svd"])
@llama_cpp_test
def test_llama_cpp_next_token_logprobs_equal_peft(tiny, name):
    """llama.cpp (f32 base GGUF + exported LoRA, f32 KV cache) against PEFT on transformers in
    float32, both measured against PEFT in float64: llama.cpp is as close as float32 rounding lets
    transformers itself be (a wrong row order or scale would be off by whole units)."""
    model = PeftModel.from_pretrained(copy.deepcopy(tiny["base"]), str(tiny["dirs"][name])).eval()
    model64 = copy.deepcopy(model).double()
    err = {"llama.cpp": 0.0, "transformers f32": 0.0, "llama.cpp vs f32": 0.0, "effect": 0.0}
    for ids in tiny["ids"]:
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=x).logits[0].double(), -1).numpy()
            exact = torch.log_softmax(model64(input_ids=x).logits[0], -1).numpy()
            effect_ref = (model(input_ids=x).logits[0] - tiny["base"](input_ids=x).logits[0]).double().numpy()
        logits = llama_logits(tiny["gguf"], tiny["ggufs"][name], ids)
        got = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
        assert (got.argmax(-1) == ref.argmax(-1)).all()  # identical top-1 at every position
        err["llama.cpp"] = max(err["llama.cpp"], float(np.abs(got - exact).max()))
        err["transformers f32"] = max(err["transformers f32"], float(np.abs(ref - exact).max()))
        err["llama.cpp vs f32"] = max(err["llama.cpp vs f32"], float(np.abs(got - ref).max()))
        # the adapter's effect on the logits (with minus without adapter), relative to its size
        effect = logits - llama_logits(tiny["gguf"], None, ids)
        err["effect"] = max(err["effect"], float(np.abs(effect - effect_ref).max() / np.abs(effect_ref).max()))
    print(f"{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
    assert err["llama.cpp"] <= 10 * err["transformers f32"] + 1e-6
    assert err["llama.cpp vs f32"] < 5e-4 and err["effect"] < 5e-5


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@llama_cpp_test
def test_merged_model_gguf_equals_base_plus_lora(tiny, outtype, tmp_path):
    """--merge_into_base: the base GGUF with the PoC merge folded in, run by llama.cpp, against
    PEFT (f32: float32 rounding; q8_0: the adapted tensors quantized) and llama.cpp's base + LoRA."""
    merged = export_merged_gguf(tiny["dirs"]["poc"], tmp_path / "m.gguf", outtype=outtype, base_model=str(tiny["gguf"]))
    fields, _ = read_gguf(merged)
    assert fields["tokenizer.ggml.tokens"][:4] == ["<unk>", "<pad>", "<s>", "</s>"] and "general.type" not in fields
    model = PeftModel.from_pretrained(copy.deepcopy(tiny["base"]), str(tiny["dirs"]["poc"])).eval()
    worst, effect = 0.0, 0.0
    for ids in tiny["ids"]:
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()
        got = torch.log_softmax(torch.from_numpy(llama_logits(merged, None, ids)), -1).numpy()
        lora = torch.log_softmax(torch.from_numpy(llama_logits(tiny["gguf"], tiny["ggufs"]["poc"], ids)), -1).numpy()
        plain = torch.log_softmax(torch.from_numpy(llama_logits(tiny["gguf"], None, ids)), -1).numpy()
        worst = max(worst, float(np.abs(got - ref).max()))
        effect = max(effect, float(np.abs(plain - ref).max()))  # what the merge changes
        if outtype == "f32":
            assert (got.argmax(-1) == ref.argmax(-1)).all() and np.abs(got - lora).max() < 5e-4
    print(f"merged model ({outtype}): max |log p llama.cpp - log p PEFT| = {worst:.2e} (the merge moves log p "
          f"by up to {effect:.1f})")
    if outtype == "f32":
        assert worst < 5e-4
        return
    # q8_0: llama.cpp also rounds the activations to 8 bits in these matmuls, and this tiny model's
    # random adapters are huge, so the logits are compared loosely; the file itself is checked
    # exactly: each adapted tensor is W + PEFT's update (llama.cpp's row order) to 8-bit rounding
    _, base_t = read_gguf(tiny["gguf"])
    _, merged_t = read_gguf(merged)
    heads = {"q_proj": tiny["base"].config.num_attention_heads, "k_proj": tiny["base"].config.num_key_value_heads}
    for module, delta in peft_deltas(tiny["base"], tiny["dirs"]["poc"]).items():
        _, _, layer, _, leaf = module.split(".")
        name = f"blk.{layer}.{GGUF_NAMES[leaf]}.weight"
        if leaf in heads:
            delta = delta[llama_cpp_rows(delta.shape[0], heads[leaf])]
        want = base_t[name] + delta.float().numpy()
        assert np.abs(merged_t[name] - want).max() <= np.abs(want).max() / 100, name
    assert worst < effect


def converter_script() -> Path | None:
    """llama.cpp's convert_lora_to_gguf.py: $LLAMA_CPP_CONVERTERS (the directory holding it, e.g.
    the unpacked llama-cpp-python sdist's vendor/llama.cpp)."""
    where = os.environ.get("LLAMA_CPP_CONVERTERS")
    script = Path(where) / "convert_lora_to_gguf.py" if where else None
    return script if script and script.is_file() else None


@pytest.mark.parametrize("name,outtype", [("single", "f32"), ("poc", "f32"), ("svd", "f32"), ("poc", "q8_0"),
                                          ("single", "f16")])
@llama_cpp_test
def test_tensor_by_tensor_equal_to_llama_cpp_converter(tiny, name, outtype, tmp_path):
    script = converter_script()
    if script is None:
        pytest.skip("llama.cpp's convert_lora_to_gguf.py not found: set LLAMA_CPP_CONVERTERS (.ci/run does)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), str(script.parent / "gguf-py")]),
           "HF_HUB_OFFLINE": "1"}
    theirs = tmp_path / "theirs.gguf"
    ours = tiny["ggufs"][name] if outtype == "f32" else export_gguf(tiny["dirs"][name], tmp_path / "o.gguf",
                                                                     outtype=outtype)
    run = subprocess.run([sys.executable, str(script), "--base", str(tiny["dir"]), "--outtype", outtype,
                          "--outfile", str(theirs), str(tiny["dirs"][name])], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    f_theirs, t_theirs = read_gguf(theirs)
    f_ours, t_ours = read_gguf(ours)
    types = [{t.name: t.tensor_type.name for t in gguf.GGUFReader(f).tensors} for f in (ours, theirs)]
    assert types[0] == types[1]
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert f_ours[key] == f_theirs[key], key
    assert sorted(t_ours) == sorted(t_theirs)
    for key in t_theirs:
        assert t_ours[key].shape == t_theirs[key].shape, key
        np.testing.assert_array_equal(t_ours[key], t_theirs[key], err_msg=key)


@pytest.mark.parametrize("mode", ["choice", "rank"])
@llama_cpp_test
def test_eval_engine_llama_cpp_scores_equal_peft(tiny, mode, tmp_path):
    from eval_harness import evaluate
    from poc_lora.data.synthetic import write_synthetic_commonsense

    data = write_synthetic_commonsense(tmp_path / "data", train_per_suite=1, test_per_suite=5)
    common = dict(data_dir=data, tasks="ARC-Easy,boolq,winogrande", mode=mode, include_base=True)
    ref = evaluate(str(tiny["dir"]), [tiny["dirs"]["single"]], [tiny["dirs"]["poc"]], output=tmp_path / "peft", **common)
    got = evaluate(str(tiny["gguf"]), [tiny["ggufs"]["single"]], [tiny["ggufs"]["poc"]], output=tmp_path / "llama",
                   engine="llama.cpp", tokenizer=str(tiny["dir"]), **common)
    keys = dict(zip(got.models, ref.models))  # base, single, poc in the same order
    assert len(keys) == 3 and got.models["single"].template == ref.models["single"].template == "alpaca"
    worst = 0.0
    for k_got, k_ref in keys.items():
        for suite in ("ARC-Easy", "boolq", "winogrande"):
            rows = [json.loads(line) for line in (tmp_path / "llama" / k_got / suite / "predictions.jsonl").open()]
            refs = [json.loads(line) for line in (tmp_path / "peft" / k_ref / suite / "predictions.jsonl").open()]
            for row, r in zip(rows, refs, strict=True):
                assert row["prompt_sha256"] == r["prompt_sha256"] and row["prediction"] == r["prediction"]
                for label, value in r["scores"].items():
                    worst = max(worst, abs(row["scores"][label] - value))
                    assert row["scores"][label] == pytest.approx(value, abs=1e-3, rel=1e-5)
        assert got.models[k_got].average == ref.models[k_ref].average
    print(f"{mode}: max |score llama.cpp - score PEFT| = {worst:.2e}")


@llama_cpp_test
def test_eval_engine_llama_cpp_refuses_generate_and_adapter_directories(tiny, tmp_path):
    from eval_harness import evaluate
    from poc_lora.data.synthetic import write_synthetic_commonsense

    data = write_synthetic_commonsense(tmp_path / "data", train_per_suite=1, test_per_suite=2)
    with pytest.raises(ConfigError, match="log-likelihoods"):
        evaluate(str(tiny["gguf"]), data_dir=data, output=tmp_path / "o", tasks="boolq", mode="generate",
                 engine="llama.cpp", tokenizer=str(tiny["dir"]))
    with pytest.raises(AdapterError, match="LoRA GGUF"):
        evaluate(str(tiny["gguf"]), [tiny["dirs"]["single"]], data_dir=data, output=tmp_path / "o", tasks="boolq",
                 mode="rank", engine="llama.cpp", tokenizer=str(tiny["dir"]))


def test_gguf_model_keys_are_unique_like_the_transformers_engines(tiny, tmp_path):
    """Two LoRA GGUF files of one name in different folders: each key is an output directory, so
    the second must not take the first's (needs only the gguf package, not llama.cpp)."""
    import shutil

    from eval_harness.llama_cpp import gguf_model_specs

    copies = []
    for folder in ("run1", "run2"):
        (tmp_path / folder).mkdir()
        copies.append(shutil.copy(tiny["ggufs"]["poc"], tmp_path / folder / "poc.gguf"))
    specs = gguf_model_specs(str(tiny["gguf"]), [tiny["ggufs"]["single"]], copies, None, True)
    assert [s.key for s in specs] == ["tiny.f32", "single", "poc", "poc-2"]
    assert [s.adapter for s in specs[2:]] == [Path(c) for c in copies]


# ------------------------------------------------------------------ SmolLM2 (the real base)
def dequantized_gguf(src: Path, out: Path) -> Path:
    """``src`` with every tensor dequantized to float32 (gguf-py's dequantizer, the one transformers'
    GGUF loader uses, so llama.cpp and transformers hold the same weights), metadata copied."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out, arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = int(gguf.LlamaFileType.ALL_F32) if name == "general.file_type" else f.contents()
        w.add_key_value(name, value, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        w.add_tensor(t.name, np.asarray(data, np.float32).reshape(tuple(int(x) for x in reversed(t.shape))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


SMOL_PROMPTS = ["Question: Which is a metal?\nAnswer: iron", "The capital of France is",
                "Please choose the correct answer to the question: Do fish swim?\n\nAnswer format: true/false"]


@pytest.mark.slow
@llama_cpp_test
def test_smollm2_poc_merge_in_llama_cpp_equals_peft_and_q4_1_tracks_it(tmp_path):
    """SmolLM2-135M-Instruct: the shipped Q4_1 GGUF dequantized to a float32 GGUF (llama.cpp) and
    to a float32 model directory (transformers, poc_lora.gguf); a PoC merge of a rank-4 and a
    rank-8 adapter, exported. Float32: llama.cpp equals PEFT to float32 rounding. Q4_1, as users
    deploy: the adapter's effect on the logits still correlates with PEFT's, top-1 mostly agrees."""
    from poc_lora.models import SMOLLM2_MODEL_ID, resolve_model_path, smollm2_gguf_file

    try:
        q4 = smollm2_gguf_file()
    except ConfigError as exc:
        pytest.skip(str(exc))
    base_dir = resolve_model_path(SMOLLM2_MODEL_ID)
    base = load_model(base_dir, "float32").eval()
    tok = load_tokenizer(base_dir)
    # small random adapters (std 0.02: a logit effect of about one unit, a trained adapter's size)
    merge_adapters([make_adapter(tmp_path / f"a{r}", base, r, std=0.02, r=r, lora_alpha=2 * r, target_modules=ALL)
                    for r in (4, 8)], tmp_path / "poc")
    lora = export_gguf(tmp_path / "poc", tmp_path / "poc.gguf")
    f32 = dequantized_gguf(q4, tmp_path / "smollm2.f32.gguf")
    model = PeftModel.from_pretrained(base, str(tmp_path / "poc")).eval()
    lines = []
    for ids in (tok(p)["input_ids"] for p in SMOL_PROMPTS):
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = model(input_ids=x).logits[0].double().numpy()
            with model.disable_adapter():
                effect_ref = ref - model(input_ids=x).logits[0].double().numpy()
        got = llama_logits(f32, lora, ids)
        diff = np.abs(torch.log_softmax(torch.from_numpy(got), -1).numpy() -
                      torch.log_softmax(torch.from_numpy(ref), -1).numpy()).max()
        effect = got - llama_logits(f32, None, ids)
        rel = np.abs(effect - effect_ref).max() / np.abs(effect_ref).max()
        assert (got.argmax(-1) == ref.argmax(-1)).all() and diff < 2e-3 and rel < 1e-3
        served = llama_logits(q4, lora, ids)
        served_effect = served - llama_logits(q4, None, ids)
        corr = np.corrcoef(served_effect.ravel(), effect_ref.ravel())[0, 1]
        top1 = (served.argmax(-1) == ref.argmax(-1)).mean()
        lines.append(f"{len(ids)} tokens: f32 max |dlog p| {diff:.1e}, effect rel {rel:.1e} (max {np.abs(effect_ref).max():.2f}); "
                     f"Q4_1 effect corr {corr:.4f}, top-1 agreement {top1:.0%}")
    print("\n".join(lines))
    assert min(float(line.split("corr ")[1].split(",")[0]) for line in lines) > 0.3  # a small random effect; trained: ~0.99
