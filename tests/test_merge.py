"""PoC merge against PEFT as the independent reference.

Adapters are made with real PEFT on tiny Llama / GPT-2 models (lora_B randomised with a
seeded generator, since PEFT starts B at 0), merged, and loaded back with
``PeftModel.from_pretrained``: every adapted module must add the weighted sum of what the
input adapters' modules add.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from poc_lora.cli import main
from poc_lora.merge import merge_adapters

LLAMA = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)


def make_base(kind: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=48, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)).eval()
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).eval()


def make_adapter(path: Path, base, seed: int, std: float = 0.5, **lora_kwargs) -> Path:
    """Save a PEFT adapter whose trainable tensors are random (seeded, standard deviation ``std``),
    not PEFT's zero B."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(str(path))
    return path


def module_names(peft_model) -> list[str]:
    """Names (relative to the base model) of PEFT's LoRA layers and modules_to_save wrappers."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    inner = peft_model.base_model.model
    return [n for n, m in inner.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]


def module_outputs(model, names: list[str], seed: int = 1) -> dict[str, torch.Tensor]:
    """Each named module's output on fixed random inputs (token ids for embeddings)."""
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name in names:
            mod = inner.get_submodule(name)
            base = getattr(mod, "base_layer", None) or getattr(mod, "original_module", None) or mod
            if isinstance(base, torch.nn.Embedding):
                x = torch.randint(0, base.num_embeddings, (5, 3), generator=gen)
            else:
                n_in = base.weight.shape[0] if type(base).__name__ == "Conv1D" else base.weight.shape[1]
                x = torch.randn(5, n_in, generator=gen)
            out[name] = mod(x)
    return out


def load(base, adapter_dir: Path) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


def assert_weighted_sum(base, inputs: list[Path], weights: list[float], merged: Path, full: bool = False):
    """merged module output - base output == sum_j w_j (input_j output - base output); with
    ``full`` (weights summing to 1, bias/modules_to_save present) the outputs themselves match."""
    merged_model = load(base, merged)
    names = module_names(merged_model)
    assert names
    ref = module_outputs(base, names)
    got = module_outputs(merged_model, names)
    outs = [module_outputs(load(base, d), names) for d in inputs]
    for name in names:
        if full:
            expected = sum(w * o[name] for w, o in zip(weights, outs))
            actual = got[name]
        else:
            expected = sum(w * (o[name] - ref[name]) for w, o in zip(weights, outs))
            actual = got[name] - ref[name]
        err = (actual - expected).norm() / expected.norm()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llama_set(tmp_path_factory):
    """Three adapters: different r/alpha, rsLoRA, rank_pattern/alpha_pattern, embedding LoRA."""
    root = tmp_path_factory.mktemp("llama_set")
    base = make_base()
    targets = ["q_proj", "v_proj", "embed_tokens"]
    dirs = [
        make_adapter(root / "in" / "a0", base, 10, r=2, lora_alpha=4, target_modules=targets),
        make_adapter(root / "in" / "a1", base, 11, r=4, lora_alpha=3, use_rslora=True, target_modules=targets),
        make_adapter(root / "in" / "a2", base, 12, r=3, lora_alpha=7, target_modules=targets,
                     rank_pattern={"v_proj": 5}, alpha_pattern={"q_proj": 11}),
    ]
    return base, dirs, root


@pytest.mark.parametrize("weights", [None, [0.7, -0.4, 1.1]])
def test_poc_matches_weighted_sum_of_input_modules(llama_set, weights):
    base, dirs, root = llama_set
    out = root / f"poc_{'default' if weights is None else 'neg'}"
    before = {d.name: tree_hash(d) for d in dirs}
    report = merge_adapters(dirs, out, weights=weights)
    assert_weighted_sum(base, dirs, weights or [1 / 3] * 3, out)
    assert {d.name: tree_hash(d) for d in dirs} == before  # inputs untouched
    saved = json.loads((out / "merge_report.json").read_text())
    weight_bytes = (dirs[0] / "adapter_model.safetensors").read_bytes()
    assert saved["inputs"][0]["sha256"] == hashlib.sha256(weight_bytes).hexdigest()
    assert saved["output_ranks"]["model.layers.0.self_attn.v_proj"] == 2 + 4 + 5
    assert report.to_dict()["method"] == "poc"


