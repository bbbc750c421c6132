"""NoisyAdamW through transformers.Trainer on a tiny PEFT-LoRA Llama built from a config."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from poc_lora.optim import NoisyAdamW
from poc_lora.trainer import NoiseScaleCallback, NoisyAdamWTrainer, create_noisy_optimizer, noisy_adamw_kwargs

TEMPERATURE = 1e-3  # large enough that the noise visibly changes a 6-step run


def tiny_lora_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         attention_bias=True, mlp_bias=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
                      bias="lora_only", modules_to_save=["norm"])  # trainable biases and a norm: both groups
    return get_peft_model(LlamaForCausalLM(config), lora)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, length: int = 12) -> None:
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, **overrides) -> TrainingArguments:
    kw = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
              warmup_steps=2, weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[],
              seed=0, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    kw.update(overrides)
    return TrainingArguments(**kw)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


def test_optimizer_cls_and_kwargs_route_is_adamw_plus_noise(tmp_path):
    args = training_args(tmp_path, max_steps=3)

    def run(cls, kwargs):
        model = tiny_lora_llama()
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(),
                          optimizer_cls_and_kwargs=(cls, kwargs))
        trainer.train()
        return trainer, trainable_state(model)

    base = {"lr": args.learning_rate, "betas": (0.9, 0.999), "eps": 1e-8, "fused": True}
    _, adamw = run(torch.optim.AdamW, base)
    trainer, silent = run(NoisyAdamW, {**base, "temperature": 0.0, "seed": 0})
    assert isinstance(inner(trainer.optimizer), NoisyAdamW) and inner(trainer.optimizer).noise_step == 3
    assert all(torch.equal(adamw[n], silent[n]) for n in adamw)  # temperature 0 == AdamW through Trainer
    _, noisy = run(NoisyAdamW, {**base, "temperature": TEMPERATURE, "seed": 0})
    assert all(not torch.equal(adamw[n], noisy[n]) for n in adamw)
    # the minimal form from the docs also works (NoisyAdamW's own lr default then applies)
    trainer, _ = run(NoisyAdamW, {"temperature": 1e-5, "seed": 0})
    assert inner(trainer.optimizer).param_groups[0]["temperature"] == 1e-5


def test_create_noisy_optimizer_groups_like_trainers_adamw(tmp_path):
    model = tiny_lora_llama()
    args = training_args(tmp_path, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    reference = Trainer(model=model, args=args, train_dataset=RandomTokens()).create_optimizer()
    noisy = create_noisy_optimizer(model, args, temperature=2e-5, seed=3)
    assert len(noisy.param_groups) == len(reference.param_groups) == 2
    for ours, theirs in zip(noisy.param_groups, reference.param_groups):
        assert [id(p) for p in ours["params"]] == [id(p) for p in theirs["params"]]
        for key in ("lr", "betas", "eps", "weight_decay", "fused", "foreach", "amsgrad"):
            assert ours[key] == theirs[key], key
        assert ours["temperature"] == 2e-5
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for p in noisy.param_groups[0]["params"]]
    exempt = [names[id(p)] for p in noisy.param_groups[1]["params"]]
    assert decayed and all("lora_" in n for n in decayed)
    assert any(n.endswith("bias") for n in exempt) and any("norm" in n for n in exempt)
    assert not any(n.endswith("bias") or "norm" in n for n in decayed)
    assert sum(len(g["params"]) for g in noisy.param_groups) == sum(p.requires_grad for p in model.parameters())
    assert noisy.noise_seed == 3 and noisy.param_groups[0]["weight_decay"] == 0.1


def _check_noise_scale_logged(history, temperature):
    train_logs = [e for e in history if "loss" in e and "learning_rate" in e]
    assert len(train_logs) >= 3
    for entry in train_logs:
        expected = math.sqrt(2 * entry["learning_rate"] * temperature)
        assert entry["noise_scale"] == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert len({e["noise_scale"] for e in train_logs}) > 2  # follows the warm-up/decay schedule


def test_noise_scale_is_logged_next_to_the_learning_rate(tmp_path):
    trainer = NoisyAdamWTrainer(model=tiny_lora_llama(), args=training_args(tmp_path), train_dataset=RandomTokens(),
                                temperature=TEMPERATURE)
    trainer.train()
    _check_noise_scale_logged(trainer.state.log_history, TEMPERATURE)
    # the callback alone, with plain Trainer
    args = training_args(tmp_path / "plain")
    trainer = Trainer(model=tiny_lora_llama(), args=args, train_dataset=RandomTokens(),
                      optimizer_cls_and_kwargs=(NoisyAdamW, noisy_adamw_kwargs(args, temperature=TEMPERATURE)),
                      callbacks=[NoiseScaleCallback()])
    trainer.train()
    _check_noise_scale_logged(trainer.state.log_history, TEMPERATURE)


def test_resume_from_checkpoint_continues_the_noise_stream(tmp_path):
    args = training_args(tmp_path / "full", save_strategy="steps", save_steps=3)
    full_model = tiny_lora_llama()
    NoisyAdamWTrainer(model=full_model, args=args, train_dataset=RandomTokens(), temperature=TEMPERATURE).train()
    expected = trainable_state(full_model)

    resumed_model = tiny_lora_llama()  # the same frozen base; the adapter must come from the checkpoint:
    with torch.no_grad():
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.normal_()
    resumed = NoisyAdamWTrainer(model=resumed_model, args=training_args(tmp_path / "resumed"),
                                train_dataset=RandomTokens(), temperature=TEMPERATURE, noise_seed=None)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert inner(resumed.optimizer).noise_step == 6
    got = trainable_state(resumed_model)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_noisy_trainer_refuses_a_second_optimizer(tmp_path):
    from poc_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizer_cls_and_kwargs"):
        NoisyAdamWTrainer(model=tiny_lora_llama(), args=training_args(tmp_path),
                          optimizer_cls_and_kwargs=(NoisyAdamW, {}))
