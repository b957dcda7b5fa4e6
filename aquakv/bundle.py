"""Adapter bundles: safetensors + a JSON manifest with the SHA-256 of every file. No pickle anywhere.

Layout of a bundle directory (or object-store prefix)::

    manifest.json           format version, model fingerprint, per-layer quantizers, predictor shapes,
                            calibration config + digest, validation metrics, {file: {sha256, size}}
    predictors.safetensors  layers.{l}.{keys,values}.{weight,bias}
    grids.safetensors       grid.{name} [n, d], signs.{g} [g]

Every checksum is verified before a tensor is parsed; a bundle whose fingerprint does not
match the model is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from aquakv.codec import LayerCodec, Residual
from aquakv.config import CacheConfig, QuantizerConfig
from aquakv.errors import BundleFormatError, BundleIntegrityError, ModelMismatchError
from aquakv.predictors import Predictor

FORMAT = "aquakv-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREDICTORS = "predictors.safetensors"
GRIDS = "grids.safetensors"
PROBE = 16


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_fingerprint(config: Any, first_key_weight: torch.Tensor, last_value_weight: torch.Tensor) -> dict:
    """Shape facts of a model and a probe of two projection weights (compared with a tolerance, so dtype may differ)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0],
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_size": config.hidden_size,
        "rope_theta": float(getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {})
                            .get("rope_theta", 0.0)),
        "weight_probe": [round(float(v), 6) for v in first_key_weight.flatten()[:PROBE].float()]
        + [round(float(v), 6) for v in last_value_weight.flatten()[:PROBE].float()],
    }


def fingerprint_of(model: torch.nn.Module) -> dict:
    """Fingerprint of a loaded ``transformers`` decoder model."""
    layers = model.model.layers
    return model_fingerprint(model.config, layers[0].self_attn.k_proj.weight.detach(),
                             layers[-1].self_attn.v_proj.weight.detach())


def check_fingerprint(expected: dict, actual: dict) -> None:
    """Raise :class:`ModelMismatchError` naming the first fact that differs."""
    for key in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"):
        if expected.get(key) != actual.get(key):
            raise ModelMismatchError(
                f"bundle was calibrated for a model with {key}={expected.get(key)}, this model has {actual.get(key)}; "
                "use a bundle calibrated for this model (aquakv inspect shows the bundle's model)"
            )
    a, b = torch.tensor(expected["weight_probe"]), torch.tensor(actual["weight_probe"])
    scale = float(a.abs().max().clamp_min(1e-6))
    if a.shape != b.shape or float((a - b).abs().max()) > 1e-2 * scale:
        raise ModelMismatchError(
            "bundle was calibrated for a model with the same shape but different weights "
            f"({expected.get('architecture')}); calibrate a bundle for this checkpoint"
        )


@dataclass
class Bundle:
    """A verified adapter: per-layer codecs, the cache layout and the manifest they came from."""

    codecs: list[LayerCodec]
    cache: CacheConfig
    manifest: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> dict:
        return self.manifest["model"]

    def bits_per_value(self) -> dict[str, float]:
        return bits_per_value(self.codecs, self.manifest["model"]["num_kv_heads"] * self.manifest["model"]["head_dim"])


def bits_per_value(codecs: list[LayerCodec], kv_dim: int) -> dict[str, float]:
    """Average stored bits per cached value over layers, keys and values: index bits, scale bits, total."""
    index = scales = 0.0
    for codec in codecs:
        for r in (codec.keys, codec.values):
            padded = math.ceil(kv_dim / r.config.group_size) * r.config.group_size
            index += r.config.index_bits_per_value * padded / kv_dim
            scales += (r.config.bits_per_value - r.config.index_bits_per_value) * padded / kv_dim
    n = 2 * len(codecs)
    return {"index": index / n, "scales": scales / n, "total": (index + scales) / n}


def _residual_entry(r: Residual, grid_name: str) -> dict:
    return {**r.config.model_dump(), "grid": grid_name, "signs": f"signs.{r.config.group_size}.{len(r.signs)}"}


def encode_bundle(
    codecs: list[LayerCodec],
    cache: CacheConfig,
    fingerprint: dict,
    calibration: dict | None = None,
    validation: dict | None = None,
    name: str = "aquakv",
    version: str = "v1",
) -> dict[str, bytes]:
    """Serialize a bundle to ``{filename: bytes}`` (manifest last, holding every other file's SHA-256)."""
    grids: dict[str, torch.Tensor] = {}
    predictors: dict[str, torch.Tensor] = {}
    layers = []
    for i, codec in enumerate(codecs):
        entry: dict[str, Any] = {}
        for kind, r, p in (("keys", codec.keys, codec.key_predictor), ("values", codec.values, codec.value_predictor)):
            grid_name = f"grid.layers.{i}.{kind}"
            shared = next((k for k, g in grids.items() if k.startswith("grid.") and g.shape == r.grid.shape
                           and torch.equal(g, r.grid.float().cpu())), None)
            grid_name = shared or grid_name
            grids[grid_name] = r.grid.float().cpu().contiguous()
            e = _residual_entry(r, grid_name)
            grids[e["signs"]] = r.signs.float().cpu().contiguous()
            e["predictor"] = None if p is None else list(p.weight.shape)
            if p is not None:
                predictors[f"layers.{i}.{kind}.weight"] = p.weight.float().cpu().contiguous()
                predictors[f"layers.{i}.{kind}.bias"] = p.bias.float().cpu().contiguous()
            entry[kind] = e
        layers.append(entry)
    files = {PREDICTORS: save_safetensors(predictors) if predictors else save_safetensors({"empty": torch.zeros(0)}),
             GRIDS: save_safetensors(grids)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "model": fingerprint,
        "cache": cache.model_dump(),
        "layers": layers,
        "bits_per_value": bits_per_value(codecs, fingerprint["num_kv_heads"] * fingerprint["head_dim"]),
        "calibration": calibration or {},
        "validation": validation or {},
        "files": {n: {"sha256": sha256(b), "size": len(b)} for n, b in files.items()},
    }
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return files


