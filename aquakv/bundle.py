"""Adapter bundles: safetensors + a JSON manifest with the SHA-256 of every file. No pickle anywhere.

Layout of a bundle directory (or object-store prefix)::

    manifest.json           format version, model fingerprint, per-layer quantizers, predictor shapes,
                            calibration config + digest, validation metrics, {file: {sha256, size}}
    predictors.safetensors  layers.{l}.{keys,values}.{weight,bias}
    grids.safetensors       grid.{name} [n, d], signs.{name} [g] (equal tensors stored once, each layer named)

A manifest is validated against one strict schema (:class:`Manifest`) before anything else happens: unknown or
missing fields, wrong types, names that are not plain path components, sizes and counts out of range, a layer
entry missing or inconsistent with the model fingerprint are refused with a :class:`BundleFormatError` subclass.
Every checksum is verified before a tensor is parsed; predictor weights, grids and signs are checked finite once,
at load; a bundle whose fingerprint does not match the model is refused. Local bundle files are opened without
following links and must be regular files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from aquakv.codec import LayerCodec, Residual
from aquakv.config import MAX_RECENT_WINDOW, MAX_SINKS, CacheConfig, QuantizerConfig
from aquakv.errors import (
    BundleFormatError,
    BundleIntegrityError,
    BundleLimitError,
    BundleNotFoundError,
    ManifestSchemaError,
    ModelMismatchError,
    NonFiniteBundleError,
    UnsafeBundlePathError,
)
from aquakv.family import LayerSpec, attention_of, decoder_layers, describe_model, head_dim, kv_heads
from aquakv.predictors import Predictor

FORMAT = "aquakv-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREDICTORS = "predictors.safetensors"
GRIDS = "grids.safetensors"
BUNDLE_FILES = (PREDICTORS, GRIDS)  # exactly the files a manifest lists
PROBE = 16

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")  # bundle name / version: one plain path component
MAX_MANIFEST_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_HEADER_BYTES = 1 << 20  # safetensors JSON header of a bundle file
MAX_FILE_BYTES = 1 << 40
MAX_LAYERS = 1024
CHUNK = 1 << 20  # streaming unit of pulls: the memory a download holds at once
_REFUSED = "do not use this bundle (if it is yours, re-publish it with this aquakv)"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def attention_weights(layer: torch.nn.Module) -> list[torch.Tensor]:
    """A decoder layer's attention weights, by name (Llama: ``k_proj`` first, ``v_proj`` last; Phi-3: ``qkv_proj``,
    ``o_proj``): what the fingerprint probes."""
    params = sorted((n, p) for n, p in attention_of(layer).named_parameters() if p.dim() == 2)
    return [p.detach() for _, p in params]


def model_fingerprint(config: Any, first_key_weight: torch.Tensor, last_value_weight: torch.Tensor,
                      specs: list[LayerSpec]) -> dict:
    """Shape facts of a model, what each layer caches (``layer_kinds``, see :attr:`LayerSpec.kind`) and a probe of
    two attention weights (compared with a tolerance, so dtype may differ)."""
    return {
        "architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0],
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": kv_heads(config),
        "head_dim": head_dim(config),
        "hidden_size": config.hidden_size,
        "rope_theta": float(getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {})
                            .get("rope_theta", 0.0)),
        "model_type": getattr(config, "model_type", "unknown"),
        "layer_kinds": [s.kind for s in specs],
        "weight_probe": [round(float(v), 6) for v in first_key_weight.flatten()[:PROBE].float()]
        + [round(float(v), 6) for v in last_value_weight.flatten()[:PROBE].float()],
    }


def fingerprint_of(model: torch.nn.Module, specs: list[LayerSpec] | None = None) -> dict:
    """Fingerprint of a loaded ``transformers`` decoder model (``specs``: :func:`aquakv.family.describe_model`'s,
    probed here when not given)."""
    layers = decoder_layers(model)
    return model_fingerprint(model.config, attention_weights(layers[0])[0], attention_weights(layers[-1])[-1],
                             specs if specs is not None else describe_model(model))


def check_fingerprint(expected: dict, actual: dict) -> None:
    """Raise :class:`ModelMismatchError` naming the first fact that differs."""
    for key in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "model_type", "layer_kinds"):
        if key in expected and expected.get(key) != actual.get(key):
            raise ModelMismatchError(
                f"bundle was calibrated for a model with {key}={expected.get(key)}, this model has {actual.get(key)}; "
                "use a bundle calibrated for this model (aquakv inspect shows the bundle's model)"
            )
    theta, ours = expected.get("rope_theta") or 0.0, actual.get("rope_theta") or 0.0
    if theta > 0 and ours > 0 and abs(theta - ours) > 1e-6 * theta:  # (0: not known when the bundle was written)
        raise ModelMismatchError(
            f"bundle was calibrated for a model with rope_theta={theta:g}, this model has {ours:g}: its keys and "
            "values differ from those the predictors were fitted on; calibrate a bundle for this configuration"
        )
    a, b = torch.tensor(expected["weight_probe"]), torch.tensor(actual["weight_probe"])
    scale = float(a.abs().max().clamp_min(1e-6))
    if a.shape != b.shape or float((a - b).abs().max()) > 1e-2 * scale:
        raise ModelMismatchError(
            "bundle was calibrated for a model with the same shape but different weights "
            f"({expected.get('architecture')}); calibrate a bundle for this checkpoint"
        )


# --- the manifest schema ---------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


LayerKind = Annotated[str, StringConstraints(pattern=r"^(full|sliding-[0-9]{1,7})(\+rope)?$")]
TensorName = Annotated[str, StringConstraints(pattern=r"^(grid|signs)\.[A-Za-z0-9_.]{1,120}$")]
Name = Annotated[str, StringConstraints(pattern=SAFE_NAME.pattern)]


class FileEntry(_Strict):
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    size: int = Field(ge=0, le=MAX_FILE_BYTES)


class ResidualEntry(_Strict):
    """One residual quantizer (the fields of :class:`QuantizerConfig`), its tensors and its predictor's shape."""

    dim: int
    size: int
    group_size: int
    scale_dtype: str
    grid: TensorName
    signs: TensorName
    predictor: Annotated[list[Annotated[int, Field(ge=1, le=1 << 18)]], Field(min_length=2, max_length=2)] | None

    def quantizer(self) -> QuantizerConfig:
        return QuantizerConfig(dim=self.dim, size=self.size, group_size=self.group_size, scale_dtype=self.scale_dtype)


