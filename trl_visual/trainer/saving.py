"""Saving and loading what a run trained: the LoRA in diffusers' format, atomic checkpoints, resuming.

Mixed into :class:`~trl_visual.trainer.DiffusionGRPOTrainer` before :class:`transformers.Trainer`, whose
private saving methods it extends. Each override does its own work around ``super()``; they were checked
against transformers 5.3.0 (the floor) and 5.25.0, and are listed in :mod:`trl_visual._upstream`, whose test checks
them on the installed version:

* ``_save`` writes the LoRA with ``save_lora_weights`` (what ``pipe.load_lora_weights`` reads), not a peft file,
  taken from the state dict ``Trainer.save_model`` gathered (FSDP's full state dict, ZeRO-3's 16-bit one);
* ``_save_checkpoint`` stages the checkpoint, makes its bytes durable (``fsync``) and renames it into place, so a
  crash (or a power cut) never leaves half of one;
* ``_get_output_dir`` points ``Trainer``'s checkpoint writing at the staging folder while it saves;
* ``_push_from_checkpoint`` adds the LoRA file to what ``Trainer`` uploads;
* ``_load_from_checkpoint`` loads the LoRA (and the method's state) back;
* ``_prepare_for_training`` loads them around the engine's wrapping where ``Trainer`` would not: under FSDP the
  weights before the model is sharded (so that each rank reads the whole file), under DeepSpeed the method's
  state (DeepSpeed restores the weights and the optimizer from its own ``global_step*`` folder).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from peft import get_peft_model_state_dict
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from ..checkpointing import LORA_WEIGHTS_NAME, METHOD_STATE_NAME, check_checkpoint
from ..lora_io import load_lora_checkpoint, save_full_denoiser, save_lora, save_pipeline_around
from ..state_files import load_state_file, save_state_file
from .output_dir import naming_a_full_disk


def fsync_dir(path: str) -> None:
    """Make ``path``'s entries (the names of its files and folders) durable. POSIX only: a folder cannot be
    opened for ``fsync`` on Windows, where renames are journaled by NTFS."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """``fsync`` every file under ``folder``, then every folder (deepest first, ``folder`` last): after this,
    a power cut cannot leave a renamed checkpoint with missing or zero-length files."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


