"""Model cards for trained weights, made with ``huggingface_hub``'s own tools (the LoRA files themselves are
:mod:`trl_visual.lora_io`'s).

- :func:`build_model_card` makes a card the Hub accepts: ``base_model`` only when it is a Hub repo id
  (:func:`hub_base_model`), a license, the data set when it came from the Hub (:func:`dataset_repo_id`), a
  ``widget`` gallery of the samples, a usage snippet that runs for the base model at hand, the settings, the
  framework versions and the trackers' run links.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from diffusers.utils import export_to_gif
from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image, ImageDraw, ImageFont

from ._version import __version__

#: the license written when neither the caller nor the base model's own card gives one
DEFAULT_LICENSE = "other"

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


# ------------------------------------------------------------------------------------------------------------
# What the card says about the base model, the data and the run
# ------------------------------------------------------------------------------------------------------------
#: a Hub cache snapshot folder, ``…/models--org--name/snapshots/<revision>``
_HUB_CACHE_FOLDER = re.compile(r"models--([^/\\]+?)--([^/\\]+?)[/\\]snapshots[/\\]")
#: a ``datasets`` cache folder of a Hub data set, ``…/namespace___name/<config>/…``
_DATASET_CACHE_FOLDER = re.compile(r"[/\\]([^/\\]+)___([^/\\]+)[/\\]")
#: libraries whose versions the card lists
FRAMEWORKS = (
    "diffusers",
    "peft",
    "torch",
    "transformers",
    "accelerate",
    "trl",
    "huggingface_hub",
    "datasets",
)


def is_hub_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid Hub repo id (``org/name`` or a bare name) and not a path on this machine."""
    if os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def hub_base_model(name_or_path: str | None) -> str | None:
    """The base model's Hub repo id, or None when there is none to name.

    A repo id is itself; a local folder is traced through the Hub cache's folder name
    (``models--org--name/snapshots/…``) or a ``_name_or_path`` recorded in its ``model_index.json`` or
    ``config.json``; a ``tiny:`` model or an untraceable folder has none.
    """
    if not name_or_path:
        return None
    if not os.path.exists(name_or_path):
        return name_or_path if is_hub_repo_id(name_or_path) else None
    match = _HUB_CACHE_FOLDER.search(os.path.abspath(name_or_path) + os.sep)
    if match:
        return f"{match[1]}/{match[2]}"
    for file in ("model_index.json", "config.json"):
        recorded = _read_json(os.path.join(name_or_path, file)).get("_name_or_path")
        if isinstance(recorded, str) and is_hub_repo_id(recorded):
            return recorded
    return None


def base_model_license(name_or_path: str | None, repo_id: str | None) -> str | None:
    """The ``license`` of the base model's own card when a copy is on this machine (in the local folder, or
    in the Hub cache for a repo id); None otherwise."""
    candidates = []
    if name_or_path and os.path.isdir(name_or_path):
        candidates.append(os.path.join(name_or_path, "README.md"))
    if repo_id:
        cached = try_to_load_from_cache(repo_id, "README.md")
        if isinstance(cached, str):
            candidates.append(cached)
    for path in candidates:
        if os.path.isfile(path):
            license_name = ModelCard.load(path, ignore_metadata_errors=True).data.license
            if license_name:
                return license_name
    return None


def dataset_repo_id(dataset: Any) -> str | None:
    """The Hub id of a data set loaded with ``load_dataset("namespace/name")``, or None.

    A ``datasets.Dataset`` keeps it only in its Arrow cache folder, ``…/namespace___name/…`` (``datasets``
    lower-cases and snake-cases the name there). Data built in memory, loaded from local files or streamed
    has no such folder.
    """
    for cache_file in getattr(dataset, "cache_files", None) or []:
        match = _DATASET_CACHE_FOLDER.search(str(cache_file.get("filename", "")))
        if match and is_hub_repo_id(f"{match[1]}/{match[2]}"):
            return f"{match[1]}/{match[2]}"
    return None


def framework_versions() -> dict[str, str]:
    """Installed versions of ``trl_visual`` and the libraries it trains with."""
    versions = {"trl_visual": __version__}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def tracker_links() -> dict[str, str]:
    """Links to the runs of active experiment trackers: the Weights & Biases run, when one is active."""
    run = getattr(sys.modules.get("wandb"), "run", None)
    url = getattr(run, "url", None)
    return {"Weights & Biases": url} if url else {}


# ------------------------------------------------------------------------------------------------------------
# The card
# ------------------------------------------------------------------------------------------------------------
@dataclass
class CardSample:
    """One prompt of the card's gallery: its seed and the files (relative to the card) before and after."""

    prompt: str
    seed: int
    before: str | None
    """``None`` when the base model's samples are gone (a whole denoiser trained under sharding)."""
    after: str


