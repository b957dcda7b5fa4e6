"""Pickling small math objects with their CPU tensors as NumPy arrays.

Ray's object store passes NumPy buffers out of band (pickle protocol 5: no copy into the pickled bytes), torch tensors
in band. The chain fit sends every worker's float64 ridge statistics to the driver each layer (48 MB per worker for a
70B value predictor) and codecs back to the workers: 50 MB of statistics took 155 ms through a local Ray actor as
tensors and 47 ms as arrays on a 2-core CPU (medians, ``benchmarks/ray_transfer.py``, 2026-11-27). Tensors on other
devices and dtypes NumPy lacks (bfloat16) stay tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_array(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype != torch.bfloat16 \
            and not value.requires_grad:
        return value.numpy()
    return value


def _as_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # read-only when it is a view of Ray's object store: copied then
        return torch.from_numpy(value if value.flags.writeable else value.copy())
    return value


class ArrayPickled:
    """Mixin for dataclasses: the instance's tensor attributes are pickled as NumPy arrays and restored as tensors."""

    def __getstate__(self) -> dict:
        return {k: _as_array(v) for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: _as_tensor(v) for k, v in state.items()})
