"""The batched ensemble strategy (poc_lora.batched, poc_lora.multilora) on the tiny model, fp32.

Equalities are checked against independent computations: the sequential strategy (one PEFT
model per member, transformers' own loss), transformers' full-logits loss, and the LoRA
formula written out here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poc_lora import cli
from poc_lora.config import load_config
from poc_lora.multilora import MultiLoraLinear, first_adapted_layer, keep_mask, supervised_lm_loss
from poc_lora.train import DONE_FILE

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")
# 8 records per suite (56 after 8 held out), 4 steps of 2 x 2 accumulated micro-batches, a
# checkpoint every 2 steps; LoRA on layer 1 of 2 only, so the trunk below it is shared; no dropout
# (with dropout, batched members are equal to sequential ones in distribution only); a small
# max_grad_norm so that the per-member clipping acts.
SMALL = ["--synthetic_train_per_suite", "8", "--synthetic_test_per_suite", "2", "--val_set_size", "8",
         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "4",
         "--save_steps", "2", "--warmup_steps", "0", "--logging_steps", "2", "--save_total_limit", "3",
         "--disable_tqdm", "true", "--lora_dropout", "0", "--lora_layers_to_transform", "1",
         "--max_grad_norm", "0.05"]
WEIGHTS = "adapter_model.safetensors"
M = 3


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private cache for the tiny model and the synthetic data."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POC_LORA_CACHE", str(path))
        yield path


def _ensemble(out: Path, strategy: str, *extra: str, m: int = M, order: str = "shared") -> list[str]:
    args = ["ensemble", "--config", TINY, "-M", str(m), "--strategy", strategy, "--data_order", order,
            "--output_dir", str(out), *SMALL, *extra]
    assert cli.main(args) == 0
    return args


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / WEIGHTS))


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ens")
    _ensemble(root / "seq", "sequential")
    args = _ensemble(root / "bat", "batched", "--merge")
    return {"seq": root / "seq", "bat": root / "bat", "args": args}


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded")
    monkeypatch.setattr("poc_lora.batched.load_base_model", refuse)
    monkeypatch.setattr("poc_lora.ensemble.load_base_model", refuse)


def test_batched_equals_sequential_with_shared_data_order(runs):
    seq, bat = runs["seq"], runs["bat"]
    for j in range(M):
        assert _rel(_weights(seq / f"adapter_{j}"), _weights(bat / f"adapter_{j}")) <= 1e-5, j
        s, b = (json.loads((d / f"adapter_{j}" / DONE_FILE).read_text()) for d in (seq, bat))
        assert b["seed"] == s["seed"] == j and b["noise_seed"] == s["noise_seed"] == j
        assert b["strategy"] == "batched" and b["global_step"] == s["global_step"] == 4
        for key in ("train_loss", "eval_loss"):  # the member's own losses, as its sequential run logs them
            assert b["metrics"][key] == pytest.approx(s["metrics"][key], rel=1e-5), key
        assert [e["step"] for e in b["log_history"]] == [2, 4] and all("loss" in e for e in b["log_history"])
        # same files as a sequential member: PEFT config, template record, config, card, stage marker
        assert sorted(p.name for p in (seq / f"adapter_{j}").iterdir() if not p.name.startswith("checkpoint-")) == \
            sorted(p.name for p in (bat / f"adapter_{j}").iterdir())
        assert json.loads((bat / f"adapter_{j}" / "adapter_config.json").read_text()) == \
            json.loads((seq / f"adapter_{j}" / "adapter_config.json").read_text())
    w = [_weights(bat / f"adapter_{j}") for j in range(M)]
    assert all(_rel(w[i], w[k]) > 1e-2 for i in range(M) for k in range(i + 1, M))  # members differ
    manifest = json.loads((bat / "ensemble.json").read_text())
    assert manifest["strategy"] == "batched" and manifest["data_order"] == "shared"
    assert [a["data_seed"] for a in manifest["adapters"]] == [0] * M  # one data order for all
    assert (bat / "merged" / WEIGHTS).is_file()  # the merge reads the members unchanged


def test_batched_adapter_loads_with_peft(runs):
    from peft import PeftModel

    from poc_lora.models import load_model

    path = runs["bat"] / "adapter_1"
    model = PeftModel.from_pretrained(load_model("poc-lora/tiny-llama", "float32"), str(path))
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    saved = _weights(path)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_no_leakage_between_members(runs, tmp_path):
    """Member 1's learning rate and temperature change; members 0 and 2 stay bit for bit the same."""
    from poc_lora.batched import train_batched
    from poc_lora.ensemble import member_configs
    from poc_lora.train import prepare_run

    cfg = load_config(TINY, [*SMALL, "--output_dir", str(tmp_path / "leak")])
    members = member_configs(cfg, M, "shared")
    members[1].training.learning_rate *= 5
    members[1].poc.temperature = 1e-2
    train_batched([prepare_run(m) for m in members], cfg.output_dir, "shared")
    for j in (0, 2):
        a, b = _weights(runs["bat"] / f"adapter_{j}"), _weights(tmp_path / "leak" / f"adapter_{j}")
        assert all(torch.equal(a[k], b[k]) for k in a), j
    assert _rel(_weights(runs["bat"] / "adapter_1"), _weights(tmp_path / "leak" / "adapter_1")) > 1e-2


