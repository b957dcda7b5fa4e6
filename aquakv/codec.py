"""One layer's AQUA-KV encode/decode: predict from the previous layer, quantize only the residual.

Shared by calibration (the chain fit) and the runtime cache, so both reconstruct identically:

    K̂_l = P^K_l(K̂_{l-1})          + deq(R^K_l)
    V̂_l = P^V_l([K̂_l, V̂_{l-1}])   + deq(R^V_l)

Layer 0 (or a codec without predictors) quantizes keys and values directly. Keys are pre-RoPE; with a
:class:`~aquakv.rope.ResidualRotation` the key residual is quantized after RoPE at the tokens' positions and
un-rotated after dequantization (``KernelSettings.key_residual="post_rope"``): ``K̂`` stays pre-RoPE.

With ``stored=True`` (the cache's ``KernelSettings(prediction="stored")``) each token also keeps its low-rank
predictor inputs :class:`Projections` ``z = input @ down`` (float8, one scale per token and part), and the prediction
is ``z @ up + bias`` from them: reading a layer then needs no other layer's reconstruction. The residual is taken
against the prediction from the *rounded* ``z``, so the rounding costs no accuracy of its own (the residual absorbs
it) and encode and decode agree exactly. The key predictor's ``up`` factor is rounded the same way (float8, one scale:
:func:`round_factor`), so the decode kernel can multiply ``z^K`` by it on float8 tensor cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aquakv.config import QuantizerConfig
from aquakv.pickling import ArrayPickled
from aquakv.predictors import Predictor
from aquakv.quantize import Quantized, dequantize, quantize
from aquakv.rope import ResidualRotation


@dataclass
class Residual(ArrayPickled):
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
    _moved: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # memo of :meth:`to`
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # memo of :meth:`derived`

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
        """This codec on ``device``, made once per device and then shared: every cache built from one bundle reuses
        the same predictors, so their factorization (:meth:`Predictor.factors`) and the kernels' prepared operands
        are computed once per process, not at each cache's first step."""
        key = str(torch.device(device))
        if key not in self._moved:
            kp, vp = self.key_predictor, self.value_predictor
            self._moved[key] = LayerCodec(self.keys.to(device), self.values.to(device),
                                          None if kp is None else kp.to(device), None if vp is None else vp.to(device))
        return self._moved[key]

    def derived(self, name: str, make: Callable[[], object]) -> object:
        """``make()`` (operands a kernel prepares from this codec), computed once per ``name``: every cache built
        from the codec's device copy (:meth:`to`) shares them."""
        if name not in self._derived:
            self._derived[name] = make()
        return self._derived[name]

    def __getstate__(self) -> dict:
        """Pickled (Ray) without the device copies and derived operands: they may live on a device the receiver does
        not have."""
        return {**self.__dict__, "_moved": {}, "_derived": {}}

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


PROJECTION_DTYPE = torch.float8_e4m3fn
PROJECTION_MAX = float(torch.finfo(PROJECTION_DTYPE).max)


@dataclass
class Projections:
    """Stored predictor inputs of a run of tokens: ``latents [..., RK + RV]`` float8 e4m3, the key predictor's
    ``z^K = K̂_{l-1} @ down^K`` (``key_width = RK`` columns, 0 without a key predictor) then the value predictor's
    ``z^V = [K̂_l, V̂_{l-1}] @ down^V``; ``scales [..., 2]`` float32, each part's ``max |z| / 448`` per token. Widths
    are the factorizations' (:func:`aquakv.predictors.kernel_rank`)."""

    latents: torch.Tensor
    scales: torch.Tensor
    key_width: int

    @property
    def nbytes(self) -> int:
        return self.latents.numel() * self.latents.element_size() + self.scales.numel() * self.scales.element_size()

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z^K, z^V)`` float32, as the predictions use them."""
        z = self.latents.float()
        kw = self.key_width
        return z[..., :kw] * self.scales[..., :1], z[..., kw:] * self.scales[..., 1:]

    def tail(self, start: int, copy: bool = False) -> Projections:
        latents, scales = self.latents[:, start:], self.scales[:, start:]
        return Projections(latents.clone() if copy else latents, scales.clone() if copy else scales, self.key_width)


def round_projection(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z [..., R]`` -> ``(z8 float8, scale [..., 1] float32, z8 * scale float32)``: scaled so each row's largest
    magnitude is e4m3's largest finite value."""
    amax = z.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / PROJECTION_MAX, torch.ones_like(amax))
    z8 = (z / scale).clamp(-PROJECTION_MAX, PROJECTION_MAX).to(PROJECTION_DTYPE)
    return z8, scale, z8.float() * scale