#: the card, a Jinja template rendered by ``ModelCard.from_template`` (``card_data`` is the YAML metadata)
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ intro }} with **{{ method }}** using
[trl_visual](https://github.com/trl-visual/trl_visual){{ rewards_text }}.{{ intro_note }}

## Use it

```python
{{ snippet }}
```

## Samples

The base model (before) and {{ this_model }} (after), each prompt with its seed. In float32 on the CPU the snippet above
gives these pictures; other devices and precisions differ a little.

| prompt | seed | before | after |
|---|---|---|---|
{{ sample_rows }}

{{ grids }}

## Training

![reward curve](reward_curve.png)

{{ reward_summary }}

| setting | value |
|---|---|
{{ settings_table }}
{{ trackers }}
License: `{{ license }}`.{{ license_note }}

## Framework versions

{{ versions }}

## Citations

```bibtex
{{ citations }}
```
"""


#: the reward curve's margins in pixels: left (the y axis' label and values), top, right, bottom (the x axis')
CURVE_MARGINS = (56, 10, 14, 40)


def _vertical_text(text: str, font: Any) -> Image.Image:
    """``text`` drawn black on white and turned a quarter turn (read bottom to top), for a y-axis label."""
    left, top, right, bottom = font.getbbox(text)
    strip = Image.new("RGB", (right + 2, bottom + 2), "white")
    ImageDraw.Draw(strip).text((1, 1), text, fill="black", font=font)
    return strip.rotate(90, expand=True)


def reward_curve_image(
    rewards: Sequence[float],
    size: tuple[int, int] = (480, 240),
    y_label: str = "mean reward",
    steps: Sequence[int] | None = None,
) -> Image.Image:
    """A line plot of the logged mean reward per step, drawn with PIL (no plotting library needed): the x axis
    labelled ``step`` with the first and last logged step (``steps``, the optimizer step of each reward; 1 to N
    when not given), the y axis labelled ``y_label`` with the lowest and highest value."""
    width, height = size
    left, top, right, bottom = CURVE_MARGINS
    font = ImageFont.load_default(size=11)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    values = [r for r in rewards if math.isfinite(r)]
    if len(values) >= 2:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        points = [
            (
                left + i * (width - left - right) / (len(values) - 1),
                height - bottom - (v - low) / span * (height - bottom - top),
            )
            for i, v in enumerate(values)
        ]
        draw.line(points, fill=(200, 30, 30), width=2)
        draw.text((left - 2, top), f"{high:.3g}", fill="black", font=font, anchor="ra")
        draw.text((left - 2, height - bottom), f"{low:.3g}", fill="black", font=font, anchor="rd")
    logged = [step for step, r in zip(steps or range(1, len(rewards) + 1), rewards) if math.isfinite(r)]
    if logged:
        draw.text((left, height - bottom + 3), str(logged[0]), fill="black", font=font, anchor="ma")
        draw.text((width - right, height - bottom + 3), str(logged[-1]), fill="black", font=font, anchor="ma")
    draw.text(((left + width - right) // 2, height - 4), "step", fill="black", font=font, anchor="md")
    label = _vertical_text(y_label, font)
    image.paste(label, (2, (top + height - bottom - label.height) // 2))
    return image


def settings_table(settings: dict[str, Any]) -> str:
    """Markdown rows ``| name | value |``, leaving out settings that are None."""
    return "\n".join(f"| `{name}` | `{value}` |" for name, value in settings.items() if value is not None)


def _python_call(function: str, arguments: Sequence[str]) -> str:
    return f"{function}(\n" + "".join(f"    {argument},\n" for argument in arguments) + ")"


def usage_snippet(
    model_name: str,
    base_model: str | None,
    repo_id: str,
    call_kwargs: dict[str, Any],
    sample: CardSample,
    output_kind: str,
    lora: bool = True,
) -> str:
    """Python that loads the base model and this LoRA and makes ``sample``'s picture; with ``lora=False`` (a
    whole fine-tuned pipeline saved in ``repo_id``), Python that loads that pipeline.

    The base model is loaded by Hub id when it has one, rebuilt with ``trl_visual.models.load_pipeline`` for a ``tiny:``
    model, and otherwise left as a path for the reader to fill in. ``call_kwargs`` are the pipeline's keyword
    arguments; a conditioning ``image`` becomes a ``load_image`` call.
    """
    imports = ["from diffusers import DiffusionPipeline"]
    if not lora:
        load = f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", torch_dtype=torch.float32)'
    elif base_model:
        load = f'pipe = DiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float32)'
    elif model_name.startswith("tiny:"):
        imports = ["from trl_visual.models import load_pipeline"]
        load = (
            f'pipe = load_pipeline("{model_name}")  # trl_visual\'s built-in model this LoRA was trained on'
        )
    else:
        load = (
            "# the base model this LoRA was trained on (a local folder that names no Hub repo)\n"
            'pipe = DiffusionPipeline.from_pretrained("path/to/the/base/model", torch_dtype=torch.float32)'
        )
    arguments = [f"prompt={json.dumps(sample.prompt)}"]
    for name, value in call_kwargs.items():
        if name == "image":
            imports.append("from diffusers.utils import load_image")
            arguments.append('image=load_image("path/to/first_frame.png")')
        elif value is not None:
            arguments.append(f"{name}={json.dumps(value) if isinstance(value, str) else repr(value)}")
    arguments.append(f"generator=torch.Generator().manual_seed({sample.seed})")
    if output_kind == "videos":
        imports.append("from diffusers.utils import export_to_video")
        result = (
            f'frames = {_python_call("pipe", arguments)}.frames[0]\nexport_to_video(frames, "sample.mp4")'
        )
    else:
        result = f"image = {_python_call('pipe', arguments)}.images[0]"
    loading = [load, f'pipe.load_lora_weights("{repo_id}")'] if lora else [load]
    return "\n".join(["import torch", *sorted(set(imports)), "", *loading, result])


def _sample_row(sample: CardSample) -> str:
    """``| prompt | seed | before | after |``, with "(not kept)" where the base model's sample is gone."""
    before = f"![before]({sample.before})" if sample.before else "(not kept)"
    return f"| {sample.prompt.replace('|', '/')} | {sample.seed} | {before} | ![after]({sample.after}) |"


