"""The miniature world: a small pretrained world where prompts mean something and learning can be shown.

- :mod:`~trl_visual.miniature.scenes`: procedural 32×32 scenes of one or two coloured shapes, their captions
  (full, partial, vague), a ``datasets.Dataset`` builder and the prompt sets ``builtin:shapes`` /
  ``builtin:shapes-ambiguous`` / ``builtin:shapes-pairs``;
- :mod:`~trl_visual.miniature.pipeline`: ``tiny:shapes``, a pretrained miniature ``StableDiffusion3Pipeline`` of
  one-shape scenes, ``tiny:shapes-pairs``, the same architecture trained on one- and two-shape scenes, and
  ``tiny:scenes``, trained on one shape over structured backgrounds (horizons, stripes, tiles);
- :mod:`~trl_visual.miniature.classifier`: the scene classifier, and its features as the ViPO backbone
  ``tiny:shapes-features``;
- :mod:`~trl_visual.miniature.reward`: the ``shapes_adherence`` reward (two-shape prompts judged shape by
  shape), ``shapes_purity`` and ``shapes_judge``;
- :mod:`~trl_visual.miniature.structure`: the structured world's measure of kept structure (edge-map
  correlation), its object-region oracle map and its ViPO backbone ``tiny:scenes-features``;
- :mod:`~trl_visual.miniature.train` and :mod:`~trl_visual.miniature.evaluate`: the scripts that made the
  shipped weights and measure them;
- :mod:`~trl_visual.miniature.before_after`: the picture of a GRPO run's samples, base model above and trained
  model below, from the same noise.

Submodules are imported on use (``import trl_visual.miniature`` loads nothing heavy). :data:`MINIATURE_MODELS` is the
one table of the miniature models: name → loader, recipe, backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GRPO_DEFAULTS: dict = {
    "dataset_name": "builtin:shapes",
    "reward_funcs": ["shapes_adherence"],
    "output_dir": "tiny-shapes-grpo",
    # sampling: 4 Euler/SDE steps of the shift-1 schedule, no guidance (CFG 1 leaves headroom: 0.73)
    "num_inference_steps": 4,
    "guidance_scale": 1.0,
    # GRPO: 8 prompts × 8 samples a step; advantages scaled by the batch's std, so that a group whose samples
    # all score ~1 gives ~0 advantages rather than noise blown up to ±1
    "num_generations": 8,
    "per_device_train_batch_size": 64,
    "scale_rewards": "batch",
    # train the first (high-noise) half of the steps, where the shape is decided
    "timestep_fraction": 0.5,
    # small, constant steps: the pretrained denoiser sits at a sharp optimum (a step of 0.1 in weight norm along
    # the policy gradient already lowers the reward), and AdamW at 1e-4 moves its 2.3 M weights ~0.15 a step
    "learning_rate": 2e-5,
    "lr_scheduler_type": "constant",
    # 24 steps: under a minute of CPU, with the evaluation reward up +0.024 to +0.050 (seeds 0, 1, 2)
    "max_steps": 24,
    # evaluation before training and at the end: one deterministic sample per row of builtin:shapes' test split
    # (48 prompts × 4) from fixed noise, so that the printed before -> after is the training's effect
    "dataset_test_split": "test",
    "eval_strategy": "steps",
    "eval_steps": 24,
    "eval_on_start": True,
    "per_device_eval_batch_size": 64,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "torch_num_threads": 1,
}
"""``trl-visual`` defaults for ``--model_name_or_path tiny:shapes`` (:data:`MINIATURE_MODELS`): what
makes GRPO raise ``shapes_adherence`` on it within about a minute of CPU (``docs/miniature.md`` has the figures).
A ``--config`` file and the flags override them."""


PAIRS_GRPO_DEFAULTS: dict = {
    **GRPO_DEFAULTS,
    "dataset_name": "builtin:shapes-pairs",
    "output_dir": "tiny-shapes-pairs-grpo",
}
"""``trl-visual`` defaults for ``--model_name_or_path tiny:shapes-pairs``: :data:`GRPO_DEFAULTS` on the two-shape
prompts. They raise the evaluation reward a little (+0.021 ± 0.003 in 24 steps, seeds 0 to 2; +0.006 for the
default seed) without fixing attribute binding across the 576 prompts (``docs/results.md``)."""

SCENES_GRPO_DEFAULTS: dict = {
    **GRPO_DEFAULTS,
    "reward_funcs": ["scenes_adherence"],
    "output_dir": "tiny-scenes-grpo",
}
"""``trl-visual`` defaults for ``--model_name_or_path tiny:scenes``: :data:`GRPO_DEFAULTS` on the one-shape
prompts, judged by the classifier trained on the structured scenes (``scenes_adherence``)."""


@dataclass(frozen=True)
class MiniatureModel:
    """One pretrained model of the miniature world: how it loads, the ``trl-visual`` recipe that learns on it, and
    the backbone ViPO sees its world with."""

    name: str
    #: the function of :mod:`trl_visual.miniature.pipeline` that loads it (imported on use: diffusers is heavy)
    loader: str
    #: GRPO's recipe on it; BPGO and ViPO take the same (:meth:`method_defaults`)
    grpo_defaults: dict
    #: the named backbone (:mod:`trl_visual.named_backbones`) ViPO's recipe sees with
    backbone: str

    def load(self, seed: int = 0) -> Any:
        """The pretrained pipeline, offline, from the weights shipped with the package."""
        from . import pipeline

        return getattr(pipeline, self.loader)(seed=seed)

    def method_defaults(self) -> dict[str, dict]:
        """``trl-visual <command>`` → its defaults: the same recipe for all three commands, each writing to its own
        folder (``…-grpo`` becomes ``…-bpgo``, ``…-vipo``); ViPO sees with the model's own :attr:`backbone`."""
        grpo = self.grpo_defaults
        stem = grpo["output_dir"].removesuffix("-grpo")
        return {
            "grpo": grpo,
            "bpgo": {**grpo, "output_dir": f"{stem}-bpgo"},
            "vipo": {**grpo, "output_dir": f"{stem}-vipo", "backbone": self.backbone},
        }


