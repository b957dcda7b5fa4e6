"""pipeline.publish: atomic, idempotent, conflict-safe publishing to a local or fsspec registry."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch

from aquakv.bundle import encode_bundle, read_bundle_dir
from aquakv.codec import LayerCodec
from aquakv.config import CacheConfig, CalibrationConfig
from aquakv.errors import (
    BundleFormatError,
    LatestPointerError,
    PublishConflictError,
    RegistryNotWritableError,
    UnsafeBundlePathError,
)
from aquakv.predictors import Predictor
from aquakv.registry import STALE_AFTER_S, load_bundle, pull, version_key
from pipeline.publish import publish
from pipeline.solve import residual_quantizers

FINGERPRINT = {"architecture": "LlamaForCausalLM", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16,
               "hidden_size": 64, "rope_theta": 10000.0, "weight_probe": [0.0] * 32}


def bundle_files(version: str = "v1", tag: str = "a", name: str = "demo") -> dict[str, bytes]:
    """A small valid bundle; ``tag`` changes its bytes (validation metrics), nothing else."""
    cfg = CalibrationConfig(model="m", data="d")
    gen = torch.Generator().manual_seed(0)
    codecs = [LayerCodec(*residual_quantizers(cfg, 0, True))]
    keys, values = residual_quantizers(cfg, 1, False)
    codecs.append(LayerCodec(keys, values, Predictor(torch.randn(32, 32, generator=gen), torch.zeros(32)),
                             Predictor(torch.randn(64, 32, generator=gen), torch.zeros(32))))
    return encode_bundle(codecs, CacheConfig(), FINGERPRINT, validation={"tag": tag}, name=name, version=version)


def _leftovers(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.name.startswith("."))


def test_publish_pull_latest_idempotent(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    files = bundle_files("v1")
    where = publish(files, str(reg), "demo", "v1")
    assert Path(where) == reg / "demo" / "v1"
    assert (reg / "demo" / "latest").read_text().strip() == "v1"
    assert {p.name for p in (reg / "demo" / "v1").iterdir()} == set(files)
    assert _leftovers(reg / "demo") == []
    assert read_bundle_dir(where).manifest["version"] == "v1"
    # idempotent rerun: same bytes, same answer, nothing rewritten
    mtime = (reg / "demo" / "v1" / "manifest.json").stat().st_mtime_ns
    assert publish(files, str(reg), "demo", "v1") == where
    assert (reg / "demo" / "v1" / "manifest.json").stat().st_mtime_ns == mtime
    # a new version moves `latest`; pull resolves it
    publish(bundle_files("v2"), str(reg), "demo", "v2")
    assert (reg / "demo" / "latest").read_text().strip() == "v2"
    local = pull(str(reg / "demo"), to=tmp_path / "cache", progress=False)
    assert read_bundle_dir(local).manifest["version"] == "v2"
    assert load_bundle(str(reg / "demo" / "latest")).manifest["version"] == "v2"


def test_conflicting_version_is_refused(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    publish(bundle_files("v1", tag="a"), str(reg), "demo", "v1")
    before = (reg / "demo" / "v1" / "manifest.json").read_bytes()
    with pytest.raises(PublishConflictError, match="already published with different contents"):
        publish(bundle_files("v1", tag="b"), str(reg), "demo", "v1")
    assert (reg / "demo" / "v1" / "manifest.json").read_bytes() == before
    assert _leftovers(reg / "demo") == []


def test_bad_names_and_mismatched_manifest(tmp_path: Path) -> None:
    with pytest.raises(UnsafeBundlePathError, match="latest"):
        publish(bundle_files("latest"), str(tmp_path), "demo", "latest")
    with pytest.raises(UnsafeBundlePathError, match="not a plain name"):
        publish(bundle_files(), str(tmp_path), "../up", "v1")
    with pytest.raises(BundleFormatError, match="published as"):
        publish(bundle_files("v1"), str(tmp_path), "demo", "v9")
    assert not (tmp_path / "demo").exists()


def _race(registry: str, tag: str, bundles: list[dict[str, bytes]], barrier, results) -> None:
    for i, files in enumerate(bundles):
        barrier.wait()
        try:
            publish(files, registry, "demo", f"r{i}")
            results.put((i, tag, "won"))
        except PublishConflictError:
            results.put((i, tag, "conflict"))


def test_concurrent_publishes_exactly_one_wins(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")  # fork after torch has run threads is unsafe
    rounds, barrier, results = 4, ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), tag, [bundle_files(f"r{i}", tag) for i in range(rounds)],
                                             barrier, results)) for tag in "ab"]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * rounds)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for i in range(rounds):
        got = sorted(o for r, _, o in outcomes if r == i)
        assert got == ["conflict", "won"], got
        winner = next(t for r, t, o in outcomes if r == i and o == "won")
        assert read_bundle_dir(tmp_path / "demo" / f"r{i}").manifest["validation"]["tag"] == winner
    assert _leftovers(tmp_path / "demo") == []


def test_object_store_protocol() -> None:
    """A non-local fsspec registry (memory://): exclusive claim, manifest last, pull through the URI."""
    uri = "memory://aquakv-test-registry"
    fs = fsspec.filesystem("memory")
    if fs.exists("/aquakv-test-registry"):
        fs.rm("/aquakv-test-registry", recursive=True)
    where = publish(bundle_files("v1"), uri, "demo", "v1")
    assert where == "memory:///aquakv-test-registry/demo/v1"
    assert publish(bundle_files("v1"), uri, "demo", "v1") == where
    with pytest.raises(PublishConflictError):
        publish(bundle_files("v1", tag="b"), uri, "demo", "v1")
    assert load_bundle(f"{uri}/demo").manifest["version"] == "v1"
    # a claim left by another (crashed) run with other contents blocks the version with a clear message
    fs.pipe_file("/aquakv-test-registry/demo/.claims/v2", b"someone else's manifest")
    with pytest.raises(PublishConflictError, match="delete the claim"):
        publish(bundle_files("v2"), uri, "demo", "v2")
    assert not fs.exists("/aquakv-test-registry/demo/v2/manifest.json")


def test_unwritable_registry_chmod(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    reg.mkdir()
    reg.chmod(0o500)
    try:
        if os.access(reg, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions")
        with pytest.raises(RegistryNotWritableError, match="is not writable"):
            publish(bundle_files(), str(reg), "demo", "v1")
        assert list(reg.iterdir()) == []
    finally:
        reg.chmod(0o700)


def test_unwritable_registry_path(tmp_path: Path) -> None:
    """A registry below a regular file cannot be created, whatever the privileges."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RegistryNotWritableError, match="is not writable"):
        publish(bundle_files(), str(blocker / "registry"), "demo", "v1")
    assert blocker.read_text() == "not a directory"


def test_latest_is_the_highest_version_not_the_last_writer(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    for version in ("v2", "v1", "v10", "v9"):
        publish(bundle_files(version), str(reg), "demo", version)
    assert (reg / "demo" / "latest").read_text().strip() == "v10"
    publish(bundle_files("v1"), str(reg), "demo", "v1")  # idempotent re-publish of an old version
    assert (reg / "demo" / "latest").read_text().strip() == "v10"
    assert version_key("v1.0rc1") < version_key("v1") < version_key("v1.1") < version_key("v2")
    assert version_key("nightly") < version_key("v0")  # not PEP 440: ranks below every PEP 440 version


def _publish_at(reg: str, files: dict[str, bytes], name: str, version: str, barrier: threading.Barrier) -> None:
    barrier.wait()
    publish(files, reg, name, version)


def test_concurrent_v2_and_v3_leave_latest_v3(tmp_path: Path) -> None:
    for r in range(6):
        name, barrier = f"race{r}", threading.Barrier(2)
        order = ["v2", "v3"] if r % 2 else ["v3", "v2"]
        threads = [threading.Thread(target=_publish_at, args=(str(tmp_path), bundle_files(v, name=name), name, v,
                                                              barrier)) for v in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (tmp_path / name / "latest").read_text().strip() == "v3"
        assert _leftovers(tmp_path / name) == []


def test_unwritable_pointer_says_what_was_published(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    (reg / "demo" / "latest").mkdir(parents=True)  # something in the pointer's way
    (reg / "demo" / "latest" / "x").write_text("")
    with pytest.raises(LatestPointerError, match=r"published .*/demo/v1 \(complete and verified\).* still names no "
                                                  "version"):
        publish(bundle_files("v1"), str(reg), "demo", "v1")
    assert read_bundle_dir(reg / "demo" / "v1").manifest["version"] == "v1"
    assert _leftovers(reg / "demo") == []


def test_killed_publish_leftovers_are_swept(tmp_path: Path) -> None:
    base = tmp_path / "registry" / "demo"
    stale = base / ".tmp-0123456789abcdef"  # a publish killed by an older aquakv, long ago
    stale.mkdir(parents=True)
    (stale / "predictors.safetensors").write_bytes(b"partial")
    os.utime(stale, (time.time() - STALE_AFTER_S - 1,) * 2)
    publish(bundle_files("v1"), str(tmp_path / "registry"), "demo", "v1")
    assert _leftovers(base) == []


def test_object_store_latest_moves_only_forward() -> None:
    uri, fs = "memory://aquakv-test-latest", fsspec.filesystem("memory")
    if fs.exists("/aquakv-test-latest"):
        fs.rm("/aquakv-test-latest", recursive=True)
    publish(bundle_files("v3"), uri, "demo", "v3")
    publish(bundle_files("v2"), uri, "demo", "v2")
    assert fs.cat_file("/aquakv-test-latest/demo/latest").decode().strip() == "v3"
    assert load_bundle(f"{uri}/demo").manifest["version"] == "v3"