def round_factor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [R, N]`` -> ``(w8 float8 e4m3, scale [] float32)``, one scale for the whole matrix so its largest magnitude
    is e4m3's largest finite value (e4m3's exponent keeps every entry to ~3 significant bits, 6% at worst):
    ``w8 * scale`` is the factor. The stored key predictor's ``up``: ``z^K`` is float8 already, so the decode kernel
    multiplies the two on float8 tensor cores (twice bf16's rate; rank D/4 of an 8B model, batch 8: 1.04 -> 0.80 ms
    per layer's kernel, docs/benchmarks/decode.md round 24)."""
    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / PROJECTION_MAX, torch.ones_like(amax)).float()
    return (w / scale).clamp(-PROJECTION_MAX, PROJECTION_MAX).to(PROJECTION_DTYPE), scale


def _projected(predictor: Predictor | None, inputs: torch.Tensor | None,
               like: torch.Tensor, keys: bool) -> tuple[torch.Tensor, tuple | None]:
    """Stored mode: ``(prediction, (z8, scale))`` from the rounded projection of ``inputs`` (zeros and None without a
    predictor); ``keys``: the key predictor (its ``up`` rounded, :func:`stored_factors`)."""
    if predictor is None:
        return torch.zeros_like(like, dtype=torch.float32), None
    down, up = stored_factors(predictor, keys)
    z8, scale, z = round_projection(inputs.float() @ down.to(inputs.device))
    return z @ up.to(z.device) + predictor.bias.to(z), (z8, scale)


