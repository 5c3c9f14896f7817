"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (at the end of ddp_accumulation.py, to
start the processes once, or alone): the tiny SD3 transformer with a LoRA is
sharded with torch's FSDP2 (`fully_shard` per transformer block and on the root, as accelerate's
TRANSFORMER_BASED_WRAP does), over gloo on the CPU.

Rank 0 writes the LoRA three ways: `reference/` from the model before sharding; `gathered/` with `save_lora` from
the full state dict gathered as accelerate's `get_state_dict` gathers it under FSDP2 (what `Trainer.save_model`
hands `_save`); and it records the shapes of the LoRA parameters of the sharded model itself (shards).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from diffusers.models.transformers.transformer_sd3 import JointTransformerBlock
from peft import LoraConfig
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from trl_visual.lora_io import save_lora
from trl_visual.testing import tiny_sd3_pipeline


def write_sharded_lora(out: str) -> None:
    """Shard the LoRA'd tiny transformer over the current process group and write the LoRAs (see above)."""
    rank = dist.get_rank()
    pipeline = tiny_sd3_pipeline()
    transformer = pipeline.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_out"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking LoRA: lora_B is zero at initialization
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    if rank == 0:
        save_lora(type(pipeline), os.path.join(out, "reference"), transformer, "transformer")
    full_shapes = lora_shapes(transformer)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in transformer.modules():
        if isinstance(module, JointTransformerBlock):
            fully_shard(module, mesh=mesh)
    fully_shard(transformer, mesh=mesh)

    local_shapes = lora_shapes(transformer, local=True)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    gathered = get_model_state_dict(transformer, options=options)  # a collective: every rank takes part
    if rank == 0:
        save_lora(
            type(pipeline), os.path.join(out, "gathered"), transformer, "transformer", state_dict=gathered
        )
        sharded = sorted(key for key in full_shapes if local_shapes[key] != full_shapes[key])
        with open(os.path.join(out, "shards.json"), "w") as handle:
            json.dump({"sharded_keys": sharded, "num_keys": len(full_shapes)}, handle)
    dist.barrier()


def lora_shapes(model: torch.nn.Module, local: bool = False) -> dict[str, tuple[int, ...]]:
    """The shape of each LoRA parameter, read from the model itself; ``local``: of this rank's shard (FSDP2's
    parameters are DTensors; peft 0.22's ``get_peft_model_state_dict`` returns plain tensors for them)."""
    return {
        name: tuple((parameter.to_local() if local else parameter).shape)
        for name, parameter in model.named_parameters()
        if "lora_" in name
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    write_sharded_lora(sys.argv[1])
    dist.destroy_process_group()