def test_members_noise_is_independent(tmp_path):
    """With a vanishing learning rate and a large temperature, an adapter's change is its Langevin
    noise: variance sum_t 2 lr_t T, and uncorrelated between members."""
    from peft.utils import get_peft_model_state_dict

    from poc_lora.ensemble import member_configs
    from poc_lora.models import load_model
    from poc_lora.train import attach_lora

    lr, temp = 1e-9, 1e5
    out = tmp_path / "noise"
    _ensemble(out, "batched", "--learning_rate", str(lr), "--temperature", str(temp), "--max_grad_norm", "0")
    cfg = load_config(TINY, [*SMALL, "--output_dir", str(out)])
    deltas = []
    for j, m in enumerate(member_configs(cfg, M, "shared")):
        init = get_peft_model_state_dict(attach_lora(load_model("poc-lora/tiny-llama", "float32"), m))
        final = _weights(out / f"adapter_{j}")
        deltas.append(torch.cat([(final[k] - init[k]).flatten() for k in sorted(final)]))
    steps_lr = sum(lr * (1 - t / 4) for t in range(4))  # linear decay over 4 steps, no warm-up
    expected_std = (2 * steps_lr * temp) ** 0.5
    for d in deltas:
        assert float(d.std()) == pytest.approx(expected_std, rel=0.05)
    n = deltas[0].numel()
    for i in range(M):
        for k in range(i + 1, M):
            corr = float(torch.corrcoef(torch.stack([deltas[i], deltas[k]]))[0, 1])
            assert abs(corr) < 5 / n ** 0.5, (i, k, corr)  # 5 standard errors of a zero correlation


def _killed_after_step_2(runs: dict, out: Path) -> None:
    """``out`` as an ensemble killed after its step-2 checkpoint: no adapters, no "finished" mark."""
    (out / "batched").mkdir(parents=True)
    shutil.copytree(runs["bat"] / "batched" / "checkpoint-2", out / "batched" / "checkpoint-2")
    record = json.loads((runs["bat"] / "batched" / "poc_lora_batched.json").read_text())
    assert record.pop("finished") is True
    (out / "batched" / "poc_lora_batched.json").write_text(json.dumps(record))


def test_resume_after_a_checkpoint_equals_the_uninterrupted_run(runs, tmp_path):
    out = tmp_path / "resumed"
    _killed_after_step_2(runs, out)
    _ensemble(out, "batched")
    for j in range(M):
        a, b = _weights(runs["bat"] / f"adapter_{j}"), _weights(out / f"adapter_{j}")
        assert all(torch.equal(a[k], b[k]) for k in a), j
        record = json.loads((out / f"adapter_{j}" / DONE_FILE).read_text())
        assert record["resumed_from"].endswith("checkpoint-2")
        assert [e["step"] for e in record["log_history"]] == [2, 4]  # the log before the kill survives
        # the member's loss logged after the resume averages steps 3-4, as the uninterrupted run's
        # did (it was divided by 4, the steps since step 0, not by the 2 since the checkpoint)
        whole = json.loads((runs["bat"] / f"adapter_{j}" / DONE_FILE).read_text())["log_history"]
        assert [e["loss"] for e in record["log_history"]] == pytest.approx([e["loss"] for e in whole], abs=1e-6)