MINIATURE_MODELS: dict[str, MiniatureModel] = {
    model.name: model
    for model in (
        MiniatureModel("tiny:shapes", "load_shapes_pipeline", GRPO_DEFAULTS, "tiny:shapes-features"),
        MiniatureModel(
            "tiny:shapes-pairs", "load_shapes_pairs_pipeline", PAIRS_GRPO_DEFAULTS, "tiny:shapes-features"
        ),
        MiniatureModel("tiny:scenes", "load_scenes_pipeline", SCENES_GRPO_DEFAULTS, "tiny:scenes-features"),
    )
}
"""The one table of the miniature models, by name: the ``tiny:`` loader (:mod:`trl_visual.testing`), the command
line's defaults (``trl-visual grpo --model_name_or_path tiny:shapes``) and :func:`recipe_fields` read it."""

RECIPE_COMMANDS: dict[str, str] = {
    "DiffusionGRPOConfig": "grpo",
    "BPGOConfig": "bpgo",
    "ViPOConfig": "vipo",
    "BPGOViPOConfig": "vipo",
}
"""Config class name → the ``trl-visual`` command whose recipe it takes (BPGO + ViPO takes ViPO's backbone)."""


def recipe_fields(model_name: str, config_class: type) -> dict:
    """The config fields of ``model_name``'s recipe for ``config_class`` (:data:`MINIATURE_MODELS`): what
    ``trl-visual <command> --model_name_or_path model_name`` sets, less the command's own arguments (the prompt set,
    the rewards, the test split, the thread count), which a Python script passes to the trainer."""
    if model_name not in MINIATURE_MODELS:
        raise ValueError(
            f"No recipe for {model_name!r}: recipes exist for {', '.join(MINIATURE_MODELS)}. For another model, "
            f"build {config_class.__name__}(...) yourself (examples/configs/ has settings for the real models)."
        )
    command = next(RECIPE_COMMANDS[c.__name__] for c in config_class.__mro__ if c.__name__ in RECIPE_COMMANDS)
    fields = set(config_class.__dataclass_fields__)
    recipe = MINIATURE_MODELS[model_name].method_defaults()[command]
    return {key: value for key, value in recipe.items() if key in fields}