def stored_factors(predictor: Predictor, keys: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` float32 of a predictor whose projections are stored; refuses a full-rank one. ``keys``: the key
    predictor's, with ``up`` rounded to float8 (:func:`key_factor`, returned as ``w8 * scale``): every user of a
    stored key prediction (encode, decode, the kernels) multiplies by this one."""
    factors = predictor.factors()
    if factors is None:
        raise ValueError("prediction='stored' needs low-rank predictors (rank <= D/4: calibrate with predictor_rank); "
                         f"this one is {tuple(predictor.weight.shape)} at full rank")
    if not keys:
        return factors
    return factors[0], _rounded_up(predictor)[2]


def key_factor(predictor: Predictor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up8, scale)``: the stored key predictor's ``up`` rounded by :func:`round_factor`, once per predictor
    (:meth:`~aquakv.predictors.Predictor.derived`), so encode, decode and the kernels share its bits on every
    device."""
    return _rounded_up(predictor)[:2]


def _rounded_up(predictor: Predictor) -> tuple[torch.Tensor, ...]:
    """``(up8, scale, up8 * scale float32)``, computed once per predictor: encode and every decode multiply by the
    third."""
    def make() -> tuple[torch.Tensor, ...]:
        up8, scale = round_factor(stored_factors(predictor)[1])
        return up8, scale, up8.float() * scale

    return predictor.derived("float8 up", make)


@dataclass
class EncodedBlock:
    """Quantized key and value residuals of a run of tokens, and their stored predictor inputs (or None)."""

    keys: Quantized
    values: Quantized
    projections: Projections | None = None

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + (self.projections.nbytes if self.projections else 0)

    def tail(self, start: int, copy: bool = False) -> EncodedBlock:
        """Tokens ``start:`` of a ``[B, T, ...]`` block (as the cache holds them): views, or with ``copy`` new
        tensors (so the dropped tokens' memory is freed)."""
        if start == 0 and not copy:
            return self

        def cut(q: Quantized) -> Quantized:
            codes, scales = q.codes[:, start:], q.scales[:, start:]
            return Quantized(codes.clone() if copy else codes, scales.clone() if copy else scales, q.channels)

        projections = self.projections.tail(start, copy) if self.projections is not None else None
        return EncodedBlock(cut(self.keys), cut(self.values), projections)


def encode(
    keys: torch.Tensor,
    values: torch.Tensor,
    prev: tuple[torch.Tensor, torch.Tensor] | None,
    codec: LayerCodec,
    stored: bool = False,
    rotation: ResidualRotation | None = None,
) -> tuple[EncodedBlock, tuple[torch.Tensor, torch.Tensor]]:
    """Encode ``keys, values [..., D]`` given the previous layer's reconstruction; return the block and ``(K̂, V̂)``.
    ``stored``: predict from rounded projections and keep them in the block; ``rotation``: quantize the key residual
    after RoPE (module docstring)."""
    zk = zv = None  # stored mode: (z8, scale) of each predictor's rounded projection
    if not stored:
        key_pred = codec.predict_keys(prev, keys)
    else:
        if prev is None and (codec.key_predictor is not None or codec.value_predictor is not None):
            raise ValueError("this layer's predictors need the previous layer's reconstruction")
        key_pred, zk = _projected(codec.key_predictor, None if prev is None else prev[0], keys, True)
    if rotation is None:
        qk = codec.keys.quantize(keys.float() - key_pred)
        keys_hat = key_pred + codec.keys.dequantize(qk)
    else:
        qk = codec.keys.quantize(rotation.forward(keys.float() - key_pred))
        keys_hat = key_pred + rotation.inverse(codec.keys.dequantize(qk))
    if not stored:
        value_pred = codec.predict_values(keys_hat, prev)
    else:
        inputs = None if prev is None else codec.value_inputs(keys_hat, prev[1].float())
        value_pred, zv = _projected(codec.value_predictor, inputs, keys_hat, False)
    qv = codec.values.quantize(values.float() - value_pred)
    values_hat = value_pred + codec.values.dequantize(qv)
    projections = None
    if zk is not None or zv is not None:
        one = torch.ones(*keys.shape[:-1], 1, device=keys.device)
        none = (one[..., :0].to(PROJECTION_DTYPE), one)
        (k8, ks), (v8, vs) = zk or none, zv or none
        projections = Projections(torch.cat([k8, v8], -1), torch.cat([ks, vs], -1), k8.shape[-1])
    return EncodedBlock(qk, qv, projections), (keys_hat, values_hat)


def decode(
    block: EncodedBlock, prev: tuple[torch.Tensor, torch.Tensor] | None, codec: LayerCodec,
    rotation: ResidualRotation | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct ``(K̂, V̂) [..., D]`` float32 of a block, exactly as :func:`encode` returned them (from its stored
    projections where it has them: ``prev`` is then not read); ``rotation``: the one the block was encoded with."""
    residual_keys = codec.keys.dequantize(block.keys)
    if rotation is not None:
        residual_keys = rotation.inverse(residual_keys)
    residual_values = codec.values.dequantize(block.values)
    if block.projections is None:
        keys_hat = codec.predict_keys(prev, residual_keys) + residual_keys
        return keys_hat, codec.predict_values(keys_hat, prev) + residual_values
    zk, zv = block.projections.parts()

    def predict(predictor: Predictor | None, z: torch.Tensor, like: torch.Tensor, keys: bool) -> torch.Tensor:
        if predictor is None:
            return torch.zeros_like(like)
        return z @ stored_factors(predictor, keys)[1].to(z.device) + predictor.bias.to(z)

    return (predict(codec.key_predictor, zk, residual_keys, True) + residual_keys,
            predict(codec.value_predictor, zv, residual_values, False) + residual_values)


def gaussian_residual(config: QuantizerConfig, seed: int = 0) -> Residual:
    """A residual quantizer with the project's Gaussian grid for ``config`` and signs drawn from ``seed``."""
    from aquakv.grids import gaussian_grid
    from aquakv.hadamard import random_signs

    return Residual(config, gaussian_grid(config.dim, config.size), random_signs(config.group_size, seed))