def test_directory_of_adapters_and_norms_against_dense(llama_set):
    """A parent directory stands for its adapters; norms/spread equal those of dense dW."""
    base, dirs, root = llama_set
    report = merge_adapters(root / "in", root / "from_parent")
    dense = [dense_updates(d) for d in dirs]
    name = "model.layers.1.self_attn.q_proj"
    norms = [dw[name].norm().item() for dw in dense]
    assert report.modules[name]["norm_dW"] == pytest.approx(norms, rel=1e-5)
    merged = sum(dw[name] for dw in dense) / 3
    assert report.modules[name]["norm_merged"] == pytest.approx(merged.norm().item(), rel=1e-5)
    pair = [(dense[i][name] - dense[j][name]).norm() / (norms[i] ** 2 + norms[j] ** 2) ** 0.5
            for i in range(3) for j in range(i + 1, 3)]
    assert report.modules[name]["spread"] == pytest.approx(float(sum(pair) / 3), rel=1e-4)


def dense_updates(adapter: Path) -> dict[str, torch.Tensor]:
    """s * B @ A per module straight from the files, with PEFT's documented scale rule."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in sd.items():
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suffix):
                prefix = key[: -len(a_suffix)]
                name = prefix.removeprefix("base_model.model.")
                r = a.shape[0]
                short = name.split(".")[-1]
                alpha = cfg["alpha_pattern"].get(short, cfg["lora_alpha"])
                s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
                out[name] = s * sd[prefix + b_suffix].double() @ a.double()
    return out


def test_identity_one_adapter_weight_one(llama_set, tmp_path):
    base, dirs, _ = llama_set
    merge_adapters([dirs[1]], tmp_path / "one", weights=[1.0])  # the rsLoRA one
    want = load(base, dirs[1])
    names = module_names(want)
    got, ref = module_outputs(load(base, tmp_path / "one"), names), module_outputs(want, names)
    for n in names:
        assert torch.allclose(got[n], ref[n], rtol=1e-5, atol=1e-6), n


def test_logits_equal_base_plus_averaged_update_by_hand(llama_set):
    base, dirs, root = llama_set
    out = root / "poc_logits"
    merge_adapters(dirs, out)
    by_hand = copy.deepcopy(base)
    updates = [dense_updates(d) for d in dirs]
    with torch.no_grad():
        for name in updates[0]:
            dw = sum(u[name] for u in updates) / 3
            w = by_hand.get_submodule(name).weight
            w += (dw.T if "embed" in name else dw).to(w.dtype)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = by_hand(ids).logits
        got = load(base, out)(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 1e-5


def test_equals_peft_add_weighted_adapter_cat(llama_set, tmp_path):
    """PEFT's cat merge is right for plain (non-rsLoRA, bias-free) adapters with positive weights."""
    base, dirs, _ = llama_set
    plain = [dirs[0], dirs[2]]
    merge_adapters(plain, tmp_path / "ours", weights=[0.25, 0.75])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(plain[0]), adapter_name="a0")
    peft_model.load_adapter(str(plain[1]), adapter_name="a2")
    peft_model.add_weighted_adapter(["a0", "a2"], [0.25, 0.75], "cat", combination_type="cat")
    peft_model.set_adapter("cat")
    peft_model.eval()
    names = module_names(peft_model)
    theirs, ours = module_outputs(peft_model, names), module_outputs(load(base, tmp_path / "ours"), names)
    for n in names:
        assert torch.allclose(ours[n], theirs[n], rtol=1e-5, atol=1e-5), n


def test_bias_lora_bias_and_modules_to_save(tmp_path):
    base = make_base(attention_bias=True)
    kw = dict(target_modules=["q_proj", "v_proj"], lora_bias=True, bias="lora_only", modules_to_save=["lm_head"])
    dirs = [make_adapter(tmp_path / f"b{j}", base, 20 + j, r=2 + j, lora_alpha=5, use_rslora=bool(j), **kw)
            for j in range(2)]
    merge_adapters(dirs, tmp_path / "merged", weights=[0.3, 0.7])
    assert_weighted_sum(base, dirs, [0.3, 0.7], tmp_path / "merged", full=True)
    merge_adapters(dirs[1:], tmp_path / "identity", weights=[1.0])
    assert_weighted_sum(base, dirs[1:], [1.0], tmp_path / "identity", full=True)


def test_gpt2_conv1d_fan_in_fan_out_bias_all(tmp_path):
    base = make_base("gpt2")
    kw = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="all")
    dirs = [make_adapter(tmp_path / f"g{j}", base, 30 + j, r=2 + j, lora_alpha=4, **kw) for j in range(2)]
    merge_adapters(dirs, tmp_path / "merged")
    assert_weighted_sum(base, dirs, [0.5, 0.5], tmp_path / "merged", full=True)


