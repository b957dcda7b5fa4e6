"""Resident chain shards: collect and chain-fit in one pass, every worker's samples kept on its device.

The staged pipeline writes each layer's K/V to ``activations.zarr`` (:mod:`pipeline.collect`), then the fit reads
them back three times per layer and writes/reads ``recon.zarr`` (:class:`pipeline.staged.ZarrShard`): at 70B scale the
Zarr I/O dominates. A :class:`ResidentShard` (one per worker, a plain object or a Ray actor) is a
:class:`pipeline.chain.ChainShard` that holds its samples' hidden states, the current layer's ``K_l, V_l`` and its
predecessors' reconstructions ``K̂_p, V̂_p`` (one per attention type, :func:`aquakv.family.predecessors`) on its
device; :func:`pipeline.chain.fit_chain` drives the layers. Its math is the staged shard's step by step (same row
batches, same order of the sums), so with the same shards the bundle is the same as the staged one.

Resume: the reconstructions an interrupted run needs live on the workers, so every ``resident_checkpoint_every``
layers each worker saves its hidden states and chain reconstructions (:meth:`ResidentShard.save_state`, the latest
only): a rerun with the same shards goes on after the saved layer; without one it restarts at layer 0. With
``activations_path`` the workers also write K/V to the activations store in the background (and mark the layers
done), so a later re-fit with other quantizer settings can use the staged fit without collecting again.

Validation rides along (:meth:`ResidentShard.validate_along`): each layer, while loaded for the chain, also takes the
worker's held-out rows through the exact pass after :meth:`~ResidentShard.forward` and through the AQUA-KV pass with
the layer's codec in :meth:`~ResidentShard.reconstruct` (:class:`pipeline.validate.HeldoutValidation`), so the
held-out passes load no layer again. A resumed chain has no such passes for its first layers; its validation streams
the checkpoint after the chain instead.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
import zarr
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from aquakv.bundle import encode_layer
from aquakv.codec import LayerCodec
from aquakv.config import CacheConfig
from aquakv.errors import CalibrationError
from aquakv.family import predecessors
from aquakv.predictors import RidgeStats
from pipeline import stats
from pipeline.chain import ShardShape
from pipeline.checkpoint import Checkpoint
from pipeline.collect import DTYPES, KINDS, _check_finite, _dtype_name, _encode, shard_name
from pipeline.validate import HeldoutValidation, heldout_rows, heldout_sums


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class WarmStart(NamedTuple):
    """A checkpoint opened before its shard exists (:func:`warm_start`)."""

    checkpoint: Checkpoint
    device: torch.device
    dtype: str
    base: Future  # the base model's own tensors (embedding...) placed on the device
    layer0: Future  # layer 0 loaded on the device


def warm_start(model_dir: str | Path, device: str = "auto", dtype: str = "float32") -> WarmStart:
    """Open ``model_dir`` (its meta skeleton) and, in the background, place the base model's tensors on the device and
    load layer 0: a worker starts this while the flow tokenizes, so its shard's first layer waits for neither (at 70B
    the embedding alone is 2.1 GB of bf16)."""
    ckpt, dev, name = Checkpoint(model_dir), _device(device), _dtype_name(dtype)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-start")  # one after the other, in order
    base = pool.submit(ckpt.base, dev, DTYPES[name])
    layer0 = pool.submit(ckpt.load_layer, 0, dev, DTYPES[name])
    pool.shutdown(wait=False)
    return WarmStart(ckpt, dev, name, base, layer0)


def _same_codec(a: LayerCodec, b: LayerCodec) -> bool:
    """Whether two codecs store alike: the same bundle entry and tensors (:func:`aquakv.bundle.encode_layer`)."""
    encoded = []
    for codec in (a, b):
        tensors: dict[str, torch.Tensor] = {}
        encoded.append((encode_layer(0, codec, tensors, tensors), tensors))
    (entry_a, tensors_a), (entry_b, tensors_b) = encoded
    return entry_a == entry_b and tensors_a.keys() == tensors_b.keys() and all(
        torch.equal(t, tensors_b[k]) for k, t in tensors_a.items())


class ResidentShard:
    """One worker's samples ``[start, stop)`` of ``tokens_path``'s ``calib`` array, resident on ``device``.

    Holds the hidden states ``[n, T, hidden]`` (``dtype``), the current layer's ``K_l, V_l`` ``[n*T, D]``
    (``dtype``, as the activations store would hold them) and the previous layer's reconstruction
    ``K̂_{l-1}, V̂_{l-1}`` ``[n*T, D]`` float32. Methods must be called in chain order per layer:
    :meth:`forward`, :meth:`key_stats` (l > 0), :meth:`value_stats` (l > 0), :meth:`reconstruct`.
    """

    def __init__(self, model_dir: str | Path, tokens_path: str | Path, start: int, stop: int, device: str = "auto",
                 dtype: str = "float32", activations_path: str | Path | None = None, micro_batch: int = 1,
                 warm: WarmStart | None = None) -> None:
        self.device = _device(device)
        if warm is not None and (warm.checkpoint.path.resolve() != Path(model_dir).resolve()
                                 or (warm.device, warm.dtype) != (self.device, _dtype_name(dtype))):
            warm = None  # opened for another model or placement: not used
        self.checkpoint = warm.checkpoint if warm is not None else Checkpoint(model_dir)
        self.start, self.stop = start, stop
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)  # the CUDA context starts here, not inside the first layer
        self.dtype = _dtype_name(dtype)
        self.micro_batch = micro_batch
        self.tokens_path = Path(tokens_path)
        tokens = zarr.open_group(str(tokens_path), mode="r")["calib"]
        if not 0 <= start < stop <= tokens.shape[0]:
            raise CalibrationError(f"shard [{start}, {stop}) out of range of {tokens_path} ({tokens.shape[0]} samples)")
        self.tokens = torch.from_numpy(tokens[start:stop]).long()
        self.seq_len = int(self.tokens.shape[1])
        self.kv_dim = self.checkpoint.kv_dim
        self.hidden: torch.Tensor | None = None
        self.hidden_layer = -1  # the hidden states are the input of layer hidden_layer + 1
        self.kv: dict[str, torch.Tensor] = {}  # K_l, V_l of layer kv_layer
        self.kv_layer = -1
        self.preds = predecessors(self.checkpoint.windows)
        self.recon: dict[int, dict[str, torch.Tensor]] = {}  # layer -> its K̂, V̂ (the latest of each chain)
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-prefetch")
        self._pending: dict[int, Future] = {}
        if warm is not None:
            warm.base.result()  # placed before this shard's embed places it (both would write the skeleton)
            self._pending[0] = warm.layer0
        self.group = None
        if activations_path is not None:
            self.group = zarr.open_group(str(activations_path), mode="r+")
            attrs = self.group.attrs
            if attrs["seq_len"] != self.seq_len or stop > attrs["num_samples"] or attrs["dtype"] != self.dtype:
                raise CalibrationError(f"{activations_path} ({attrs['num_samples']} x {attrs['seq_len']}, "
                                       f"{attrs['dtype']}) does not fit shard [{start}, {stop}) x {self.seq_len} "
                                       f"{self.dtype}")
            self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-write")
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-commit")
        self._commit: Future | None = None
        self.seconds: dict[str, float] = {}  # wall time per method, for benchmarks
        self.heldout_plan: tuple[int, int, CacheConfig] | None = None  # validate_along's rows and layout
        self.heldout: HeldoutValidation | None = None  # its passes, from layer 0 of this chain
        self._layer: nn.Module | None = None  # the current layer, kept for the AQUA-KV pass until reconstruct

    def _timed(self, method: str, t0: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[method] = self.seconds.get(method, 0.0) + time.perf_counter() - t0

    def timings(self) -> dict[str, float]:
        """Seconds spent in each method so far (device work included)."""
        return dict(self.seconds)

    # -- small queries ------------------------------------------------------------------------------------------

    def shape(self) -> ShardShape:
        """``samples``, ``tokens``, ``seq_len``, ``kv_dim`` and ``num_layers`` of this shard."""
        n = self.stop - self.start
        return {"samples": n, "tokens": n * self.seq_len, "seq_len": self.seq_len, "kv_dim": self.kv_dim,
                "num_layers": self.checkpoint.num_layers, "windows": self.checkpoint.windows, "start": self.start,
                "stop": self.stop}

    def _rows(self, a: int, b: int) -> slice:
        """Rows of the flattened ``[n*T, D]`` buffers holding absolute samples ``[a, b)``."""
        return slice((a - self.start) * self.seq_len, (b - self.start) * self.seq_len)

    def _batches(self) -> list[tuple[int, int]]:
        return list(stats.row_batches(self.start, self.stop, self.seq_len))  # the staged fit's row batches

    def _expect(self, what: str, layer: int, have: int, need: int) -> None:
        if have != need:
            raise CalibrationError(f"{what}({layer}) out of chain order: the shard holds layer {have}, needs {need}")

    def _expect_prev(self, what: str, layer: int) -> None:
        prev = self.preds[layer]
        if prev is not None and prev not in self.recon:
            raise CalibrationError(f"{what}({layer}) out of chain order: the shard holds no reconstruction of layer "
                                   f"{prev}")

    # -- forward ------------------------------------------------------------------------------------------------

    def _load(self, layer: int) -> Future:
        if layer not in self._pending:
            self._pending[layer] = self._prefetch.submit(self.checkpoint.load_layer, layer, self.device,
                                                         DTYPES[self.dtype])
        return self._pending[layer]

    def _write(self, layer: int, a: int, b: int, kind: str, t: torch.Tensor) -> None:
        self.group[f"{kind}/{layer}"][a:b] = _encode(t.view(b - a, self.seq_len, -1), self.dtype)

    def _commit_layer(self, layer: int, writes: list[Future]) -> None:
        for f in writes:
            f.result()
        self.group.require_group(f"done/{layer}/{shard_name(self.start, self.stop - self.start)}")

    def finish(self) -> None:
        """Wait for the background K/V writes (re-raising their errors); the layer is marked done once written."""
        commit, self._commit = self._commit, None
        if commit is not None:
            commit.result()

    @torch.inference_mode()
    def forward(self, layer: int) -> None:
        """Run ``layer`` over the shard (micro-batches), keeping its pre-RoPE ``K_l, V_l`` and output hidden states.

        Layer 0 starts from the token embeddings. The next layer's weights are loaded in the background meanwhile.
        :class:`NonFiniteError` names the layer and the samples when the outputs are not finite.
        """
        t0 = time.perf_counter()
        if layer == 0:  # (re)start the chain
            self.hidden = self.checkpoint.embed(self.tokens, self.device, DTYPES[self.dtype])
            self.hidden_layer, self.recon = -1, {}
            self.heldout = self._heldout_passes()
        self._expect("forward", layer, self.hidden_layer + 1, layer)
        module = self._load(layer).result()
        self._pending = {k: v for k, v in self._pending.items() if k > layer}
        if layer + 1 < self.checkpoint.num_layers:
            self._load(layer + 1)
        self.finish()  # back-pressure: the previous layer's K/V are on disk before this layer's are produced
        n = self.stop - self.start
        dtype = DTYPES[self.dtype]
        self.kv = {}  # the previous layer's K/V are freed before this layer's are allocated
        self.kv = {kind: torch.empty(n * self.seq_len, self.kv_dim, device=self.device, dtype=dtype) for kind in KINDS}
        self.kv_layer = -1
        writes: list[Future] = []
        try:
            for b0 in range(0, n, self.micro_batch):
                b1 = min(b0 + self.micro_batch, n)
                a, b = self.start + b0, self.start + b1
                out, *kv = self.checkpoint.forward_layer(layer, module, self.hidden[b0:b1])
                _check_finite(out, layer, "hidden states", (a, b))
                for kind, x in zip(KINDS, kv, strict=True):
                    _check_finite(x, layer, kind, (a, b))
                    rows = self.kv[kind][self._rows(a, b)]
                    rows.copy_(x.reshape(rows.shape))
                    if self.group is not None:
                        writes.append(self._writer.submit(self._write, layer, a, b, kind, rows))
                self.hidden[b0:b1] = out
            if self.heldout is not None:  # for the held-out passes (released in reconstruct)
                self._layer = module
        except BaseException:
            for f in writes:
                f.cancel()
            raise
        finally:
            del module
        if self.group is not None:
            self._commit = self._committer.submit(self._commit_layer, layer, writes)
        self.hidden_layer = self.kv_layer = layer
        self._timed("forward", t0)
        if self.heldout is not None:
            t0 = time.perf_counter()
            self.heldout.exact_layer(layer, self._layer)
            self._timed("heldout", t0)

    # -- chain fit ----------------------------------------------------------------------------------------------

    def _kv(self, kind: str, a: int, b: int) -> torch.Tensor:
        return self.kv[kind][self._rows(a, b)].float()

    def _prev(self, layer: int, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, prev = self._rows(a, b), self.recon[self.preds[layer]]
        return prev["keys"][rows], prev["values"][rows]

    def _mask(self, a: int, b: int, skip: int) -> torch.Tensor | None:
        return stats.kept_rows(b - a, self.seq_len, skip, self.device)

    @torch.no_grad()
    def key_stats(self, layer: int, skip: int = 0) -> RidgeStats:
        """Key predictor statistics (CPU): X = K̂_p, Y = K_l (as :func:`pipeline.staged.layer_stats_keys`)."""
        t0 = time.perf_counter()
        self._expect("key_stats", layer, self.kv_layer, layer)
        self._expect_prev("key_stats", layer)
        total = stats.PairwiseSum()
        for a, b in self._batches():
            x, y = stats.keep_rows(self._mask(a, b, skip), self._prev(layer, a, b)[0], self._kv("keys", a, b))
            stats.add_samples(total, x, y, b - a, layer, "keys", a)
        total = stats.to_cpu(total.total())
        self._timed("key_stats", t0)
        return total

    @torch.no_grad()
    def value_stats(self, layer: int, codec: LayerCodec, skip: int = 0) -> RidgeStats:
        """Value predictor statistics (CPU): X = [K̂_l, V̂_p], Y = V_l, K̂_l encoded with ``codec``'s key part
        (as :func:`pipeline.staged.layer_stats_values`)."""
        t0 = time.perf_counter()
        self._expect("value_stats", layer, self.kv_layer, layer)
        self._expect_prev("value_stats", layer)
        key_only = codec.key_part().to(self.device)
        total = stats.PairwiseSum()
        for a, b in self._batches():
            keys, values, *prev = stats.keep_rows(self._mask(a, b, skip), self._kv("keys", a, b),
                                                  self._kv("values", a, b), *self._prev(layer, a, b))
            stats.add_value_samples(total, keys, values, prev, key_only, b - a, layer, a)
        total = stats.to_cpu(total.total())
        self._timed("value_stats", t0)
        return total

    @torch.no_grad()
    def grid_samples(self, layer: int, codec: LayerCodec, kind: str, skip: int, vectors: int) -> torch.Tensor:
        """About ``vectors`` of the vectors layer ``layer``'s ``kind`` grid will quantize (CPU ``[m, d]``; as
        :func:`pipeline.staged.grid_samples`)."""
        t0 = time.perf_counter()
        self._expect("grid_samples", layer, self.kv_layer, layer)
        self._expect_prev("grid_samples", layer)
        config = (codec.keys if kind == "keys" else codec.values).config
        stride = stats.grid_stride((self.stop - self.start) * (self.seq_len - skip), self.kv_dim, config, vectors)
        codec, parts = codec.to(self.device), []
        for a, b in self._batches():
            prev = self._prev(layer, a, b) if self.preds[layer] is not None else ()
            keys, values, *prev = stats.keep_rows(self._mask(a, b, skip), self._kv("keys", a, b),
                                                  self._kv("values", a, b), *prev)
            parts.append(stats.residual_units(keys, values, tuple(prev) or None, codec, kind, stride, seed=a))
        self._timed("grid_samples", t0)
        return torch.cat(parts)

    @torch.no_grad()
    def reconstruct(self, layer: int, codec: LayerCodec) -> dict[str, float]:
        """Encode the shard's ``K_l, V_l`` with ``codec``; K̂_l, V̂_l replace the predecessor's K̂_p, V̂_p on the device.

        Returns the squared-error sums of :func:`pipeline.staged.reconstruct_shard` (``{keys,values}_{err,pred_err,
        norm}``). Each row batch's reconstruction overwrites the rows it was predicted from.
        """
        t0 = time.perf_counter()
        self._expect("reconstruct", layer, self.kv_layer, layer)
        self._expect_prev("reconstruct", layer)
        codec = codec.to(self.device)
        prev_layer = self.preds[layer]
        if prev_layer is None:
            out = {kind: torch.empty(self.kv[kind].shape, device=self.device, dtype=torch.float32) for kind in KINDS}
        else:
            out = self.recon.pop(prev_layer)  # invalid (held by no layer) until every batch is done
            self.recon[-1] = out
        sums = dict.fromkeys(stats.SUMS, 0.0)
        for a, b in self._batches():
            rows = self._rows(a, b)
            prev = None if prev_layer is None else (out["keys"][rows], out["values"][rows])
            keys, values = self._kv("keys", a, b), self._kv("values", a, b)
            keys_hat, values_hat = stats.encode_with_errors(keys, values, prev, codec, sums,
                                                      f"layer {layer}, samples [{a}, {b})")
            out["keys"][rows] = keys_hat
            out["values"][rows] = values_hat
        self.recon.pop(-1, None)
        self.recon[layer] = out
        if layer + 1 == self.checkpoint.num_layers:
            self.finish()
        self._timed("reconstruct", t0)
        if self.heldout is not None:
            t0 = time.perf_counter()
            with torch.inference_mode():  # as forward, where the passes' tensors were made
                self.heldout.aquakv_layer(layer, self._layer, codec)
            self._layer = None
            self._timed("heldout", t0)
        return sums

    # -- resume ------------------------------------------------------------------------------------------------

    def _state_path(self, directory: str | Path) -> Path:
        return Path(directory) / f"{shard_name(self.start, self.stop - self.start)}.safetensors"

    def resume_point(self, finished: int, saved: int | None) -> int:
        """After ``saved`` when its layer's fit is saved (earlier layers' reconstructions are gone), else 0."""
        return saved + 1 if saved is not None and saved < finished else 0

    def save_state(self, layer: int, directory: str | Path) -> None:
        """Save what this shard needs to go on after ``layer`` (reconstructed): the hidden states entering layer
        ``layer + 1`` and each chain's latest reconstruction, as one safetensors file (written whole, then renamed)."""
        self._expect("save_state", layer, self.kv_layer, layer)
        if layer not in self.recon:
            raise CalibrationError(f"save_state({layer}) out of chain order: layer {layer} is not reconstructed")
        tensors = {"hidden": self.hidden}
        for chain_layer, kv in self.recon.items():
            tensors.update({f"recon.{chain_layer}.{kind}": kv[kind] for kind in KINDS})
        path = self._state_path(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"layer": str(layer), "start": str(self.start), "stop": str(self.stop)})
        tmp.replace(path)

    def restore_state(self, layer: int, directory: str | Path) -> None:
        """Go on after ``layer`` from :meth:`save_state`'s file; refuses a file of another layer or shard."""
        path = self._state_path(directory)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
        except (OSError, SafetensorError) as e:
            raise CalibrationError(f"resident state {path} unreadable: {e}") from e
        want = {"layer": str(layer), "start": str(self.start), "stop": str(self.stop)}
        if {k: meta.get(k) for k in want} != want:
            raise CalibrationError(f"resident state {path} is for {meta}, expected {want}")
        n = (self.stop - self.start) * self.seq_len
        hidden = tensors.pop("hidden", None)
        if hidden is None or hidden.shape[:2] != (self.stop - self.start, self.seq_len):
            raise CalibrationError(f"resident state {path}: no hidden states that fit the shard")
        recon: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            parts = name.split(".")
            if (len(parts) != 3 or parts[0] != "recon" or not parts[1].isdigit() or parts[2] not in KINDS
                    or t.shape != (n, self.kv_dim)):
                raise CalibrationError(f"resident state {path}: {name} {tuple(t.shape)} does not fit the shard")
            recon.setdefault(int(parts[1]), {})[parts[2]] = t.to(self.device)
        if any(set(kv) != set(KINDS) for kv in recon.values()):
            raise CalibrationError(f"resident state {path}: a reconstruction without both keys and values")
        self.hidden, self.recon, self.kv = hidden.to(self.device), recon, {}
        self.hidden_layer = self.kv_layer = layer
        self._pending = {}
        self.heldout = self._layer = None  # the held-out passes missed the layers before: validate streams

    def validate_along(self, start: int, stop: int, layout: CacheConfig) -> None:
        """Validate held-out sequences ``[start, stop)`` of the tokens store along the chain (call before layer 0):
        each layer takes them through the exact pass after :meth:`forward` and through the AQUA-KV pass with its codec
        after :meth:`reconstruct`; :meth:`validate` then only reads out the sums."""
        self.heldout_plan = (start, stop, layout)

    def _heldout_passes(self) -> HeldoutValidation | None:
        if self.heldout_plan is None:
            return None
        start, stop, layout = self.heldout_plan
        return HeldoutValidation(self.checkpoint, heldout_rows(self.tokens_path, start, stop), layout,
                                 device=self.device, dtype=DTYPES[self.dtype])

    def validate(self, start: int, stop: int, codecs: list[LayerCodec], cache: CacheConfig) -> tuple[dict, dict]:
        """Held-out sums and fingerprint of sequences ``[start, stop)`` once the chain is done; frees the chain's
        buffers first. When :meth:`validate_along` asked for these rows and layout, the chain ran every layer from
        layer 0 here and ``codecs`` equal the ones it reconstructed with (what the driver saved and returns), the
        passes are done. Else (a resumed or loaded fit, other codecs) the worker streams the checkpoint
        (:func:`pipeline.validate.heldout_sums`) in its own process, on its device and opened checkpoint."""
        heldout, self.heldout = self.heldout, None
        self.close()
        if (heldout is not None and self.heldout_plan == (start, stop, cache) and heldout.done
                and len(codecs) == len(heldout.codecs) and all(map(_same_codec, codecs, heldout.codecs))):
            t0 = time.perf_counter()
            sums, fingerprint = heldout.sums()
            sums["seconds"]["along_chain"] = 1.0  # the passes' seconds were spent inside the chain's layers
            self._timed("heldout", t0)
            return sums, fingerprint
        return heldout_sums(self.checkpoint, self.tokens_path, start, stop, codecs, cache, self.device,
                            DTYPES[self.dtype])

    def close(self) -> None:
        """Wait for pending writes and free the device buffers."""
        try:
            self.finish()
        finally:
            self.hidden, self.kv, self.recon, self.heldout, self._layer = None, {}, {}, None, None
            self._prefetch.shutdown(wait=True, cancel_futures=True)
            if self.group is not None:
                self._writer.shutdown(wait=True)
                self._committer.shutdown(wait=True)