def test_resume_of_a_finished_batched_ensemble_changes_nothing(runs, no_model_load):
    bat = runs["bat"]
    before = {j: (bat / f"adapter_{j}" / WEIGHTS).stat().st_mtime_ns for j in range(M)}
    assert cli.main(runs["args"]) == 0  # nothing is loaded or trained again
    assert {j: (bat / f"adapter_{j}" / WEIGHTS).stat().st_mtime_ns for j in range(M)} == before


def test_checkpoints_of_other_settings_are_refused(runs, tmp_path, capsys, no_model_load):
    out = tmp_path / "other"
    _killed_after_step_2(runs, out)
    args = ["ensemble", "--config", TINY, "-M", str(M), "--strategy", "batched", "--data_order", "shared",
            "--output_dir", str(out), *SMALL, "--learning_rate", "0.5"]
    assert cli.main(args) == 1
    assert "holds checkpoints of other members or settings" in capsys.readouterr().err


def test_a_member_added_after_a_finished_batched_run_trains_alone(runs, tmp_path):
    """The finished run's checkpoints do not block: member 3 is trained (a batch of one), 0-2 kept."""
    out = tmp_path / "more"
    shutil.copytree(runs["bat"], out)
    before = {j: (out / f"adapter_{j}" / WEIGHTS).stat().st_mtime_ns for j in range(M)}
    _ensemble(out, "batched", m=M + 1)
    assert {j: (out / f"adapter_{j}" / WEIGHTS).stat().st_mtime_ns for j in range(M)} == before
    record = json.loads((out / f"adapter_{M}" / DONE_FILE).read_text())
    assert record["seed"] == M and record["batched_members"] == 1 and record["global_step"] == 4


@pytest.mark.parametrize("extra, needle", [
    (["--lora_bias", "all"], "lora_bias='all'"),
    (["--lora_target_modules", "q_proj,lm_head"], "not lm_head"),
    (["--train_sampling_strategy", "group_by_length"], "train_sampling_strategy='group_by_length'"),
])
def test_unsupported_lora_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load, extra, needle):
    args = ["ensemble", "--config", TINY, "-M", "2", "--strategy", "batched", "--output_dir", str(tmp_path / "x"),
            *SMALL, *extra]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_checkpointing_keeps_the_frozen_trunk_out_of_the_backward_pass(runs, tmp_path, monkeypatch):
    """With activation checkpointing (non-reentrant, transformers' default) the adapters equal
    the run without it, and the output of layer 0 (below the adapted layer 1) needs no gradient:
    the frozen trunk is not in the backward pass (transformers' input-grads hook, which only
    reentrant checkpointing needs, would put it there)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    needs_grad: dict[int, set[bool]] = {}
    original = LlamaDecoderLayer.forward

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        needs_grad.setdefault(self.self_attn.layer_idx, set()).add(hidden.requires_grad)
        return out

    monkeypatch.setattr(LlamaDecoderLayer, "forward", recording)
    _ensemble(tmp_path / "ckpt", "batched", "--activation_checkpointing", "true", "--save_strategy", "no")
    assert needs_grad[0] == {False} and True in needs_grad[1]  # (layer 1 also runs no-grad evaluations)
    for j in range(M):
        got, ref = _weights(tmp_path / "ckpt" / f"adapter_{j}"), _weights(runs["bat"] / f"adapter_{j}")
        assert _rel(ref, got) < 1e-5


def test_per_member_data_order_matches_sequential(tmp_path):
    """per_member: member j reads its own order (seed + j) in both strategies; the batched run
    stacks the members' micro-batches, padded to one length, so equality is up to rounding."""
    _ensemble(tmp_path / "seq", "sequential", m=2, order="per_member")
    _ensemble(tmp_path / "bat", "batched", m=2, order="per_member")
    for j in range(2):
        assert _rel(_weights(tmp_path / "seq" / f"adapter_{j}"), _weights(tmp_path / "bat" / f"adapter_{j}")) < 1e-4