def test_svd_error_is_optimal_truncation(llama_set):
    base, dirs, root = llama_set
    k = 3
    report = merge_adapters(dirs, root / "svd", method="svd", rank=k)
    merged_sd = load_file(str(root / "svd" / "adapter_model.safetensors"))
    updates = [dense_updates(d) for d in dirs]
    tot_err = tot = 0.0
    for name in updates[0]:
        dw = sum(u[name] for u in updates) / 3
        s = torch.linalg.svdvals(dw)
        opt = s[k:].square().sum()
        tot_err, tot = tot_err + opt, tot + s.square().sum()
        assert report.modules[name]["rel_error"] == pytest.approx(float((opt / s.square().sum()).sqrt()), rel=1e-5)
        key = "base_model.model." + name + (".lora_embedding_" if "embed" in name else ".lora_")
        a_key, b_key = (key + "A", key + "B") if "embed" in name else (key + "A.weight", key + "B.weight")
        written = merged_sd[b_key].double() @ merged_sd[a_key].double()  # scale 1 in the output
        assert merged_sd[a_key].shape[0] == k
        assert float((written - dw).norm() ** 2) == pytest.approx(float(opt), rel=1e-4)
    assert report.overall["rel_error"] == pytest.approx(float((tot_err / tot).sqrt()), rel=1e-5)
    assert_loads(base, root / "svd")


def assert_loads(base, adapter: Path) -> None:
    model = load(base, adapter)
    ids = torch.arange(6).reshape(1, 6)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_prune_reproducible_and_unbiased(tmp_path):
    base = make_base(num_hidden_layers=1)
    dirs = [make_adapter(tmp_path / f"p{j}", base, 40 + j, r=4, lora_alpha=8, target_modules=["q_proj"])
            for j in range(2)]
    name = "model.layers.0.self_attn.q_proj"
    dw = sum(dense_updates(d)[name] for d in dirs) / 2

    def pruned(seed: int, out: Path) -> torch.Tensor:
        merge_adapters(dirs, out, method="prune", rank=3, seed=seed)
        sd = load_file(str(out / "adapter_model.safetensors"))
        key = f"base_model.model.{name}.lora_"
        return sd[key + "B.weight"].double() @ sd[key + "A.weight"].double()

    first = pruned(0, tmp_path / "s0")
    assert torch.equal(first, pruned(0, tmp_path / "s0_again"))
    assert (tmp_path / "s0" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "s0_again" / "adapter_model.safetensors").read_bytes()
    draws = [pruned(s, tmp_path / f"s{s}x") for s in range(1, 61)]
    single = sum(float((d - dw).norm()) for d in draws) / len(draws)
    mean_err = float((sum(draws) / len(draws) - dw).norm())
    assert mean_err < 0.35 * single  # error of the mean falls like 1/sqrt(draws): unbiased


