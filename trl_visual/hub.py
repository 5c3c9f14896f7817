"""Model cards for trained LoRA weights, made with ``huggingface_hub``'s card tools."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from PIL import Image, ImageDraw

CITATIONS: dict[str, str] = {
    "Flow-GRPO": """@article{liu2025flowgrpo,
  title   = {Flow-GRPO: Training Flow Matching Models via Online RL},
  author  = {Liu, Jie and Liu, Gongye and Liang, Jiajun and Li, Yangguang and Liu, Jiaheng and Wang, Xintao and Wan, Pengfei and Zhang, Di and Ouyang, Wanli},
  journal = {arXiv preprint arXiv:2505.05470},
  year    = {2025}
}""",
    "DanceGRPO": """@article{xue2025dancegrpo,
  title   = {DanceGRPO: Unleashing GRPO on Visual Generation},
  author  = {Xue, Zeyue and Wu, Jie and Gao, Yu and Kong, Fangyuan and Zhu, Lingting and Chen, Mengzhao and Liu, Zhiheng and Liu, Wei and Guo, Qiushan and Huang, Weilin and Luo, Ping},
  journal = {arXiv preprint arXiv:2505.07818},
  year    = {2025}
}""",
    "BPGO": """@inproceedings{liu2026bpgo,
  title     = {Learning What to Trust: Bayesian Prior-Guided Optimization for Visual Generation},
  author    = {Liu and Liang and Huang and Yu and Zhang},
  booktitle = {CVPR},
  year      = {2026},
  note      = {arXiv:2511.18919}
}""",
    "ViPO": """@inproceedings{ni2026vipo,
  title     = {Seeing What Matters: Visual Preference Policy Optimization for Visual Generation},
  author    = {Ni and Liang and Li and Zhou and Huang and Zhang and Li},
  booktitle = {CVPR},
  year      = {2026},
  note      = {arXiv:2511.18719}
}""",
}

CARD_TEMPLATE = """---
{card_data}
---

# {title}

LoRA weights for [{base_model}](https://huggingface.co/{base_model}) trained with **{method}** using
[trl_visual](https://github.com/trl-visual/trl_visual){rewards_text}.

## Use it

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}")
image = pipe("{example_prompt}").images[0]
```

## Samples

Same prompts and seeds, before (the base model) and after training:

| before | after |
|---|---|
| ![before](samples_before.png) | ![after](samples_after.png) |

## Training

![reward curve](reward_curve.png)

{reward_summary}

| setting | value |
|---|---|
{settings_table}

## Citations

```bibtex
{citations}
```
"""


def reward_curve_image(rewards: Sequence[float], size: tuple[int, int] = (480, 240)) -> Image.Image:
    """A line plot of the logged mean reward per step, drawn with PIL (no plotting library needed)."""
    width, height = size
    margin = 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, 10, width - 10, height - margin], outline="black")
    values = [r for r in rewards if math.isfinite(r)]
    if len(values) >= 2:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        points = [
            (
                margin + i * (width - margin - 10) / (len(values) - 1),
                height - margin - (v - low) / span * (height - margin - 20),
            )
            for i, v in enumerate(values)
        ]
        draw.line(points, fill=(200, 30, 30), width=2)
        draw.text((2, 10), f"{high:.3g}", fill="black")
        draw.text((2, height - margin - 10), f"{low:.3g}", fill="black")
    draw.text((margin, height - margin + 8), "step", fill="black")
    draw.text((width - 80, height - margin + 8), f"{len(values)} steps", fill="black")
    return image


def settings_table(args: Any, fields: Sequence[str]) -> str:
    """Markdown rows ``| field | value |`` for the given config fields."""
    return "\n".join(f"| `{name}` | `{getattr(args, name)}` |" for name in fields if hasattr(args, name))


def build_model_card(
    *,
    base_model: str,
    repo_id: str,
    method: str,
    pipeline_tag: str,
    reward_names: Sequence[str],
    rewards: Sequence[float],
    settings: str,
    citations: Sequence[str],
    example_prompt: str,
    tags: Sequence[str] = (),
) -> ModelCard:
    """The card: YAML metadata (``base_model``, ``library_name: diffusers``, ``pipeline_tag``, tags), a
    ``load_lora_weights`` snippet, the before/after grids, the reward curve, the settings and citations."""
    card_data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(["trl-visual", method.lower(), "lora", "diffusers", *tags])),
    )
    finite = [r for r in rewards if math.isfinite(r)]
    summary = (
        f"Mean reward went from {finite[0]:.4g} (first step) to {finite[-1]:.4g} (last step) over {len(finite)} steps."
        if finite
        else "No reward was logged."
    )
    text = CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=f"{repo_id.split('/')[-1]}: {method} LoRA for {base_model.split('/')[-1]}",
        base_model=base_model,
        method=method,
        rewards_text=f" against the reward(s) {', '.join(f'`{n}`' for n in reward_names)}"
        if reward_names
        else "",
        repo_id=repo_id,
        example_prompt=example_prompt.replace('"', "'"),
        reward_summary=summary,
        settings_table=settings,
        citations="\n\n".join(CITATIONS[c] for c in citations if c in CITATIONS),
    )
    return ModelCard(text)


def write_model_card_files(
    output_dir: str, card: ModelCard, before: Image.Image, after: Image.Image, curve: Image.Image
) -> None:
    """``README.md`` and the three pictures it shows, in ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    before.save(os.path.join(output_dir, "samples_before.png"))
    after.save(os.path.join(output_dir, "samples_after.png"))
    curve.save(os.path.join(output_dir, "reward_curve.png"))
    card.save(os.path.join(output_dir, "README.md"))