# ----------------------------------------------------------------------------- the core pieces
def test_supervised_lm_loss_and_grads_equal_the_full_lm_head():
    """Loss and gradients equal transformers' ForCausalLM loss on every position's logits."""
    from poc_lora.models import load_model

    torch.manual_seed(0)
    model = load_model("poc-lora/tiny-llama", "float32")
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[mask == 0] = -100
    labels[2, 5:7] = -100
    n = int(labels[:, 1:].ne(-100).sum()) + 4  # a larger accumulated batch, as Trainer passes it

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.model.layers[1].parameters()]

    for num_items in (torch.tensor(n), None):
        full = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items).loss
        g_full = grads(full)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        mine = supervised_lm_loss(hidden, labels, model.lm_head, 1, num_items)
        assert mine.shape == (1,)
        torch.testing.assert_close(mine[0], full, rtol=1e-6, atol=1e-7)
        for a, b in zip(grads(mine.sum()), g_full):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # members: (2 * 3, T) stacked rows give each member its own loss; (3, T) labels are shared
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.detach()
    other = labels.roll(1, dims=0)
    stacked = supervised_lm_loss(torch.cat([hidden, hidden]), torch.cat([labels, other]), model.lm_head, 2)
    torch.testing.assert_close(stacked, torch.stack([supervised_lm_loss(hidden, labels, model.lm_head, 1)[0],
                                                     supervised_lm_loss(hidden, other, model.lm_head, 1)[0]]))
    shared = supervised_lm_loss(torch.cat([hidden, hidden]), labels, model.lm_head, 2, n)
    torch.testing.assert_close(shared, supervised_lm_loss(hidden, labels, model.lm_head, 1, n).repeat(2))


def test_multi_lora_linear_is_each_members_lora():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    a = [torch.randn(4, 6), torch.randn(2, 6), torch.zeros(3, 6)]  # ranks 4, 2 and an all-zero member
    b = [torch.randn(5, 4), torch.randn(5, 2), torch.zeros(5, 3)]
    scales = [0.5, 2.0, 1.0]
    layer = MultiLoraLinear(base, a, b, scaling=scales, dropout=0.5).eval()
    x = torch.randn(3 * 2, 7, 6)
    out = layer(x)
    for m in range(3):
        xm = x[2 * m:2 * m + 2]
        expected = base(xm) + scales[m] * (xm @ a[m].T) @ b[m].T
        torch.testing.assert_close(out[2 * m:2 * m + 2], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[4:], base(x[4:]))  # the all-zero member is the base layer
    # training mode: one dropout draw over all rows, so members with equal inputs differ
    same = MultiLoraLinear(base, [a[0], a[0]], [b[0], b[0]], dropout=0.5).train()
    y = same(torch.ones(2, 3, 6))
    assert not torch.equal(y[0], y[1])
    with pytest.raises(ValueError, match="not 2 members' blocks"):
        same(torch.ones(3, 6))