def test_soup_is_the_product_of_averages(llama_set):
    base, dirs, root = llama_set
    plain = [dirs[0], make_adapter(root / "soup_in", base, 13, r=2, lora_alpha=4,
                                   target_modules=["q_proj", "v_proj", "embed_tokens"])]
    merge_adapters(plain, root / "soup", method="soup")
    sds = [load_file(str(d / "adapter_model.safetensors")) for d in plain]
    got = load_file(str(root / "soup" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    want = (sum(sd[key + "B.weight"] for sd in sds) / 2 * 2.0) @ (sum(sd[key + "A.weight"] for sd in sds) / 2)
    assert torch.allclose(got[key + "B.weight"] @ got[key + "A.weight"], want, rtol=1e-5, atol=1e-6)


def test_merge_into_base_matches_peft_merge_and_unload(llama_set, tmp_path):
    base, dirs, root = llama_set
    base_dir = tmp_path / "base"
    base.save_pretrained(str(base_dir), max_shard_size="20KB")
    assert (base_dir / "model.safetensors.index.json").exists()
    merge_adapters(dirs, root / "poc_for_base", overwrite=True)
    rc = main(["merge", *map(str, dirs), "--output", str(tmp_path / "full"), "--merge-into-base",
               "--base-model", str(base_dir)])
    assert rc == 0
    assert len(list((tmp_path / "full").glob("*.safetensors"))) == len(list(base_dir.glob("*.safetensors")))
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).eval()
    theirs = load(base, root / "poc_for_base").merge_and_unload()
    for (n, p), (n2, q) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert n == n2 and torch.allclose(p, q, rtol=1e-5, atol=1e-6), n


# ------------------------------------------------------------------ validation (CLI)
def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _nan_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(sd, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def _hostile_bin(src: Path, dst: Path, marker: Path) -> Path:
    import os  # noqa: F401  (the pickle below names os.system)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    sd = load_file(str(src / "adapter_model.safetensors"))
    torch.save({**sd, "evil": Evil()}, dst / "adapter_model.bin")
    return dst


VALIDATION_CASES = {
    "not_lora": (lambda a, t: [_edit_config(a[0], t / "x", peft_type="IA3"), a[1]], [], "peft_type"),
    "dora": (lambda a, t: [a[0], _edit_config(a[1], t / "x", use_dora=True)], [], "use_dora"),
    "kasa": (lambda a, t: [_edit_config(a[0], t / "x", kasa_config={"r": 2}), a[1]], [], "kasa_config"),
    "base": (lambda a, t: [a[0], _edit_config(a[1], t / "x", base_model_name_or_path="other/model")], [],
             "base_model_name_or_path"),
    "task_type": (lambda a, t: [a[0], _edit_config(a[1], t / "x", task_type="SEQ_CLS")], [], "task_type"),
    "targets": (lambda a, t: [a[0], a[2]], [], "model.layers.0.self_attn.k_proj"),
    "shapes": (lambda a, t: [a[0], a[3]], [], "model.layers.0.self_attn.q_proj"),
    "nan": (lambda a, t: [a[0], _nan_copy(a[1], t / "x")], [], "v_proj.lora_B.weight"),
    "n_weights": (lambda a, t: a[:2], ["--weights", "0.5,0.3,0.2"], "3 weights for 2 adapters"),
    "rank": (lambda a, t: a[:2], ["--method", "svd", "--rank", "9"], "total rank 4"),
}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    base, wide = make_base(num_hidden_layers=1), make_base(num_hidden_layers=1, hidden_size=8)
    kw = dict(r=2, lora_alpha=2)
    return [
        make_adapter(root / "s0", base, 1, target_modules=["q_proj", "v_proj"], **kw),
        make_adapter(root / "s1", base, 2, target_modules=["q_proj", "v_proj"], **kw),
        make_adapter(root / "s2", base, 3, target_modules=["q_proj", "v_proj", "k_proj"], **kw),
        make_adapter(root / "s3", wide, 4, target_modules=["q_proj", "v_proj"], **kw),
    ]


def _run_failing(argv: list[str], out: Path, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert err.strip().splitlines()[-1].startswith("error: ")  # after any progress bar
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dirs
    return err


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
def test_validation_errors(case, small_set, tmp_path, capsys):
    make_inputs, extra, needle = VALIDATION_CASES[case]
    inputs = make_inputs(small_set, tmp_path)
    before = [tree_hash(p) for p in inputs]
    out = tmp_path / "out"
    err = _run_failing(["merge", *map(str, inputs), "--output", str(out), *extra], out, capsys)
    assert needle in err
    if case not in ("n_weights", "rank"):
        assert str(inputs[0]) in err or str(inputs[1]) in err  # names the adapter
    assert [tree_hash(p) for p in inputs] == before
    if case == "base":
        assert main(["merge", *map(str, inputs), "--output", str(out), "--allow-different-base"]) == 0


def test_output_inside_input_and_existing_output(small_set, tmp_path, capsys):
    a = [str(p) for p in small_set[:2]]
    inside = small_set[0] / "merged"
    assert "inside" in _run_failing(["merge", *a, "--output", str(inside)], inside, capsys)
    before = tree_hash(small_set[0])
    assert main(["merge", *a, "--output", a[0], "--overwrite"]) != 0  # output == an input
    assert "inside" in capsys.readouterr().err and tree_hash(small_set[0]) == before
    out = tmp_path / "out"
    assert main(["merge", *a, "--output", str(out)]) == 0
    stamp = tree_hash(out)
    assert main(["merge", *a, "--output", str(out)]) != 0
    assert "--overwrite" in capsys.readouterr().err and tree_hash(out) == stamp
    assert main(["merge", *a, "--output", str(out), "--overwrite", "--weights", "1,0"]) == 0
    assert tree_hash(out) != stamp


def test_hostile_pickle_runs_nothing(small_set, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = _hostile_bin(small_set[1], tmp_path / "evil", marker)
    out = tmp_path / "out"
    err = _run_failing(["merge", str(small_set[0]), str(evil), "--output", str(out)], out, capsys)
    assert "weights_only" in err and str(evil) in err
    assert not marker.exists()