def write_bundle(path: str | Path, files: dict[str, bytes]) -> Path:
    """Write encoded bundle files into a local directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for n, b in files.items():
        (path / n).write_bytes(b)
    return path


def parse_manifest(raw: bytes, where: str) -> dict:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleFormatError(f"{where}: manifest.json is not valid JSON ({e}); re-publish it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleFormatError(f"{where}: manifest.json is not an aquakv bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleFormatError(
            f"{where}: bundle format version {manifest.get('format_version')!r} is not supported by this aquakv "
            f"(reads version {FORMAT_VERSION}); upgrade aquakv or re-publish the bundle"
        )
    return manifest


def verify_file(manifest: dict, name: str, data: bytes, where: str) -> None:
    """Raise :class:`BundleIntegrityError` unless ``data`` matches the manifest's size and SHA-256."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise BundleFormatError(f"{where}: manifest lists no file {name!r}")
    if len(data) != entry["size"]:
        raise BundleIntegrityError(
            f"{where}/{name} is {len(data)} bytes, the manifest says {entry['size']} (truncated or altered); "
            "delete it and pull the bundle again"
        )
    if sha256(data) != entry["sha256"]:
        raise BundleIntegrityError(
            f"{where}/{name} does not match its SHA-256 in the manifest (tampered or corrupt); "
            "delete it and pull the bundle again"
        )


def decode_bundle(files: dict[str, bytes], where: str = "bundle") -> Bundle:
    """Verify every checksum, then build the per-layer codecs."""
    manifest = parse_manifest(files[MANIFEST], where)
    for name in manifest["files"]:
        if name not in files:
            raise BundleIntegrityError(f"{where}: file {name} listed in the manifest is missing; pull the bundle again")
        verify_file(manifest, name, files[name], where)
    grids = load_safetensors(files[GRIDS])
    predictors = load_safetensors(files[PREDICTORS])
    codecs = []
    for i, entry in enumerate(manifest["layers"]):
        parts = {}
        for kind in ("keys", "values"):
            e = dict(entry[kind])
            grid_name, signs_name, shape = e.pop("grid"), e.pop("signs"), e.pop("predictor")
            cfg = QuantizerConfig(**e)
            grid, signs = grids.get(grid_name), grids.get(signs_name)
            if grid is None or tuple(grid.shape) != (cfg.size, cfg.dim):
                raise BundleFormatError(
                    f"{where}: layer {i} {kind}: grid {grid_name!r} has shape "
                    f"{None if grid is None else tuple(grid.shape)}, its config needs ({cfg.size}, {cfg.dim})"
                )
            if signs is None or signs.numel() != cfg.group_size:
                raise BundleFormatError(f"{where}: layer {i} {kind}: Hadamard signs do not match group size")
            pred = None
            if shape is not None:
                w, b = predictors.get(f"layers.{i}.{kind}.weight"), predictors.get(f"layers.{i}.{kind}.bias")
                if w is None or b is None or list(w.shape) != shape or b.shape[0] != shape[1]:
                    raise BundleFormatError(f"{where}: layer {i} {kind} predictor does not match shape {shape}")
                pred = Predictor(w, b)
            parts[kind] = (Residual(cfg, grid, signs), pred)
        codecs.append(LayerCodec(parts["keys"][0], parts["values"][0], parts["keys"][1], parts["values"][1]))
    return Bundle(codecs, CacheConfig(**manifest["cache"]), manifest)


def read_bundle_dir(path: str | Path) -> Bundle:
    """Load and verify a bundle from a local directory."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        from aquakv.errors import BundleNotFoundError

        raise BundleNotFoundError(f"{path} holds no {MANIFEST}; is it a bundle directory?")
    manifest = parse_manifest((path / MANIFEST).read_bytes(), str(path))
    files = {MANIFEST: (path / MANIFEST).read_bytes()}
    for name in manifest["files"]:
        if not (path / name).is_file():
            raise BundleIntegrityError(f"{path}: file {name} listed in the manifest is missing; pull the bundle again")
        files[name] = (path / name).read_bytes()
    return decode_bundle(files, str(path))
