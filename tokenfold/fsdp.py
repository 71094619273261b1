"""Sharded data parallelism for big models (stage 05 ``--fsdp``): PyTorch FSDP2.

`shard` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer, then to the whole
`tokenfold.loss.LossModel` (the root unit: embeddings, final norm, LM head and the chunked loss).
Parameters, gradients and AdamW state are split over the ranks, each holding 1/world of them; a
layer's full weights exist only while it computes (the root's during the whole step). bf16 runs
use ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: bf16 all-gathers and compute,
fp32 gradient reduction, and fp32 master weights and optimizer state (LoRA: the frozen weights are
bf16 already). Add ``--grad-checkpointing`` for big models; the memory plan says when it is needed.

Checkpoints are sharded with ``torch.distributed.checkpoint`` (DCP): every rank writes its shards of
the model and the optimizer state into ``<checkpoint>/sharded/`` through the ``get_state_dict`` /
``set_state_dict`` helpers (with LoRA: the trainable tensors only). Resuming loads them back into
the same sharding (tests: exact resume on 2 gloo processes). `load_model_state` reads one into an
unsharded model in a single process (no process group): what ``python -m tokenfold.export`` and
the run's final/ use to write a plain transformers checkpoint.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("tokenfold.fsdp")

SHARDED = "sharded"   # the DCP directory inside a checkpoint


def decoder_layers(loss_model) -> list[torch.nn.Module]:
    return list(loss_model.causal_lm.get_decoder().layers)


def shard(loss_model, device: torch.device, world_size: int, dtype: torch.dtype):
    """FSDP2 over all ranks of the (initialised) default process group; returns `loss_model`, sharded
    in place and moved to `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else \
        MixedPrecisionPolicy()
    layers = decoder_layers(loss_model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(loss_model, mesh=mesh, mp_policy=mp)
    log.info("FSDP2: %d decoder layers + root sharded over %d ranks (%s compute)", len(layers), world_size,
             str(dtype).replace("torch.", ""))
    return loss_model


def set_gradient_sync(loss_model, on: bool) -> None:
    """Reduce-scatter gradients on this backward (the last micro-batch of a step) or keep accumulating."""
    loss_model.set_requires_gradient_sync(on)


def full_norm(norm) -> float:
    """A gradient norm from clip_grad_norm_ (a DTensor under FSDP) as a float."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _options(trainable_only: bool):
    """LoRA: the trainable tensors only. Loading is then not strict about the frozen ones, which the
    checkpoint does not hold; DCP itself still fails on any requested tensor the checkpoint lacks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def save(path: str | os.PathLike, loss_model, optimizer, trainable_only: bool) -> None:
    """Every rank writes its shards of model + optimizer state into `path` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(loss_model, optimizer, options=_options(trainable_only))
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(path))


def load(path: str | os.PathLike, loss_model, optimizer, trainable_only: bool) -> None:
    """Read `save`'s shards back into the sharded model and optimizer (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    opts = _options(trainable_only)
    msd, osd = get_state_dict(loss_model, optimizer, options=opts)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(loss_model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=opts)


def load_model_state(path: str | os.PathLike, loss_model, trainable_only: bool) -> None:
    """Read the model part of a sharded checkpoint into an unsharded `LossModel` of the same build, in
    this process alone (no process group needed, none used)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    opts = _options(trainable_only)
    state = {"model": get_model_state_dict(loss_model, options=opts)}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    set_model_state_dict(loss_model, state["model"], options=opts)
