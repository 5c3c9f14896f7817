"""A pipeline loaded in bf16 trains float32 trainable weights (LoRA or full), keeps its frozen weights in bf16,
and a step at learning rate 1e-6, which bf16 weights would round away, changes the trained weights."""

import pytest
import torch
from datasets import Dataset
from helpers import PROMPTS, make_config
from peft import LoraConfig
from safetensors.torch import load_file

from trl_visual import DiffusionGRPOTrainer
from trl_visual.testing import load_tiny_pipeline

#: init_lora_weights=False: lora_B starts random, not zero, so lora_A gets a gradient at the first step too
LORA = dict(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def make_trainer(tmp_path, model="sd3", peft=True, **overrides):
    """One step at lr 1e-6 on a tiny pipeline cast to bf16, with autocast (``bf16=True``) as the shipped
    real-model configs set it (``use_cpu``: transformers refuses bf16 without an accelerator otherwise)."""
    args = make_config(
        tmp_path, max_steps=1, num_frames=5, learning_rate=1e-6, bf16=True, use_cpu=True, **overrides
    )
    return DiffusionGRPOTrainer(
        model=load_tiny_pipeline(f"tiny:{model}").to(torch.bfloat16),
        reward_funcs="red_channel",
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA) if peft else None,
    )


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def lost_in_bf16(before: torch.Tensor, after: torch.Tensor) -> float:
    """Fraction of the update ``after − before`` that bf16 weights would round away entirely."""
    start = before.to(torch.bfloat16)
    return (start + (after - before).to(torch.bfloat16) == start).float().mean().item()


@pytest.mark.parametrize("model", ["sd3", "flux", "wan"])
def test_lora_trains_in_float32_on_a_bf16_pipeline(tmp_path, model):
    trainer = make_trainer(tmp_path, model)
    denoiser = trainer.model
    frozen = [p for p in denoiser.parameters() if not p.requires_grad]
    assert {p.dtype for p in denoiser.parameters() if p.requires_grad} == {torch.float32}
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}  # the base weights keep the loading dtype
    for module in trainer.adapter.frozen_modules:  # text encoders, VAE
        assert {p.dtype for p in module.parameters()} <= {torch.bfloat16}
    before = trainable(denoiser)
    trainer.train()
    states = list(trainer.optimizer.state.values())
    assert len(states) == len(before) and {s["exp_avg"].dtype for s in states} == {torch.float32}
    lora_a = [name for name in before if "lora_A" in name]
    after = dict(denoiser.named_parameters())
    for name in lora_a:
        assert (after[name].detach() != before[name]).float().mean() > 0.9, name
    # the premise: most of this update would have vanished in bf16 weights
    assert lost_in_bf16(before[lora_a[0]], after[lora_a[0]].detach()) > 0.5


def test_full_fine_tuning_trains_in_float32_on_a_bf16_pipeline(tmp_path):
    trainer = make_trainer(tmp_path, peft=False)
    denoiser = trainer.model
    assert {p.dtype for p in denoiser.parameters()} == {torch.float32}  # all of it is trained
    for module in trainer.adapter.frozen_modules:
        assert {p.dtype for p in module.parameters()} <= {torch.bfloat16}
    before = trainable(denoiser)
    trainer.train()
    assert {s["exp_avg"].dtype for s in trainer.optimizer.state.values()} == {torch.float32}
    after = {name: p.detach() for name, p in denoiser.named_parameters()}
    changed = sum((after[n] != before[n]).sum().item() for n in before)
    assert changed / sum(p.numel() for p in before.values()) > 0.9
    weight = "transformer_blocks.0.attn.to_q.weight"
    assert lost_in_bf16(before[weight], after[weight]) > 0.5
    trainer.create_model_card()  # the card samples the float32 denoiser with the bf16 VAE: under bf16 autocast
    assert (tmp_path / "out" / "images" / "before_0.png").is_file()


def test_lora_exports_in_the_loading_dtype_and_checkpoints_in_float32(tmp_path):
    """As diffusers' training scripts: the final LoRA file is in the dtype the pipeline was loaded in, and a
    bf16 pipeline loads it; checkpoints keep the float32 weights so that resuming is exact."""
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1)
    trainer.train()
    trained = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    checkpoint = load_file(tmp_path / "out" / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}
    trainer.save_model(str(tmp_path / "final"))
    export = load_file(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    assert {t.dtype for t in export.values()} == {torch.bfloat16} and len(export) == len(trained)
    name = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    assert torch.equal(checkpoint[name], trained["transformer_blocks.0.attn.to_q.lora_A.default.weight"])
    assert torch.equal(export[name], checkpoint[name].to(torch.bfloat16))
    pipeline = load_tiny_pipeline("tiny:sd3").to(torch.bfloat16)
    pipeline.load_lora_weights(str(tmp_path / "final"))
    loaded = dict(pipeline.transformer.named_parameters())[
        "transformer_blocks.0.attn.to_q.lora_A.default_0.weight"
    ]
    assert torch.equal(loaded.detach(), export[name])