class LayerEntry(_Strict):
    keys: ResidualEntry
    values: ResidualEntry


class Fingerprint(_Strict):
    architecture: str = Field(max_length=200)
    num_layers: int = Field(ge=1, le=MAX_LAYERS)
    num_kv_heads: int = Field(ge=1, le=1024)
    head_dim: int = Field(ge=1, le=1024)
    hidden_size: int = Field(ge=1, le=1 << 17)
    rope_theta: float = Field(ge=0)
    model_type: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,64}$")
    layer_kinds: list[LayerKind] | None = Field(default=None, max_length=MAX_LAYERS)
    weight_probe: list[float] = Field(max_length=2 * PROBE)


class CacheEntry(_Strict):
    sinks: int = Field(ge=0, le=MAX_SINKS)
    recent_window: int = Field(ge=1, le=MAX_RECENT_WINDOW)
    compress: bool


class BitsEntry(_Strict):
    index: float = Field(ge=0, le=64)
    scales: float = Field(ge=0, le=64)
    total: float = Field(ge=0, le=128)


class Manifest(_Strict):
    """The whole ``manifest.json``; free-form only under ``calibration`` and ``validation`` (depth-bounded JSON)."""

    format: Literal["aquakv-bundle"]
    format_version: Literal[1]
    name: Name
    version: Name
    model: Fingerprint
    cache: CacheEntry
    layers: list[LayerEntry] = Field(max_length=MAX_LAYERS)
    bits_per_value: BitsEntry
    calibration: dict[str, JsonValue]
    validation: dict[str, JsonValue]
    files: dict[str, FileEntry]


