"""Where a model runs and in which number format: the one device and dtype chooser.

Every stage takes ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``) and a precision
(``auto``, ``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``):

* ``auto`` device: the GPU of this process (``cuda:LOCAL_RANK`` under torchrun/srun) when one is
  visible, else the CPU;
* ``auto`` precision: bfloat16 on a GPU (float16 on GPUs without bfloat16), float32 on a CPU.

A float32 result means "no autocast": `autocast` then returns a no-op context.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


def pick_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for `spec` (module docstring). ``cuda`` without an index means this process's
    GPU: ``cuda:<local_rank mod visible GPUs>``."""
    if spec is None or str(spec) == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return dev


def pick_dtype(spec: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The number format for `spec` on `device` (module docstring)."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec is None or spec == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec not in DTYPES:
        raise ValueError(f"unknown precision {spec!r}; expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the short names of the command lines)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: str | torch.device, dtype: torch.dtype):
    """A mixed-precision context for `dtype` on `device`; a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
