import functools
import http.server
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from aquakv.bundle import (
    MANIFEST,
    PREDICTORS,
    decode_bundle,
    encode_bundle,
    fingerprint_of,
    read_bundle_dir,
    write_bundle,
)
from aquakv.cache import AquaKVCache
from aquakv.codec import LayerCodec, gaussian_residual
from aquakv.config import CacheConfig, QuantizerConfig
from aquakv.errors import BundleFormatError, BundleIntegrityError, BundleNotFoundError, ModelMismatchError
from aquakv.registry import load_bundle, pull
from conftest import tiny_llama


@pytest.fixture()
def bundle_dir(tmp_path, model3, bundle3) -> Path:
    files = encode_bundle(bundle3.codecs, bundle3.cache, fingerprint_of(model3), name="tiny", version="v1")
    return write_bundle(tmp_path / "registry" / "tiny" / "v1", files)


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def test_round_trip_keeps_codecs(bundle_dir, bundle3, model3):
    loaded = read_bundle_dir(bundle_dir)
    assert len(loaded.codecs) == 3
    assert loaded.codecs[0].key_predictor is None
    assert torch.equal(loaded.codecs[2].value_predictor.weight, bundle3.codecs[2].value_predictor.weight)
    assert loaded.cache == bundle3.cache
    AquaKVCache.from_bundle(loaded, model3)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in bundle_dir.iterdir())


def test_tampered_file_is_refused(bundle_dir):
    data = bytearray((bundle_dir / PREDICTORS).read_bytes())
    data[-1] ^= 0xFF
    (bundle_dir / PREDICTORS).write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="SHA-256"):
        read_bundle_dir(bundle_dir)


def test_truncated_file_is_refused(bundle_dir):
    data = (bundle_dir / PREDICTORS).read_bytes()
    (bundle_dir / PREDICTORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleIntegrityError, match="truncated"):
        read_bundle_dir(bundle_dir)


def test_missing_file_is_refused(bundle_dir):
    (bundle_dir / PREDICTORS).unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        read_bundle_dir(bundle_dir)


def test_unknown_format_version(bundle_dir):
    m = _manifest(bundle_dir)
    m["format_version"] = 99
    (bundle_dir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleFormatError, match="format version 99"):
        read_bundle_dir(bundle_dir)


def test_grid_that_does_not_match_its_config(bundle_dir):
    m = _manifest(bundle_dir)
    m["layers"][1]["keys"]["size"] = 64  # the stored grid has 256 points
    (bundle_dir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleFormatError, match="grid"):
        read_bundle_dir(bundle_dir)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [({"layers": 4}, "num_layers"), ({"kv_heads": 4}, "num_kv_heads"), ({"head_dim": 8}, "head_dim"),
     ({"seed": 1}, "different weights"), ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
                                           "rope_theta=10000, this model has 500")],
)
def test_bundle_for_another_model_is_refused(bundle_dir, kwargs, what):
    other = tiny_llama(**kwargs)
    with pytest.raises(ModelMismatchError, match=what):
        AquaKVCache.from_bundle(str(bundle_dir), other)


def test_bundle_loads_in_another_dtype(bundle_dir, model3):
    AquaKVCache.from_bundle(str(bundle_dir), tiny_llama().to(torch.bfloat16))


def test_pull_resolves_latest_caches_and_is_instant(tmp_path, bundle_dir, monkeypatch):
    monkeypatch.setenv("AQUAKV_CACHE", str(tmp_path / "cache"))
    (bundle_dir.parent / "latest").write_text("v1\n")
    first = pull(f"file://{bundle_dir.parent}", progress=False)
    assert read_bundle_dir(first).manifest["version"] == "v1"
    t = time.perf_counter()
    second = pull(str(bundle_dir.parent / "latest"), progress=False)
    assert second == first and time.perf_counter() - t < 1.0
    assert len(list((tmp_path / "cache" / "bundles" / "tiny").iterdir())) == 1


def test_failed_pull_leaves_nothing(tmp_path, bundle_dir):
    data = (bundle_dir / PREDICTORS).read_bytes()
    (bundle_dir / PREDICTORS).write_bytes(data[:-4] + b"evil")
    with pytest.raises(BundleIntegrityError):
        pull(str(bundle_dir), to=tmp_path / "local", progress=False)
    assert list((tmp_path / "local" / "tiny").iterdir()) == []


def test_pull_over_http(tmp_path, bundle_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(bundle_dir.parent.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tiny/v1"
        local = pull(url, to=tmp_path / "local", progress=False)
        assert read_bundle_dir(local).manifest["name"] == "tiny"
    finally:
        server.shutdown()


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9/nothing/here", "/nonexistent/bundle/dir", "nosuchscheme://x/y"])
def test_unreachable_uri(uri):
    with pytest.raises(BundleNotFoundError):
        load_bundle(uri)


def test_every_layer_keeps_its_own_hadamard_signs(model3):
    """Each layer's keys and values have their own random signs; equal tensors may be stored once, but none is lost."""
    cfg = QuantizerConfig(dim=2, size=16, group_size=32)
    codecs = [LayerCodec(gaussian_residual(cfg, 2 * i), gaussian_residual(cfg, 2 * i + 1)) for i in range(3)]
    codecs.append(LayerCodec(gaussian_residual(cfg, 0), gaussian_residual(cfg, 1)))  # repeats layer 0's signs
    fp = {**fingerprint_of(model3), "num_layers": 4, "layer_kinds": ["full+rope"] * 4}
    decoded = decode_bundle(encode_bundle(codecs, CacheConfig(), fp))
    for ours, theirs in zip(codecs, decoded.codecs, strict=True):
        assert torch.equal(ours.keys.signs.float(), theirs.keys.signs.float())
        assert torch.equal(ours.values.signs.float(), theirs.values.signs.float())
        assert torch.equal(ours.keys.grid.float(), theirs.keys.grid.float())
