"""The model card and the push to the Hub.

Mixed into :class:`~trl_visual.trainer.DiffusionGRPOTrainer` before :class:`transformers.Trainer`, whose
``create_model_card`` and ``push_to_hub`` it replaces (checked against transformers 5.3.0 (the floor) and 5.25.0). The card itself
(metadata, text, pictures) is made by :mod:`trl_visual.hub`; this mixin gathers what the run knows: its
prompts, samples before and after training from the pipeline's own ``__call__``, rewards and settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from ..hub import CardSample, build_model_card, dataset_repo_id, reward_curve_image, write_model_card_files
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


class ModelCardMixin:
    """``create_model_card`` and ``push_to_hub`` for a trainer with ``adapter``, ``pipeline``, ``shards_parameters``
    and the run's ``reward_names``, ``height``/``width``/``num_frames`` and ``_card_settings``."""

    _card_is_fresh = False
    _card_pictures: dict[str, Any] | None = None
    #: without LoRA, the card's "before" samples, taken from the base weights when training starts
    _base_samples: list[Any] | None = None

    #: how many distinct training prompts the model card shows
    _card_num_prompts = 4

    def _card_rows(self) -> list[dict[str, Any]]:
        """The first :attr:`_card_num_prompts` dataset rows with distinct prompts (one ``"a photo"`` row
        without a training set)."""
        rows: dict[str, dict[str, Any]] = {}
        for row in self.train_dataset or []:
            rows.setdefault(row[self.args.prompt_column], row)
            if len(rows) == self._card_num_prompts:
                break
        return list(rows.values()) or [{self.args.prompt_column: "a photo"}]

    def _card_call_kwargs(self, row: dict[str, Any] | None = None) -> dict[str, Any]:
        """The pipeline's ``__call__`` arguments that sample as the trainer does, deterministically."""
        return {
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.args.num_inference_steps,
            "max_sequence_length": self.args.max_sequence_length,
            "negative_prompt": self.args.negative_prompt if self.args.guidance_scale > 1 else None,
            **self.adapter.pipeline_call_kwargs(self.args.guidance_scale, self.num_frames, row),
        }

    @torch.no_grad()
    def _card_samples(self, rows: list[dict[str, Any]], reference: bool) -> list[Any]:
        """One sample per row from the pipeline's own ``__call__`` (a PIL image, or a video's frames), with
        seed ``args.seed + i`` on a CPU generator, so that ``pipe(prompt, generator=...)`` on a fresh pipeline
        with the saved LoRA gives the same picture. With ``reference``, the LoRA is disabled (the base model).

        A whole denoiser trained in float32 on a pipeline loaded in half precision samples under autocast to the
        loading dtype: its float32 latents would otherwise meet the half-precision VAE."""
        self.model.eval()
        self.pipeline.set_progress_bar_config(disable=True)
        context = self._reference_model(self.model) if reference else contextlib.nullcontext()
        samples = []
        on_device = text_encoders_on(self.adapter, self.accelerator.device)  # offloaded ones come and go back
        half = not self.is_peft and self.weight_dtype in (torch.float16, torch.bfloat16)
        loading_dtype = torch.autocast(self.accelerator.device.type, dtype=self.weight_dtype, enabled=half)
        with context, on_device, loading_dtype, self.compute_loss_context_manager():
            for i, row in enumerate(rows):
                output = self.pipeline(
                    prompt=row[self.args.prompt_column],
                    **self._card_call_kwargs(row),
                    generator=torch.Generator().manual_seed(self.args.seed + i),
                    output_type="pil",
                )
                samples.append(output.frames[0] if self.adapter.output_kind == "videos" else output.images[0])
        return samples

    def keep_base_samples(self) -> None:
        """Training the whole denoiser (no LoRA to switch off), sample the card's "before" pictures from the base
        weights now, before any step changes them: :meth:`train` calls this first, before a checkpoint is loaded.
        Once per trainer; skipped where only rank 0 would sample a sharded model, or where no card is written. The
        pictures never stop a run: when the pipeline cannot draw them (a missing optional package, say), a warning
        says why and the card marks them "(not kept)"."""
        if self.is_peft or self._base_samples is not None or self.shards_parameters:
            return
        if not (self.is_world_process_zero() and self.args.should_save):
            return
        try:
            self._base_samples = self._card_samples(self._card_rows(), reference=False)
        except Exception as error:  # noqa: BLE001 - the card's pictures are not worth a training run
            logger.warning(
                f"The model card's samples of the base model could not be drawn ({type(error).__name__}: {error}); "
                "the card will mark them as not kept."
            )

    def _has_before(self) -> bool:
        """Whether the card can show the base model's samples: from the LoRA-disabled model, from
        :meth:`keep_base_samples`, or from the live weights while nothing has been trained."""
        return self.is_peft or self._base_samples is not None or self.state.global_step == 0

    def _card_gallery(self, rows: list[dict[str, Any]]) -> list[CardSample]:
        """Each card row's prompt, seed (``args.seed + i``) and picture files (``.gif`` for videos)."""
        extension = "gif" if self.adapter.output_kind == "videos" else "png"
        before = self._has_before()
        return [
            CardSample(
                row[self.args.prompt_column],
                self.args.seed + i,
                f"images/before_{i}.{extension}" if before else None,
                f"images/after_{i}.{extension}",
            )
            for i, row in enumerate(rows)
        ]

    def _card_before(self, rows: list[dict[str, Any]], after: list[Any]) -> list[Any]:
        """The base model's samples: the LoRA-disabled model's, those kept at the start of training, or (nothing
        trained yet) the live model's; none when the base weights are gone (see :meth:`keep_base_samples`)."""
        if self.is_peft:
            return self._card_samples(rows, reference=True)
        if self._base_samples is not None:
            return self._base_samples
        return after if self.state.global_step == 0 else []

    def _card_pictures_for(self, rows: list[dict[str, Any]], gallery: list[CardSample]) -> dict[str, Any]:
        """The card's files: each prompt's sample before and after, and the two captioned grids."""
        after = self._card_samples(rows, reference=False)
        before = self._card_before(rows, after)
        prompts = [entry.prompt for entry in gallery]
        pictures: dict[str, Any] = {}
        for name, samples in (("before", before), ("after", after)):
            if not samples:
                continue
            pictures.update({getattr(entry, name): sample for entry, sample in zip(gallery, samples)})
            first_frames = [sample[0] if isinstance(sample, list) else sample for sample in samples]
            pictures[f"samples_{name}.png"] = captioned_grid(first_frames, prompts)
        return pictures

    def _card_settings_values(self) -> dict[str, Any]:
        """The settings table: the config fields of :attr:`_card_settings` with the resolved size, and the LoRA's."""
        values = {name: getattr(self.args, name, None) for name in self._card_settings}
        values.update(height=self.height, width=self.width)
        values["num_frames"] = self.num_frames if self.adapter.output_kind == "videos" else None
        if self.is_peft:
            config = self.accelerator.unwrap_model(self.model).peft_config["default"]
            values.update(lora_r=config.r, lora_alpha=config.lora_alpha, use_dora=config.use_dora or None)
        return values

    def create_model_card(
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
        if not (self.is_world_process_zero() or self.shards_parameters):
            return
        rows = self._card_rows()
        gallery = self._card_gallery(rows)
        if not (self._card_is_fresh and self._card_pictures):  # push_to_hub asks twice: sample once
            self._card_pictures = self._card_pictures_for(rows, gallery)
        if not self.is_world_process_zero():
            return
        rewards = [entry["reward"] for entry in self.state.log_history if "reward" in entry]
        repo_id = (
            getattr(self, "hub_model_id", None)
            or self.args.hub_model_id
            or model_name
            or os.path.basename(os.path.abspath(self.args.output_dir))
        )
        datasets = [dataset_tags] if isinstance(dataset_tags, str) else dataset_tags
        card = build_model_card(
            model_name=self.base_model_name,
            repo_id=repo_id,
            method=self._method_name,
            pipeline_tag=self.adapter.pipeline_tag,
            reward_names=self.reward_names,
            rewards=rewards,
            settings=self._card_settings_values(),
            citations=self._citations,
            samples=gallery,
            call_kwargs=self._card_call_kwargs(rows[0]),
            output_kind=self.adapter.output_kind,
            trained_module=None if self.is_peft else self.adapter.denoiser_name,
            license=license,
            datasets=datasets or [name for name in [dataset_repo_id(self.train_dataset)] if name],
            tags=[tags] if isinstance(tags, str) else (tags or []),
        )
        steps = [entry["step"] for entry in self.state.log_history if "reward" in entry]
        pictures = {**self._card_pictures, "reward_curve.png": reward_curve_image(rewards, steps=steps)}
        write_model_card_files(self.args.output_dir, card, pictures)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repository at the start of a ``push_to_hub`` run, as ``transformers.Trainer`` does; when
        the Hub cannot be reached or refuses, say so in one message before anything is trained.

        Maintenance: wraps ``Trainer.init_hf_repo``, checked against transformers 5.3.0 and 5.25.0.
        """
        from huggingface_hub.errors import HTTPError

        try:
            # transformers < 5.23 has no `private` here; it is passed only by the versions that have it
            super().init_hf_repo(token=token, **({} if private is None else {"private": private}))
        except (HTTPError, OSError) as error:  # no network, no token, no write access, a bad repository name
            repo = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
            detail = (str(error).strip().splitlines() or [""])[0]
            raise HubRepositoryError(
                f"push_to_hub: could not create the Hub repository {repo!r} ({type(error).__name__}: {detail}). "
                "Nothing has been trained yet. Log in with `hf auth login` and check the network and "
                "`hub_model_id`, or train without push_to_hub and push the saved folder later "
                "(trainer.push_to_hub() or `hf upload`)."
            ) from error

    def push_to_hub(
        self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs: Any
    ) -> Any:
        """Save the LoRA and the model card to ``output_dir`` first, then upload the folder. Without network
        or token the error says so, and the local files stay where they are. ``kwargs`` (``license``,
        ``dataset_tags``, ``tags``, …) go to :meth:`create_model_card`."""
        self.save_model(self.args.output_dir, _internal_call=True)
        card_kwargs = {
            k: v for k, v in kwargs.items() if k in ("model_name", "tags", "license", "dataset_tags")
        }
        self.create_model_card(**card_kwargs)
        self._card_is_fresh = True  # Trainer.push_to_hub asks for the card again: keep its pictures
        try:
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, **kwargs)
        except Exception as error:
            cause = _push_failure(error)
            raise HubPushError(
                f"Could not push to the Hub ({cause}). The trained weights and the model card "
                f"are saved in {os.path.abspath(self.args.output_dir)}. Log in with `hf auth login` (and check the "
                "network and `hub_model_id`), then call trainer.push_to_hub() again or upload that folder with "
                "`hf upload`."
            ) from error
        finally:
            self._card_is_fresh, self._card_pictures = False, None