def test_multi_lora_linear_compute_dtype_on_a_bfloat16_base(monkeypatch):
    """Default: PEFT's layer (the bf16 input cast to the float32 factors, the sum cast back);
    ``compute_dtype=bfloat16``: both products in bf16, within bf16 rounding of that."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32).to(torch.bfloat16)
    a, b = [torch.randn(8, 64) for _ in range(2)], [torch.randn(32, 8) for _ in range(2)]
    x = torch.randn(2 * 3, 5, 64).to(torch.bfloat16)
    seen, bmm = [], torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda p, q: seen.append((p.dtype, q.dtype)) or bmm(p, q))
    with torch.no_grad():
        exact = MultiLoraLinear(base, a, b, scaling=0.5).eval()(x)
        assert seen == [(torch.float32, torch.float32)] * 2
        fast = MultiLoraLinear(base, a, b, scaling=0.5, compute_dtype=torch.bfloat16).eval()(x)
        assert seen[2:] == [(torch.bfloat16, torch.bfloat16)] * 2
        for m in range(2):
            xm = x[3 * m:3 * m + 3]
            peft = (base(xm).float() + 0.5 * (xm.float() @ a[m].T) @ b[m].T).to(torch.bfloat16)
            torch.testing.assert_close(exact[3 * m:3 * m + 3], peft, rtol=0.01, atol=0.01)
            torch.testing.assert_close(fast[3 * m:3 * m + 3], peft, rtol=0.03, atol=0.1)
    assert exact.dtype == fast.dtype == torch.bfloat16


def test_keep_mask_has_the_rate_and_independence_of_bernoulli_draws():
    torch.manual_seed(0)
    n = 400_000
    for keep in (0.95, 0.5, 0.1):
        mask = keep_mask((n,), keep).float()
        sd = (keep * (1 - keep) / n) ** 0.5
        assert abs(mask.mean().item() - keep) < 5 * sd
        # the four 16-bit lanes of one 64-bit draw, and neighbours in general, are uncorrelated
        centred = mask - mask.mean()
        for lag in (1, 2, 3, 4):
            corr = (centred[:-lag] * centred[lag:]).mean() / centred.pow(2).mean()
            assert abs(corr.item()) < 5 / n ** 0.5
    assert keep_mask((3, 4), 1.0).all() and not keep_mask((3, 4), 0.0).any()
    torch.manual_seed(1)
    first = keep_mask((64,), 0.5)
    torch.manual_seed(1)
    assert torch.equal(first, keep_mask((64,), 0.5))  # seeded like dropout


def test_lora_dropout_keeps_the_expected_update():
    """E[dropout(x) / (1 - p)] = x: averaged over many draws, the training-mode layer gives the
    eval-mode output (the 1 / (1 - p) is folded into the scale)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 4)
    layer = MultiLoraLinear(base, [torch.randn(2, 8)], [torch.randn(4, 2)], scaling=2.0, dropout=0.3)
    x = torch.randn(1, 8)
    with torch.no_grad():
        expected = layer.eval()(x)
        mean = layer.train()(x.expand(200_000, 8).contiguous()).mean(0)
    torch.testing.assert_close(mean, expected[0], atol=0.05, rtol=0.01)


def test_first_adapted_layer():
    assert first_adapted_layer(["model.layers.7.mlp.up_proj", "model.layers.3.self_attn.q_proj"]) == ("model.layers", 3)
    assert first_adapted_layer(["model.layers.0.mlp.up_proj", "lm_head"]) is None


def test_shared_trunk_runs_the_layers_below_once_and_changes_no_loss():
    """Layer 0 (below the adapted layer 1) sees b rows, layer 1 sees M * b; the members' losses
    equal those of the same model run on the batch repeated M times (no sharing)."""
    from poc_lora.batched_model import BatchedLoraModel, member_lora
    from poc_lora.ensemble import member_configs
    from poc_lora.models import load_model

    cfg = load_config(TINY, [*SMALL, "--output_dir", "unused"])
    base = load_model("poc-lora/tiny-llama", "float32")
    loras = [member_lora(base, m) for m in member_configs(cfg, M, "shared")]
    with torch.no_grad():  # members that differ from the start (B is 0 at init)
        for j, lora in enumerate(loras):
            for _, b in lora.factors.values():
                b.normal_(0, 0.1, generator=torch.Generator().manual_seed(j))
    model = BatchedLoraModel(base, loras, "shared").eval()
    rows = {}
    for i, layer in enumerate(base.model.layers):
        layer.register_forward_pre_hook(lambda mod, args, kw, i=i: rows.setdefault(i, []).append(args[0].shape[0]
                                        if args else kw["hidden_states"].shape[0]), with_kwargs=True)
    ids = torch.randint(3, base.config.vocab_size, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        shared = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).member_losses
        trunk, model.trunk = model.trunk, None  # every member reads the repeated batch from the embeddings on
        repeated = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).member_losses
    assert rows == {0: [2, 2 * M], 1: [2 * M, 2 * M]}
    torch.testing.assert_close(shared, repeated, rtol=1e-6, atol=1e-7)
    assert len(set(shared.tolist())) == M  # the members differ
    trunk.remove()


def test_bad_data_order_and_strategy_are_config_errors():
    from poc_lora.config import PipelineArguments
    from poc_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="data_order must be one of per_member, shared"):
        PipelineArguments(train_config="x.yaml", data_order="random")
    with pytest.raises(ConfigError, match="strategy must be one of sequential, parallel, batched"):
        PipelineArguments(train_config="x.yaml", strategy="fast")
