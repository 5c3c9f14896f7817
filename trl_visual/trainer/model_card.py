"""The model card and the push to the Hub.

:class:`ModelCardWriter` is the collaborator behind :class:`~trl_visual.trainer.DiffusionGRPOTrainer`'s
``create_model_card`` and ``push_to_hub`` overrides. The card itself (metadata, text, pictures) is made by
:mod:`trl_visual.hub`; the writer gathers what the run knows: its prompts, samples before and after training from
the pipeline's own ``__call__``, rewards and settings. What it reads from the trainer is :class:`CardTrainer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..hub import CardSample, build_model_card, dataset_repo_id, reward_curve_image, write_model_card_files
from .ema import EMA, ema_weights
from .logging_utils import captioned_grid
from .memory import text_encoders_on

logger = logging.getLogger(__name__)


class HubRepositoryError(RuntimeError):
    """The Hub repository that ``push_to_hub`` writes to could not be created when the run started."""


class HubPushError(RuntimeError):
    """Pushing to the Hub failed after the weights and the model card were saved in ``output_dir``."""


def _push_failure(error: BaseException) -> str:
    """``Type: first line`` of what made a push fail. ``Trainer.push_to_hub`` creates the repository first when the
    run did not: that failure is told by what the Hub answered, not by :class:`HubRepositoryError`'s message, which
    is written for the start of a run ("nothing has been trained yet")."""
    if isinstance(error, HubRepositoryError) and error.__cause__ is not None:
        repo = "creating the repository failed: "
        error = error.__cause__
    else:
        repo = ""
    detail = (str(error).strip().splitlines() or [""])[0]
    return f"{repo}{type(error).__name__}: {detail}"


#: the config fields a card's settings table lists (a trainer's ``_card_settings``)
CARD_SETTINGS = (
    "learning_rate",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_inference_steps",
    "guidance_scale",
    "sde_type",
    "noise_level",
    "epsilon",
    "beta",
    "timestep_fraction",
    "sde_window_size",
    "height",
    "width",
    "num_frames",
)


#: the arguments of ``create_model_card`` (and of ``push_to_hub``'s ``kwargs``) that the card takes
CARD_ARGUMENTS = ("model_name", "tags", "license", "dataset_tags")


class CardTrainer(Protocol):
    """What the model card reads from the trainer (:class:`~trl_visual.trainer.DiffusionGRPOTrainer` has it)."""

    args: Any
    state: Any
    accelerator: Any
    model: torch.nn.Module
    train_dataset: Any
    adapter: Any
    pipeline: Any
    ema: EMA | None
    is_peft: bool
    weight_dtype: torch.dtype
    height: int
    width: int
    num_frames: int | None
    base_model_name: str
    reward_names: list[str]
    _method_name: str
    _citations: list[str]
    _card_settings: list[str]

    @property
    def shards_parameters(self) -> bool: ...

    def is_world_process_zero(self) -> bool: ...

    def compute_loss_context_manager(self) -> Any: ...

    def _reference_model(
        self, model: torch.nn.Module
    ) -> contextlib.AbstractContextManager[torch.nn.Module]: ...


def repository_error(error: BaseException, args: Any) -> HubRepositoryError:
    """The one-line error for a Hub repository that could not be created when a ``push_to_hub`` run starts."""
    repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    detail = (str(error).strip().splitlines() or [""])[0]
    return HubRepositoryError(
        f"push_to_hub: could not create the Hub repository {repo!r} ({type(error).__name__}: {detail}). "
        "Nothing has been trained yet. Log in with `hf auth login` and check the network and "
        "`hub_model_id`, or train without push_to_hub and push the saved folder later "
        "(trainer.push_to_hub() or `hf upload`)."
    )


def push_error(error: BaseException, output_dir: str) -> HubPushError:
    """The error for a push that failed after the weights and the card were saved in ``output_dir``."""
    return HubPushError(
        f"Could not push to the Hub ({_push_failure(error)}). The trained weights and the model card "
        f"are saved in {os.path.abspath(output_dir)}. Log in with `hf auth login` (and check the "
        "network and `hub_model_id`), then call trainer.push_to_hub() again or upload that folder with "
        "`hf upload`."
    )


class ModelCardWriter:
    """Writes ``trainer``'s model card (``README.md`` and its pictures) into ``output_dir``."""

    #: how many distinct training prompts the model card shows
    num_prompts = 4

    def __init__(self, trainer: CardTrainer):
        self.trainer = trainer
        #: ``push_to_hub`` writes the card, then ``Trainer.push_to_hub`` asks for it again: keep the pictures
        self.fresh = False
        self.pictures: dict[str, Any] | None = None
        #: without LoRA, the card's "before" samples, taken from the base weights when training starts
        self.base_samples: list[Any] | None = None

    @contextlib.contextmanager
    def pushing(self) -> Iterator[None]:
        """Within, the card written first is kept for ``Trainer.push_to_hub``'s own call."""
        self.fresh = True
        try:
            yield
        finally:
            self.fresh, self.pictures = False, None

    def rows(self) -> list[dict[str, Any]]:
        """The first :attr:`num_prompts` dataset rows with distinct prompts (one ``"a photo"`` row
        without a training set)."""
        rows: dict[str, dict[str, Any]] = {}
        for row in self.trainer.train_dataset or []:
            rows.setdefault(row[self.trainer.args.prompt_column], row)
            if len(rows) == self.num_prompts:
                break
        return list(rows.values()) or [{self.trainer.args.prompt_column: "a photo"}]

    def call_kwargs(self, row: dict[str, Any] | None = None) -> dict[str, Any]:
        """The pipeline's ``__call__`` arguments that sample as the trainer does, deterministically."""
        return {
            "height": self.trainer.height,
            "width": self.trainer.width,
            "num_inference_steps": self.trainer.args.num_inference_steps,
            "max_sequence_length": self.trainer.args.max_sequence_length,
            "negative_prompt": self.trainer.args.negative_prompt
            if self.trainer.args.guidance_scale > 1
            else None,
            **self.trainer.adapter.pipeline_call_kwargs(
                self.trainer.args.guidance_scale, self.trainer.num_frames, row
            ),
        }

    @torch.no_grad()
    def samples(self, rows: list[dict[str, Any]], reference: bool) -> list[Any]:
        """One sample per row from the pipeline's own ``__call__`` (a PIL image, or a video's frames), with
        seed ``args.seed + i`` on a CPU generator, so that ``pipe(prompt, generator=...)`` on a fresh pipeline
        with the saved LoRA gives the same picture: from the EMA's weights with ``use_ema``. With ``reference``,
        the LoRA is disabled (the base model).

        A whole denoiser trained in float32 on a pipeline loaded in half precision samples under autocast to the
        loading dtype: its float32 latents would otherwise meet the half-precision VAE."""
        self.trainer.model.eval()
        self.trainer.pipeline.set_progress_bar_config(disable=True)
        context = self.trainer._reference_model(self.trainer.model) if reference else contextlib.nullcontext()
        samples = []
        on_device = text_encoders_on(
            self.trainer.adapter, self.trainer.accelerator.device
        )  # offloaded ones come and go back
        half = not self.trainer.is_peft and self.trainer.weight_dtype in (torch.float16, torch.bfloat16)
        loading_dtype = torch.autocast(
            self.trainer.accelerator.device.type, dtype=self.trainer.weight_dtype, enabled=half
        )
        with (
            ema_weights(self.trainer.ema),
            context,
            on_device,
            loading_dtype,
            self.trainer.compute_loss_context_manager(),
        ):
            for i, row in enumerate(rows):
                output = self.trainer.pipeline(
                    prompt=row[self.trainer.args.prompt_column],
                    **self.call_kwargs(row),
                    generator=torch.Generator().manual_seed(self.trainer.args.seed + i),
                    output_type="pil",
                )
                samples.append(
                    output.frames[0] if self.trainer.adapter.output_kind == "videos" else output.images[0]
                )
        return samples

    def keep_base_samples(self) -> None:
        """Training the whole denoiser (no LoRA to switch off), sample the card's "before" pictures from the base
        weights now, before any step changes them: :meth:`train` calls this first, before a checkpoint is loaded.
        Once per trainer; skipped where only rank 0 would sample a sharded model, or where no card is written. The
        pictures never stop a run: when the pipeline cannot draw them (a missing optional package, say), a warning
        says why and the card marks them "(not kept)"."""
        if self.trainer.is_peft or self.base_samples is not None or self.trainer.shards_parameters:
            return
        if not (self.trainer.is_world_process_zero() and self.trainer.args.should_save):
            return
        try:
            self.base_samples = self.samples(self.rows(), reference=False)
        except Exception as error:  # noqa: BLE001 - the card's pictures are not worth a training run
            logger.warning(
                f"The model card's samples of the base model could not be drawn ({type(error).__name__}: {error}); "
                "the card will mark them as not kept."
            )

    def _has_before(self) -> bool:
        """Whether the card can show the base model's samples: from the LoRA-disabled model, from
        :meth:`keep_base_samples`, or from the live weights while nothing has been trained."""
        return self.trainer.is_peft or self.base_samples is not None or self.trainer.state.global_step == 0

    def gallery(self, rows: list[dict[str, Any]]) -> list[CardSample]:
        """Each card row's prompt, seed (``args.seed + i``) and picture files (``.gif`` for videos)."""
        extension = "gif" if self.trainer.adapter.output_kind == "videos" else "png"
        before = self._has_before()
        return [
            CardSample(
                row[self.trainer.args.prompt_column],
                self.trainer.args.seed + i,
                f"images/before_{i}.{extension}" if before else None,
                f"images/after_{i}.{extension}",
            )
            for i, row in enumerate(rows)
        ]

    def _before(self, rows: list[dict[str, Any]], after: list[Any]) -> list[Any]:
        """The base model's samples: the LoRA-disabled model's, those kept at the start of training, or (nothing
        trained yet) the live model's; none when the base weights are gone (see :meth:`keep_base_samples`)."""
        if self.trainer.is_peft:
            return self.samples(rows, reference=True)
        if self.base_samples is not None:
            return self.base_samples
        return after if self.trainer.state.global_step == 0 else []

    def pictures_for(self, rows: list[dict[str, Any]], gallery: list[CardSample]) -> dict[str, Any]:
        """The card's files: each prompt's sample before and after, and the two captioned grids."""
        after = self.samples(rows, reference=False)
        before = self._before(rows, after)
        prompts = [entry.prompt for entry in gallery]
        pictures: dict[str, Any] = {}
        for name, samples in (("before", before), ("after", after)):
            if not samples:
                continue
            pictures.update({getattr(entry, name): sample for entry, sample in zip(gallery, samples)})
            first_frames = [sample[0] if isinstance(sample, list) else sample for sample in samples]
            pictures[f"samples_{name}.png"] = captioned_grid(first_frames, prompts)
        return pictures

    def settings_values(self) -> dict[str, Any]:
        """The settings table: the config fields of :attr:`_card_settings` with the resolved size, and the LoRA's."""
        values = {name: getattr(self.trainer.args, name, None) for name in self.trainer._card_settings}
        values.update(height=self.trainer.height, width=self.trainer.width)
        values["num_frames"] = (
            self.trainer.num_frames if self.trainer.adapter.output_kind == "videos" else None
        )
        if self.trainer.is_peft:
            config = self.trainer.accelerator.unwrap_model(self.trainer.model).peft_config["default"]
            values.update(lora_r=config.r, lora_alpha=config.lora_alpha, use_dora=config.use_dora or None)
        return values

    def write(
        self,
        model_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
        dataset_tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``README.md`` (made with ``huggingface_hub``'s card tools) and the pictures it shows to
        ``output_dir``: Hub metadata (``base_model`` only when the base is a Hub repo, ``license``, ``datasets``,
        a ``widget`` gallery), a snippet that loads the base model and the LoRA, samples before and after
        training (same prompts and seeds, made by the pipeline's own ``__call__`` so the snippet reproduces
        them), the reward curve, the settings, tracker links, framework versions and the method's citations.

        ``license`` defaults to the base model's (when its card is on this machine), else ``"other"``;
        ``dataset_tags`` to the training set's Hub id when it was loaded from the Hub.

        Rank 0 writes. When the engine shards the weights (FSDP, ZeRO-3) every forward is a collective, so every
        rank must call this: all of them sample the card's pictures together, then the others return.
        """
        if not (self.trainer.is_world_process_zero() or self.trainer.shards_parameters):
            return
        rows = self.rows()
        gallery = self.gallery(rows)
        if not (self.fresh and self.pictures):  # push_to_hub asks twice: sample once
            self.pictures = self.pictures_for(rows, gallery)
        if not self.trainer.is_world_process_zero():
            return
        rewards = [entry["reward"] for entry in self.trainer.state.log_history if "reward" in entry]
        repo_id = (
            getattr(self.trainer, "hub_model_id", None)
            or self.trainer.args.hub_model_id
            or model_name
            or os.path.basename(os.path.abspath(self.trainer.args.output_dir))
        )
        datasets = [dataset_tags] if isinstance(dataset_tags, str) else dataset_tags
        card = build_model_card(
            model_name=self.trainer.base_model_name,
            repo_id=repo_id,
            method=self.trainer._method_name,
            pipeline_tag=self.trainer.adapter.pipeline_tag,
            reward_names=self.trainer.reward_names,
            rewards=rewards,
            settings=self.settings_values(),
            citations=self.trainer._citations,
            samples=gallery,
            call_kwargs=self.call_kwargs(rows[0]),
            output_kind=self.trainer.adapter.output_kind,
            trained_module=None if self.trainer.is_peft else self.trainer.adapter.denoiser_name,
            license=license,
            datasets=datasets or [name for name in [dataset_repo_id(self.trainer.train_dataset)] if name],
            tags=[tags] if isinstance(tags, str) else (tags or []),
        )
        steps = [entry["step"] for entry in self.trainer.state.log_history if "reward" in entry]
        pictures = {**self.pictures, "reward_curve.png": reward_curve_image(rewards, steps=steps)}
        write_model_card_files(self.trainer.args.output_dir, card, pictures)