def build_model_card(
    *,
    model_name: str,
    repo_id: str,
    method: str,
    pipeline_tag: str,
    reward_names: Sequence[str],
    rewards: Sequence[float],
    settings: dict[str, Any],
    citations: Sequence[str],
    samples: Sequence[CardSample],
    call_kwargs: dict[str, Any],
    output_kind: str = "images",
    trained_module: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] = (),
    tags: Sequence[str] = (),
) -> ModelCard:
    """The card: Hub metadata (``base_model`` when the base is a Hub repo, ``license``, ``datasets``,
    ``library_name: diffusers``, ``pipeline_tag``, tags and a ``widget`` gallery of the after-samples), a usage
    snippet that runs for this base model, the samples before and after with their seeds, the reward curve,
    the settings, the trackers' run links, the framework versions and the citations.

    ``model_name`` is the base model as the trainer was given it (a repo id, a local folder, a ``tiny:``
    name); ``license`` defaults to the base model's own (when its card is on this machine), else
    :data:`DEFAULT_LICENSE`. ``trained_module`` names the fully trained denoiser when no LoRA was trained (the folder
    is then a whole pipeline): the card says so, its snippet loads the folder, and it is not tagged ``lora``.
    """
    base_model = hub_base_model(model_name)
    license = license or base_model_license(model_name, base_model)
    lora = trained_module is None
    kind_tags = ["lora"] if lora else []
    grids = ("before", "after") if all(sample.before for sample in samples) else ("after",)
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{model_name}`"
    card_data = ModelCardData(
        base_model=base_model,
        license=license or DEFAULT_LICENSE,
        datasets=list(datasets) or None,
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(["trl-visual", method.lower(), *kind_tags, "diffusers", *tags])),
        widget=[{"text": sample.prompt, "output": {"url": sample.after}} for sample in samples],
    )
    finite = [r for r in rewards if math.isfinite(r)]
    summary = (
        f"Mean reward went from {finite[0]:.4g} (first step) to {finite[-1]:.4g} (last step) over {len(finite)} steps."
        if finite
        else "No reward was logged."
    )
    links = tracker_links()
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=f"{repo_id.split('/')[-1]}: {method} {'LoRA for' if lora else 'fine-tune of'} "
        f"{(base_model or model_name).split('/')[-1]}",
        intro=f"LoRA weights for {base_link} trained"
        if lora
        else f"{base_link} with its whole `{trained_module}` fine-tuned",
        intro_note=""
        if lora
        else f" The other components are the base model's, saved beside the fine-tuned `{trained_module}`: this "
        "folder is a complete diffusers pipeline.",
        this_model="this LoRA" if lora else "the fine-tuned model",
        grids="\n".join(f"![{name}](samples_{name}.png)" for name in grids),
        method=method,
        rewards_text=f" against the reward(s) {', '.join(f'`{n}`' for n in reward_names)}"
        if reward_names
        else "",
        snippet=usage_snippet(model_name, base_model, repo_id, call_kwargs, samples[0], output_kind, lora),
        sample_rows="\n".join(_sample_row(sample) for sample in samples),
        reward_summary=summary,
        settings_table=settings_table(settings),
        license=license or DEFAULT_LICENSE,
        license_note=""
        if license
        else " The base model's license applies to these weights: set it with `trainer.push_to_hub(license=...)`.",
        trackers="".join(f"\nTraining run: [{name}]({url})\n" for name, url in links.items()),
        versions="\n".join(f"- {name}: {version}" for name, version in framework_versions().items()),
        citations="\n\n".join(CITATIONS[c] for c in citations if c in CITATIONS),
    )


def write_model_card_files(
    output_dir: str, card: ModelCard, pictures: dict[str, Image.Image | list[Image.Image]]
) -> None:
    """``README.md`` and the pictures it shows in ``output_dir``: ``pictures`` maps a file name (relative to
    ``output_dir``) to a PIL image, or to a video's frames, written as an animated GIF."""
    for name, picture in pictures.items():
        path = os.path.join(output_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(picture, list):
            export_to_gif(picture, path)
        else:
            picture.save(path)
    card.save(os.path.join(output_dir, "README.md"))
