"""One layer's AQUA-KV encode/decode: predict from the previous layer, quantize only the residual.

Shared by calibration (the chain fit) and the runtime cache, so both reconstruct identically:

    K̂_l = P^K_l(K̂_{l-1})          + deq(R^K_l)
    V̂_l = P^V_l([K̂_l, V̂_{l-1}])   + deq(R^V_l)

Layer 0 (or a codec without predictors) quantizes keys and values directly. Keys are pre-RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aquakv.config import QuantizerConfig
from aquakv.predictors import Predictor
from aquakv.quantize import Quantized, dequantize, quantize


@dataclass
class Residual:
    """A quantized residual with its config, grid ``[n, d]`` and Hadamard signs ``[g]``."""

    config: QuantizerConfig
    grid: torch.Tensor
    signs: torch.Tensor

    def quantize(self, x: torch.Tensor) -> Quantized:
        return quantize(x, self.grid, self.signs, self.config)

    def dequantize(self, q: Quantized) -> torch.Tensor:
        return dequantize(q, self.grid, self.signs, self.config)

    def to(self, device: torch.device | str) -> Residual:
        return Residual(self.config, self.grid.to(device), self.signs.to(device))


@dataclass
class LayerCodec:
    """How one layer's keys and values ``[..., D]`` are stored."""

    keys: Residual
    values: Residual
    key_predictor: Predictor | None = None
    value_predictor: Predictor | None = None

    @staticmethod
    def value_inputs(keys: torch.Tensor, prev_values: torch.Tensor) -> torch.Tensor:
        """The value predictor's input ``[..., 2D]``: this layer's keys, then the predecessor's values. The weight's
        rows follow this layout (``W[:D]`` keys, ``W[D:]`` values), which the Triton kernels split on; calibration
        builds its statistics (and its noise model) through this one function."""
        return torch.cat([keys, prev_values], dim=-1)

    def key_part(self) -> LayerCodec:
        """This codec without its value predictor: what encodes K̂_l while the value predictor is being fitted."""
        return LayerCodec(self.keys, self.values, self.key_predictor, None)

    def to(self, device: torch.device | str) -> LayerCodec:
        def move(p: Predictor | None) -> Predictor | None:
            return None if p is None else Predictor(p.weight.to(device), p.bias.to(device), p.rank)

        return LayerCodec(self.keys.to(device), self.values.to(device),
                          move(self.key_predictor), move(self.value_predictor))

    def predict_keys(self, prev: tuple[torch.Tensor, torch.Tensor] | None, like: torch.Tensor) -> torch.Tensor:
        if self.key_predictor is None:
            return torch.zeros_like(like, dtype=torch.float32)
        if prev is None:
            raise ValueError("this layer's key predictor needs the previous layer's reconstruction")
        return self.key_predictor(prev[0].float())

    def predict_values(self, keys_hat: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if self.value_predictor is None:
            return torch.zeros_like(keys_hat, dtype=torch.float32)
        if prev is None:
            raise ValueError("this layer's value predictor needs the previous layer's reconstruction")
        return self.value_predictor(self.value_inputs(keys_hat, prev[1].float()))


@dataclass
class EncodedBlock:
    """Quantized key and value residuals of a run of tokens."""

    keys: Quantized
    values: Quantized

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def tail(self, start: int, copy: bool = False) -> EncodedBlock:
        """Tokens ``start:`` of a ``[B, T, ...]`` block (as the cache holds them): views, or with ``copy`` new
        tensors (so the dropped tokens' memory is freed)."""
        if start == 0 and not copy:
            return self

        def cut(q: Quantized) -> Quantized:
            codes, scales = q.codes[:, start:], q.scales[:, start:]
            return Quantized(codes.clone() if copy else codes, scales.clone() if copy else scales, q.channels)

        return EncodedBlock(cut(self.keys), cut(self.values))


def encode(
    keys: torch.Tensor,
    values: torch.Tensor,
    prev: tuple[torch.Tensor, torch.Tensor] | None,
    codec: LayerCodec,
) -> tuple[EncodedBlock, tuple[torch.Tensor, torch.Tensor]]:
    """Encode ``keys, values [..., D]`` given the previous layer's reconstruction; return the block and ``(K̂, V̂)``."""
    key_pred = codec.predict_keys(prev, keys)
    qk = codec.keys.quantize(keys.float() - key_pred)
    keys_hat = key_pred + codec.keys.dequantize(qk)
    value_pred = codec.predict_values(keys_hat, prev)
    qv = codec.values.quantize(values.float() - value_pred)
    values_hat = value_pred + codec.values.dequantize(qv)
    return EncodedBlock(qk, qv), (keys_hat, values_hat)


def decode(
    block: EncodedBlock, prev: tuple[torch.Tensor, torch.Tensor] | None, codec: LayerCodec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct ``(K̂, V̂) [..., D]`` float32 of a block, exactly as :func:`encode` returned them."""
    residual_keys = codec.keys.dequantize(block.keys)
    keys_hat = codec.predict_keys(prev, residual_keys) + residual_keys
    residual_values = codec.values.dequantize(block.values)
    values_hat = codec.predict_values(keys_hat, prev) + residual_values
    return keys_hat, values_hat


def gaussian_residual(config: QuantizerConfig, seed: int = 0) -> Residual:
    """A residual quantizer with the project's Gaussian grid for ``config`` and signs drawn from ``seed``."""
    from aquakv.grids import gaussian_grid
    from aquakv.hadamard import random_signs

    return Residual(config, gaussian_grid(config.dim, config.size), random_signs(config.group_size, seed))
