"""Saving and loading what a run trained: the LoRA in diffusers' format, atomic checkpoints, resuming.

:class:`CheckpointIO` is the trainer's collaborator for every file a run writes or reads back;
:class:`~trl_visual.trainer.DiffusionGRPOTrainer`'s ``Trainer`` overrides are a few lines that call it:

* ``_save`` → :meth:`CheckpointIO.write_weights`: the LoRA with ``save_lora_weights`` (what
  ``pipe.load_lora_weights`` reads), not a peft file, taken from the state dict ``Trainer.save_model`` gathered
  (FSDP's full state dict, ZeRO-3's 16-bit one); without LoRA the whole denoiser (and, outside a checkpoint, the
  pipeline around it);
* ``_save_checkpoint`` → :meth:`CheckpointIO.save_atomically`: the checkpoint is staged, its bytes made durable
  (``fsync``) and renamed into place, so a crash (or a power cut) never leaves half of one; the method's state,
  the EMA's and the iteration's rollouts are written into the staged folder;
* ``_get_output_dir`` → :attr:`CheckpointIO.staging_dir` while a checkpoint is written;
* ``_push_from_checkpoint`` → :meth:`CheckpointIO.copy_lora_for_push`;
* ``_load_from_checkpoint`` and ``_prepare_for_training`` → :meth:`CheckpointIO.load_weights` (under FSDP before
  the model is sharded, so that each rank reads the whole file) and :meth:`CheckpointIO.load_method_state`;
* ``train`` → :meth:`CheckpointIO.checked` before anything is loaded.

A new checkpoint field is one ``save``/``load`` pair here (and its name in :mod:`trl_visual.checkpointing`, whose
checks run before resuming).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import load_torch_model
from peft import get_peft_model_state_dict
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from ..checkpointing import LORA_WEIGHTS_NAME, METHOD_STATE_NAME, check_checkpoint
from ..lora_io import (
    DENOISER_FILES,
    load_lora_checkpoint,
    save_full_denoiser,
    save_lora,
    save_pipeline_around,
)
from ..state_files import load_state_file, save_state_file
from .diffusion_grpo_config import DiffusionGRPOConfig
from .ema import EMA
from .output_dir import STAGING_DIR, naming_a_full_disk


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


class CheckpointIO:
    """The files of a run: the trained weights of ``pipeline``'s ``denoiser_name`` (its LoRA when ``is_peft``,
    exported in ``weight_dtype``), checkpoints with the method's state and ``ema``'s, and reading them back."""

    def __init__(
        self,
        args: DiffusionGRPOConfig,
        pipeline: DiffusionPipeline,
        denoiser_name: str,
        is_peft: bool,
        weight_dtype: torch.dtype,
        ema: EMA | None,
    ):
        self.args = args
        self.pipeline = pipeline
        self.denoiser_name = denoiser_name
        self.is_peft = is_peft
        self.weight_dtype = weight_dtype
        self.ema = ema
        #: ``output_dir/.staging`` while a checkpoint is being written, else ``None``
        self.staging_dir: str | None = None
        #: the folder name of the checkpoint being written when it is not ``checkpoint-N``: a stop checkpoint
        #: (``stopped-at-step-N``, see :meth:`save_stop_checkpoint`), neither rotated nor pushed
        self.stop_name: str | None = None
        #: where :meth:`save_stop_checkpoint` saved this run's stop checkpoint
        self.stopped_checkpoint: str | None = None

    # -- resuming -------------------------------------------------------------------------------------------
    def checked(
        self, resume_from_checkpoint: str | bool | None, denoiser: torch.nn.Module, expects_method_state: bool
    ) -> str | None:
        """The checkpoint folder to resume (``True``: the last one in ``output_dir``), checked
        (:func:`~trl_visual.checkpointing.check_checkpoint`, and the EMA's state with ``use_ema``); ``None`` for a
        new run."""
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
        lora = get_peft_model_state_dict(denoiser) if self.is_peft else None
        folder = str(resume_from_checkpoint)
        check_checkpoint(
            folder,
            lora_shapes={key: tuple(value.shape) for key, value in lora.items()}
            if lora is not None
            else None,
            denoiser_name=self.denoiser_name,
            expects_method_state=expects_method_state,
            weights_only=self.args.resume_weights_only,
            process_index=self.args.process_index,
            world_size=self.args.world_size,
        )
        if self.ema is not None:
            self.ema.check_checkpoint(folder, self.args.resume_weights_only)
        return folder

    def load_weights(self, folder: str, denoiser: torch.nn.Module) -> None:
        """The trained weights (the LoRA, in place, or the whole denoiser) and the EMA's state from ``folder``."""
        if self.is_peft:
            load_lora_checkpoint(type(self.pipeline), folder, denoiser, self.denoiser_name)
        else:
            # shard by shard into the model (huggingface_hub), never a second whole copy of the denoiser
            load_torch_model(
                denoiser,
                os.path.join(folder, self.denoiser_name),
                strict=True,
                filename_pattern=DENOISER_FILES,
            )
        if self.ema is not None:
            self.ema.load(folder)

    @staticmethod
    def load_method_state(folder: str, load: Callable[[dict[str, Any]], None]) -> None:
        """Hand the method's state saved in ``folder`` (if any) to ``load`` (the ``load_method_state`` hook)."""
        state_file = os.path.join(folder, METHOD_STATE_NAME)
        if os.path.exists(state_file):
            load(load_state_file(state_file))

    def load_beside_deepspeed(self, folder: str, load: Callable[[dict[str, Any]], None]) -> None:
        """What DeepSpeed's own resume (which loads the weights and skips ``Trainer._load_from_checkpoint``) does
        not restore: the method's state (:meth:`load_method_state`) and the EMA's."""
        self.load_method_state(folder, load)
        if self.ema is not None:
            self.ema.load(folder)

    # -- writing --------------------------------------------------------------------------------------------
    def write_weights(self, output_dir: str, denoiser: torch.nn.Module, state_dict: dict | None) -> None:
        """Save the LoRA in diffusers' format with its adapter config in the file's metadata
        (``pipe.load_lora_weights(output_dir)`` loads it at the trained ``lora_alpha / r``), or, training without
        LoRA, the full denoiser and (outside checkpoints) the rest of the pipeline. Rank 0 writes.

        ``state_dict`` is what ``Trainer.save_model`` gathered on every rank when the engine shards the weights
        (FSDP's full state dict, ZeRO-3's 16-bit one): the weights are taken from it, since the live model then
        holds only this rank's shards. Without it (one process, DDP, ZeRO-2) they are the live model's."""
        if not self.args.should_save:
            return
        with naming_a_full_disk(output_dir, f"the weights for {output_dir}"):
            os.makedirs(output_dir, exist_ok=True)
            if self.is_peft:
                save_lora(
                    type(self.pipeline),
                    output_dir,
                    denoiser,
                    self.denoiser_name,
                    dtype=self.lora_save_dtype(),
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
        folder = os.path.join(output_dir, self.denoiser_name)
        if state_dict is not None:
            save_full_denoiser(denoiser, state_dict, folder)
        else:
            denoiser.save_pretrained(folder)
        if self.staging_dir is None:
            save_pipeline_around(self.pipeline, output_dir, self.denoiser_name)

    def lora_save_dtype(self) -> torch.dtype | None:
        """The dtype of the LoRA weights being written: as trained (float32) while a checkpoint is written, so
        that resuming is exact, and the dtype the pipeline was loaded in everywhere else (``save_model``,
        ``push_to_hub``), as diffusers' training scripts export a LoRA by default (without
        ``--upcast_before_saving``)."""
        return None if self.staging_dir is not None else self.weight_dtype

    def save_atomically(
        self,
        run_dir: str,
        state: TrainerState,
        write: Callable[[], None],
        write_extra: Callable[[str], None],
        method_state: dict[str, Any],
        wait_for_everyone: Callable[[], None],
    ) -> str:
        """Write the checkpoint aside (``run_dir/.staging/checkpoint-N``: ``write()`` is ``Trainer``'s own
        ``_save_checkpoint``, pointed there by :attr:`staging_dir`; then ``method_state``, the EMA's state and
        ``write_extra(folder)``, each process's rollouts), ``fsync`` its files and folders, then rename it into
        place (and ``fsync`` ``run_dir``), so a crash or power cut in the middle of a save never leaves a partial
        ``checkpoint-N`` for ``resume_from_checkpoint=True`` to pick up; older checkpoints are rotated only
        afterwards, keeping the best checkpoint (:func:`best_checkpoint`: ``state.best_model_checkpoint`` names
        the folder after the rename, in ``state`` and in the checkpoint's ``trainer_state.json``). The rename waits
        for every process to have written its files into the staging folder. Returns the final folder."""
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        final = os.path.join(run_dir, self.stop_name or name)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        staged = os.path.join(staging_root, name)
        self.staging_dir = staging_root
        try:
            with naming_a_full_disk(staging_root, f"the checkpoint {name}"):
                write()
                if method_state and self.args.should_save:
                    save_state_file(method_state, os.path.join(staged, METHOD_STATE_NAME))
                if self.ema is not None and self.args.should_save:
                    self.ema.save(staged)
                write_extra(staged)
                best = best_checkpoint(run_dir, state, final)
                if best is not None and best != state.best_model_checkpoint:
                    state.best_model_checkpoint = best  # Trainer named it inside the staging folder
                    if self.args.should_save:
                        state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        except BaseException:  # a full disk, an error, Ctrl-C or SIGTERM: no half-written file stays behind
            shutil.rmtree(staging_root, ignore_errors=True)
            raise
        finally:
            self.staging_dir = None
        # every rank writes its own files (rng_state_<rank>.pth) into the staging folder: rename it only after all
        # have, or a slower rank's file lands in a folder that is then deleted
        wait_for_everyone()
        if self.args.should_save:
            fsync_tree(staged)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            fsync_dir(run_dir)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=state.best_model_checkpoint,
                use_mtime=True,
            )
        wait_for_everyone()
        return final

    def copy_lora_for_push(self, checkpoint_folder: str, is_main_process: bool) -> None:
        """``Trainer`` uploads ``output_dir`` with copies of the checkpoint's transformers/peft weight files; the LoRA
        file (diffusers' name) is copied there too, so every checkpoint push carries it."""
        lora = os.path.join(checkpoint_folder, LORA_WEIGHTS_NAME)
        if is_main_process and os.path.isfile(lora):
            shutil.copy(lora, os.path.join(self.args.output_dir, LORA_WEIGHTS_NAME))

    def save_stop_checkpoint(self, save_checkpoint: Callable[[], None], global_step: int) -> str | None:
        """Save what the run trained as a checkpoint ``output_dir/stopped-at-step-N`` (``save_checkpoint()`` writes
        it like ``checkpoint-N``: staged, then renamed into place; not rotated, not pushed). Once per run: a second
        call returns the same folder. ``None`` when saving failed (the caller says so)."""
        if self.stopped_checkpoint is None:
            name = f"stopped-at-step-{global_step}"
            self.stop_name = name
            try:
                save_checkpoint()
            finally:
                self.stop_name = None
            self.stopped_checkpoint = os.path.join(self.args.output_dir, name)
        return self.stopped_checkpoint


def best_checkpoint(run_dir: str, state: TrainerState, final: str) -> str | None:
    """Where the best checkpoint (``state.best_global_step``, with ``metric_for_best_model``) is once every folder
    is in place: ``final`` when it is the one being saved, ``run_dir/checkpoint-B`` when that folder exists, else
    ``None``. ``Trainer`` looks it up under the folder it writes to, here the staging one, where only the checkpoint
    being written is, and names that temporary folder."""
    step = getattr(state, "best_global_step", None)  # transformers ≥ 4.52
    if not step:
        return None
    if step == state.global_step:
        return final
    folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
    return folder if os.path.isdir(folder) else None
