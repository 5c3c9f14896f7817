"""The miniature world: a small pretrained world where prompts mean something and learning can be shown.

- :mod:`~trl_visual.miniature.scenes`: procedural 32×32 scenes of one coloured shape, their captions (full,
  partial, vague), a ``datasets.Dataset`` builder and the prompt sets ``builtin:shapes`` /
  ``builtin:shapes-ambiguous``;
- :mod:`~trl_visual.miniature.pipeline`: ``tiny:shapes``, a pretrained miniature ``StableDiffusion3Pipeline``;
- :mod:`~trl_visual.miniature.classifier`: the scene classifier, and its features as the ViPO backbone
  ``tiny:shapes-features``;
- :mod:`~trl_visual.miniature.reward`: the ``shapes_adherence`` reward;
- :mod:`~trl_visual.miniature.train` and :mod:`~trl_visual.miniature.evaluate`: the scripts that made the
  shipped weights and measure them.

Submodules are imported on use (``import trl_visual.miniature`` loads nothing heavy).
"""