class CheckpointSavingMixin:
    """LoRA export, atomic checkpoints and resuming, for a trainer with ``adapter``, ``pipeline``, ``is_peft``,
    ``weight_dtype``, the :meth:`method_state` / :meth:`load_method_state` hooks and
    :class:`~trl_visual.trainer.ema.EMAMixin`'s ``_save_ema_state`` / ``_load_ema_state``."""

    _staging_dir: str | None = None
    #: the folder name of the checkpoint being written when it is not ``checkpoint-N``: a stop checkpoint
    #: (``stopped-at-step-N``, see ``_save_before_stopping``), neither rotated nor pushed
    _stop_checkpoint_name: str | None = None

    def _checked_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint folder to resume (``True``: the last one in ``output_dir``), checked; ``None`` for
        a new run."""
        if resume_from_checkpoint in (None, False):
            return None
        if resume_from_checkpoint is True:
            output_dir = self.args.output_dir
            found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            if found is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {output_dir} holds no checkpoint-N folder. Pass a checkpoint "
                    "folder, or leave resume_from_checkpoint unset to start a new run."
                )
            resume_from_checkpoint = found
        denoiser = self.accelerator.unwrap_model(self.model)
        lora = get_peft_model_state_dict(denoiser) if self.is_peft else None
        check_checkpoint(
            str(resume_from_checkpoint),
            lora_shapes={key: tuple(value.shape) for key, value in lora.items()}
            if lora is not None
            else None,
            denoiser_name=self.adapter.denoiser_name,
            expects_method_state=bool(self.method_state()),
            weights_only=self.args.resume_weights_only,
            process_index=self.args.process_index,
            world_size=self.args.world_size,
        )
        return str(resume_from_checkpoint)

    def _get_output_dir(self, trial: Any) -> str:
        """The staging folder while a checkpoint is being written.
        Private ``Trainer`` override, checked against transformers 5.3.0 (the floor) and 5.25.0."""
        return self._staging_dir or super()._get_output_dir(trial=trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``Trainer`` uploads ``output_dir`` with copies of the checkpoint's transformers/peft weight files;
        the LoRA file (diffusers' name) is copied there too, so every checkpoint push carries it.
        Private ``Trainer`` override, checked against transformers 5.3.0 (the floor) and 5.25.0."""
        if self._staging_dir is None:  # pushed once the checkpoint has its final name
            lora = os.path.join(checkpoint_folder, LORA_WEIGHTS_NAME)
            if self.is_world_process_zero() and os.path.isfile(lora):
                shutil.copy(lora, os.path.join(self.args.output_dir, LORA_WEIGHTS_NAME))
            super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write the checkpoint aside (``output_dir/.staging/checkpoint-N``), ``fsync`` its files and folders,
        then rename it into place (and ``fsync`` ``output_dir``), so a crash or power cut in the middle of a save
        never leaves a partial ``checkpoint-N`` for ``resume_from_checkpoint=True`` to pick up; older checkpoints
        are rotated only afterwards. The rename waits for every process to have written its files into the
        staging folder.
        Private ``Trainer`` override, checked against transformers 5.3.0 (the floor) and 5.25.0."""
        run_dir = super()._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, ".staging")
        self._staging_dir = staging_root
        try:
            with naming_a_full_disk(staging_root, f"the checkpoint {name}"):
                super()._save_checkpoint(model, trial)
                state = self.method_state()
                if state and self.args.should_save:
                    save_state_file(state, os.path.join(staging_root, name, METHOD_STATE_NAME))
                self._save_ema_state(os.path.join(staging_root, name))
                self._save_iteration_state(os.path.join(staging_root, name))
        except OSError:
            shutil.rmtree(staging_root, ignore_errors=True)  # no half-written checkpoint stays behind
            raise
        finally:
            self._staging_dir = None
        # every rank writes its own files (rng_state_<rank>.pth) into the staging folder: rename it only after all
        # have, or a slower rank's file lands in a folder that is then deleted
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final, staged = (
                os.path.join(run_dir, self._stop_checkpoint_name or name),
                os.path.join(staging_root, name),
            )
            fsync_tree(staged)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            fsync_dir(run_dir)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and self._stop_checkpoint_name is None:
            self._push_from_checkpoint(os.path.join(run_dir, name))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the LoRA in diffusers' format with its adapter config in the file's metadata
        (``pipe.load_lora_weights(output_dir)`` loads it at the trained ``lora_alpha / r``), or, training without
        LoRA, the full denoiser and (outside checkpoints) the rest of the pipeline (:meth:`_save_full_denoiser`).
        Rank 0 writes.

        ``state_dict`` is what ``Trainer.save_model`` gathered on every rank when the engine shards the weights
        (FSDP's full state dict, ZeRO-3's 16-bit one): the weights are taken from it, since the live model then
        holds only this rank's shards. Without it (one process, DDP, ZeRO-2) they are the live model's.
        Private ``Trainer`` override, checked against transformers 5.3.0 (the floor) and 5.25.0."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        with naming_a_full_disk(output_dir, f"the weights for {output_dir}"):
            self._write_weights(output_dir, state_dict)

    def _write_weights(self, output_dir: str, state_dict: dict | None) -> None:
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.accelerator.unwrap_model(self.model)
        if self.is_peft:
            save_lora(
                type(self.pipeline),
                output_dir,
                denoiser,
                self.adapter.denoiser_name,
                dtype=self._lora_save_dtype(),
                state_dict=state_dict,
            )
        else:
            self._save_full_denoiser(output_dir, denoiser, state_dict)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_full_denoiser(
        self, output_dir: str, denoiser: torch.nn.Module, state_dict: dict | None
    ) -> None:
        """The fully trained denoiser in ``output_dir/<denoiser_name>`` (``from_pretrained`` loads it). Outside a
        checkpoint (``save_model``, ``push_to_hub``) the pipeline's other, frozen components and ``model_index.json``
        are written around it, as diffusers' full fine-tuning scripts save their result, so that
        ``DiffusionPipeline.from_pretrained(output_dir)`` loads the fine-tuned pipeline; a checkpoint keeps only
        the trained weights."""
        folder = os.path.join(output_dir, self.adapter.denoiser_name)
        if state_dict is not None:
            save_full_denoiser(denoiser, state_dict, folder)
        else:
            denoiser.save_pretrained(folder)
        if self._staging_dir is None:
            save_pipeline_around(self.pipeline, output_dir, self.adapter.denoiser_name)

    def _lora_save_dtype(self) -> torch.dtype | None:
        """The dtype of the LoRA weights being written: as trained (float32) while a checkpoint is written
        (:meth:`_save_checkpoint` sets ``_staging_dir``), so that resuming is exact, and the dtype the pipeline
        was loaded in everywhere else (``save_model``, ``push_to_hub``), as diffusers' training scripts export a
        LoRA by default (without ``--upcast_before_saving``)."""
        return None if self._staging_dir is not None else self.weight_dtype

    def _prepare_for_training(
        self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None
    ):
        """``Trainer``'s wrapping of the model by the engine, with what it does not load on resume under FSDP
        (the weights, into the model before it is sharded) and DeepSpeed (the method's state)."""
        if resume_from_checkpoint is not None and self.is_fsdp_enabled:
            self._load_trained_weights(resume_from_checkpoint, self.model)
        prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if resume_from_checkpoint is not None and self.is_deepspeed_enabled:
            self._load_method_state_from(resume_from_checkpoint)
        return prepared

    def _load_method_state_from(self, checkpoint: str) -> None:
        state_file = os.path.join(checkpoint, METHOD_STATE_NAME)
        if os.path.exists(state_file):
            self.load_method_state(load_state_file(state_file))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """Load the denoiser's trained weights (and the method's state) back from a checkpoint. Under FSDP
        ``Trainer`` calls this after sharding the model: the weights are in already (:meth:`_prepare_for_training`).
        Private ``Trainer`` override, checked against transformers 5.3.0 (the floor) and 5.25.0."""
        self._load_method_state_from(resume_from_checkpoint)
        if not self.is_fsdp_enabled:
            self._load_trained_weights(resume_from_checkpoint, model if model is not None else self.model)

    def _load_trained_weights(self, resume_from_checkpoint: str, model: torch.nn.Module) -> None:
        denoiser = self.accelerator.unwrap_model(model)
        if self.is_peft:
            load_lora_checkpoint(
                type(self.pipeline), resume_from_checkpoint, denoiser, self.adapter.denoiser_name
            )
        else:
            loaded = type(denoiser).from_pretrained(
                os.path.join(resume_from_checkpoint, self.adapter.denoiser_name)
            )
            denoiser.load_state_dict(loaded.state_dict())
        self._load_ema_state(resume_from_checkpoint)