def _depth(obj: object) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, d)
            stack.extend((child, d + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _schema_error(e: ValidationError, where: str, loc: tuple = ()) -> ManifestSchemaError:
    err = e.errors()[0]
    field_ = ".".join(str(p) for p in (*loc, *err["loc"])) or "(top level)"
    got = "" if err["type"] in ("missing", "value_error") else f" (got {repr(err['input'])[:60]})"
    more = f" and {e.error_count() - 1} more problem(s)" if e.error_count() > 1 else ""
    return ManifestSchemaError(f"{where}: manifest.json field {field_}: {err['msg']}{got}{more}; {_REFUSED}")


def _check_names(raw: dict, where: str) -> None:
    """Name, version and file names must be plain path components (file names: exactly the known set)."""
    for key in ("name", "version"):
        value = raw.get(key)
        if isinstance(value, str) and not SAFE_NAME.match(value):
            raise UnsafeBundlePathError(
                f"{where}: manifest {key} {value[:80]!r} is not a plain name ({SAFE_NAME.pattern}); {_REFUSED}")
    files = raw.get("files")
    if not isinstance(files, dict):
        return
    for name in files:
        if name not in BUNDLE_FILES:
            if not SAFE_NAME.match(name):
                raise UnsafeBundlePathError(
                    f"{where}: manifest lists file {name[:80]!r}, which is not a plain file name; {_REFUSED}")
            raise ManifestSchemaError(
                f"{where}: manifest lists unknown file {name!r} (a bundle holds exactly {', '.join(BUNDLE_FILES)}); "
                f"{_REFUSED}")
    if missing := [n for n in BUNDLE_FILES if n not in files]:
        raise ManifestSchemaError(f"{where}: manifest lists no file {missing[0]!r}; {_REFUSED}")


def _payload_bytes(shapes: list[list[int]]) -> int:
    return 4 * sum(math.prod(s) for s in shapes)  # float32 tensors


def _check_consistency(m: Manifest, where: str) -> None:
    """Layer entries against the fingerprint; quantizer rules; file sizes against the tensors they must hold."""
    fp = m.model
    for what, n in (("layer entries", len(m.layers)), ("layer kinds", len(fp.layer_kinds or m.layers))):
        if n != fp.num_layers:
            raise ManifestSchemaError(
                f"{where}: manifest has {n} {what} but its model fingerprint has {fp.num_layers} layers; {_REFUSED}")
    kv = fp.num_kv_heads * fp.head_dim
    predictors: list[list[int]] = []
    grids: dict[str, list[int]] = {}
    for i, layer in enumerate(m.layers):
        for kind, e, need in (("keys", layer.keys, [kv, kv]), ("values", layer.values, [2 * kv, kv])):
            try:
                cfg = e.quantizer()
            except ValidationError as err:
                raise _schema_error(err, where, ("layers", i, kind)) from None
            if e.predictor is not None and (i == 0 or e.predictor != need):
                raise ManifestSchemaError(
                    f"{where}: layer {i} {kind} predictor has shape {e.predictor}, a model with kv_dim {kv} needs "
                    f"{'none at layer 0' if i == 0 else need}; {_REFUSED}")
            if e.predictor is not None:
                predictors += [e.predictor, [e.predictor[1]]]
            grids[e.grid] = [cfg.size, cfg.dim]
            grids[e.signs] = [cfg.group_size]
    for name, tensors in ((PREDICTORS, predictors), (GRIDS, list(grids.values()))):
        bound = 8 + MAX_HEADER_BYTES + _payload_bytes(tensors)
        if m.files[name].size > bound:
            raise ManifestSchemaError(
                f"{where}: manifest says {name} is {m.files[name].size} bytes, but the tensors it lists fit in "
                f"{bound}; {_REFUSED}")


def parse_manifest(raw: bytes, where: str) -> dict:
    """Validate ``manifest.json`` bytes against :class:`Manifest`; return the manifest as a dict."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleLimitError(f"{where}: manifest.json is larger than {MAX_MANIFEST_BYTES} bytes; {_REFUSED}")
    try:
        manifest = json.loads(raw)
    except RecursionError:
        raise BundleLimitError(f"{where}: manifest.json nests JSON deeper than {MAX_JSON_DEPTH}; {_REFUSED}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleFormatError(f"{where}: manifest.json is not valid JSON ({e}); re-publish it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleFormatError(f"{where}: manifest.json is not an aquakv bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleFormatError(
            f"{where}: bundle format version {manifest.get('format_version')!r} is not supported by this aquakv "
            f"(reads version {FORMAT_VERSION}); upgrade aquakv or re-publish the bundle"
        )
    if _depth(manifest) > MAX_JSON_DEPTH:
        raise BundleLimitError(f"{where}: manifest.json nests JSON deeper than {MAX_JSON_DEPTH}; {_REFUSED}")
    _check_names(manifest, where)
    try:
        model = Manifest.model_validate(manifest)
    except ValidationError as e:
        raise _schema_error(e, where) from None
    _check_consistency(model, where)
    return manifest


# --- files -------------------------------------------------------------------------------------------------------


def open_regular(path: str | Path, where: str) -> BinaryIO:
    """Open a bundle file for reading without following a link; refuse anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BundleIntegrityError(f"{where}: {Path(path).name} is missing; pull the bundle again") from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise BundleNotFoundError(f"{where}: cannot open {Path(path).name}: {e.strerror}") from e
        raise UnsafeBundlePathError(
            f"{where}: {Path(path).name} is a symbolic link; bundle files must be regular files inside the bundle: "
            f"{_REFUSED}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeBundlePathError(f"{where}: {Path(path).name} is not a regular file; {_REFUSED}")
    return os.fdopen(fd, "rb")


def read_capped(f: BinaryIO, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``f``, read in :data:`CHUNK` pieces (one byte past ``limit`` means "too long")."""
    parts, n = [], 0
    while n <= limit and (chunk := f.read(min(CHUNK, limit + 1 - n))):
        parts.append(chunk)
        n += len(chunk)
    return b"".join(parts)


def verify_file(manifest: dict, name: str, data: bytes, where: str) -> None:
    """Raise :class:`BundleIntegrityError` unless ``data`` matches the manifest's size and SHA-256."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise BundleFormatError(f"{where}: manifest lists no file {name!r}")
    if len(data) != entry["size"]:
        raise BundleIntegrityError(
            f"{where}/{name} is {'more than ' if len(data) > entry['size'] else ''}{len(data)} bytes, the manifest "
            f"says {entry['size']} (truncated or altered); delete it and pull the bundle again"
        )
    if sha256(data) != entry["sha256"]:
        raise BundleIntegrityError(
            f"{where}/{name} does not match its SHA-256 in the manifest (tampered or corrupt); "
            "delete it and pull the bundle again"
        )


def _load_tensors(data: bytes, name: str, where: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes after bounding the header; every tensor must be a finite float tensor."""
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if header > MAX_HEADER_BYTES:
        raise BundleLimitError(f"{where}/{name}: safetensors header of {header} bytes exceeds {MAX_HEADER_BYTES}; "
                               f"{_REFUSED}")
    try:
        tensors = load_safetensors(data)
    except SafetensorError as e:
        raise BundleFormatError(f"{where}/{name} is not a valid safetensors file ({e}); {_REFUSED}") from None
    for key, t in tensors.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise NonFiniteBundleError(f"{where}/{name}: tensor {key!r} is not a finite float tensor; {_REFUSED}")
    return tensors


# --- bundles -----------------------------------------------------------------------------------------------------


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


def stored_bits(config: QuantizerConfig, kv_dim: int) -> tuple[float, float]:
    """Index and scale bits stored per value of ``kv_dim`` channels (Hadamard-group padding included)."""
    padded = math.ceil(kv_dim / config.group_size) * config.group_size
    return (config.index_bits_per_value * padded / kv_dim,
            (config.bits_per_value - config.index_bits_per_value) * padded / kv_dim)


def bits_per_value(codecs: list[LayerCodec], kv_dim: int) -> dict[str, float]:
    """Average stored bits per cached value over layers, keys and values: index bits, scale bits, total."""
    index = scales = 0.0
    for codec in codecs:
        for r in (codec.keys, codec.values):
            i, sc = stored_bits(r.config, kv_dim)
            index, scales = index + i, scales + sc
    n = 2 * len(codecs)
    return {"index": index / n, "scales": scales / n, "total": (index + scales) / n}


def _shared_name(tensors: dict[str, torch.Tensor], prefix: str, value: torch.Tensor, default: str) -> str:
    """Name of an equal tensor already stored under ``prefix`` (stored once, referenced by many), else ``default``."""
    return next((k for k, t in tensors.items() if k.startswith(prefix) and t.shape == value.shape
                 and torch.equal(t, value)), default)


def encode_layer(i: int, codec: LayerCodec, grids: dict[str, torch.Tensor],
                 predictors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Layer ``i``'s manifest entry; its grids / signs go into ``grids`` (an equal tensor already there is referenced,
    not stored again) and its predictors into ``predictors``, under the bundle's tensor names. The calibration's
    per-layer files use it too (:func:`pipeline.store.save_codec`): one codec format."""
    entry: dict[str, Any] = {}
    for kind, r, p in (("keys", codec.keys, codec.key_predictor), ("values", codec.values, codec.value_predictor)):
        grid, signs = r.grid.float().cpu().contiguous(), r.signs.float().cpu().contiguous()
        e = {**r.config.model_dump(), "grid": _shared_name(grids, "grid.", grid, f"grid.layers.{i}.{kind}"),
             "signs": _shared_name(grids, "signs.", signs, f"signs.layers.{i}.{kind}")}  # each layer its own
        grids[e["grid"]], grids[e["signs"]] = grid, signs
        e["predictor"] = None if p is None else list(p.weight.shape)
        if p is not None:
            predictors[f"layers.{i}.{kind}.weight"] = p.weight.float().cpu().contiguous()
            predictors[f"layers.{i}.{kind}.bias"] = p.bias.float().cpu().contiguous()
        entry[kind] = e
    return entry


def decode_layer(i: int, entry: dict, grids: dict[str, torch.Tensor], predictors: dict[str, torch.Tensor],
                 where: str) -> LayerCodec:
    """Layer ``i``'s codec from its manifest entry and tensors, every field and shape checked (the inverse of
    :func:`encode_layer`); a malformed entry raises a one-line :class:`BundleFormatError`."""
    if not isinstance(entry, dict) or set(entry) != {"keys", "values"}:
        raise BundleFormatError(f"{where}: layer {i} entry must hold exactly 'keys' and 'values'; {_REFUSED}")
    (kr, kp), (vr, vp) = (_codec_part(i, kind, entry[kind], grids, predictors, where) for kind in ("keys", "values"))
    return LayerCodec(kr, vr, kp, vp)


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
    layers = [encode_layer(i, codec, grids, predictors) for i, codec in enumerate(codecs)]
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


def _codec_part(i: int, kind: str, entry: dict, grids: dict, predictors: dict,
                where: str) -> tuple[Residual, Predictor | None]:
    e = ResidualEntry.model_validate(entry)
    cfg = e.quantizer()
    grid, signs = grids.get(e.grid), grids.get(e.signs)
    if grid is None or tuple(grid.shape) != (cfg.size, cfg.dim):
        raise BundleFormatError(
            f"{where}: layer {i} {kind}: grid {e.grid!r} has shape "
            f"{None if grid is None else tuple(grid.shape)}, its config needs ({cfg.size}, {cfg.dim}); {_REFUSED}"
        )
    if signs is None or tuple(signs.shape) != (cfg.group_size,):
        raise BundleFormatError(f"{where}: layer {i} {kind}: Hadamard signs do not match group size; {_REFUSED}")
    if not bool((signs.abs() == 1).all()):
        raise NonFiniteBundleError(f"{where}: layer {i} {kind}: Hadamard signs {e.signs!r} are not all ±1; {_REFUSED}")
    if e.predictor is None:
        return Residual(cfg, grid, signs), None
    w, b = predictors.get(f"layers.{i}.{kind}.weight"), predictors.get(f"layers.{i}.{kind}.bias")
    if w is None or b is None or list(w.shape) != e.predictor or tuple(b.shape) != (e.predictor[1],):
        raise BundleFormatError(f"{where}: layer {i} {kind} predictor tensors do not match shape {e.predictor}; "
                                f"{_REFUSED}")
    return Residual(cfg, grid, signs), Predictor(w, b)


def decode_bundle(files: dict[str, bytes], where: str = "bundle") -> Bundle:
    """Validate the manifest, verify every checksum, check every tensor, then build the per-layer codecs."""
    if MANIFEST not in files:
        raise BundleIntegrityError(f"{where}: no {MANIFEST}; pull the bundle again")
    manifest = parse_manifest(files[MANIFEST], where)
    for name in files:
        if name != MANIFEST and name not in manifest["files"]:
            raise UnsafeBundlePathError(f"{where}: file {name[:80]!r} is not listed in the manifest; {_REFUSED}")
    for name in manifest["files"]:
        if name not in files:
            raise BundleIntegrityError(f"{where}: file {name} listed in the manifest is missing; pull the bundle again")
        verify_file(manifest, name, files[name], where)
    grids = _load_tensors(files[GRIDS], GRIDS, where)
    predictors = _load_tensors(files[PREDICTORS], PREDICTORS, where)
    codecs = [decode_layer(i, entry, grids, predictors, where) for i, entry in enumerate(manifest["layers"])]
    return Bundle(codecs, CacheConfig(**manifest["cache"]), manifest)


def read_bundle_files(path: str | Path) -> dict[str, bytes]:
    """The manifest and the files it lists from a local directory, each read without following links and capped
    at its declared size (so a file that grows, or a device, is never read whole)."""
    path = Path(path)
    if not (path / MANIFEST).exists() and not (path / MANIFEST).is_symlink():
        raise BundleNotFoundError(f"{path} holds no {MANIFEST}; is it a bundle directory?")
    with open_regular(path / MANIFEST, str(path)) as f:
        raw = read_capped(f, MAX_MANIFEST_BYTES)
    manifest = parse_manifest(raw, str(path))
    files = {MANIFEST: raw}
    for name, entry in manifest["files"].items():
        with open_regular(path / name, str(path)) as f:
            files[name] = read_capped(f, entry["size"])
    return files


def read_bundle_dir(path: str | Path) -> Bundle:
    """Load and verify a bundle from a local directory."""
    return decode_bundle(read_bundle_files(path), str(path))
