"""Hostile bundles and honest resumes (issue 11): every refusal is a specific AquaKVError, nothing is written
outside the cache, memory stays bounded, resume is keyed by content."""

from __future__ import annotations

import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import zarr
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from test_publish import bundle_files

from aquakv.bundle import GRIDS, MANIFEST, PREDICTORS, decode_bundle, read_bundle_dir, sha256, write_bundle
from aquakv.errors import (
    AquaKVError,
    BundleIntegrityError,
    BundleLimitError,
    ManifestSchemaError,
    NonFiniteBundleError,
    UnsafeBundlePathError,
)
from aquakv.registry import STALE_AFTER_S, load_bundle, pull, sweep_leftovers, temp_name
from aquakv_cli.main import main as cli
from pipeline.collect import open_activations


def rehash(files: dict[str, bytes], edit: Callable[[dict], None] | None = None, **data: bytes) -> dict[str, bytes]:
    """``files`` with some file bytes replaced (``predictors=``, ``grids=``), sizes and SHA-256 re-computed, then the
    manifest edited: what a careful attacker publishes."""
    files = dict(files)
    files.update({PREDICTORS: data.get("predictors", files[PREDICTORS]), GRIDS: data.get("grids", files[GRIDS])})
    m = json.loads(files[MANIFEST])
    for name in (PREDICTORS, GRIDS):
        m["files"][name] = {"sha256": sha256(files[name]), "size": len(files[name])}
    if edit:
        edit(m)
    files[MANIFEST] = json.dumps(m).encode()
    return files


def _poisoned(raw: bytes, key: str, value: float) -> bytes:
    tensors = load_safetensors(raw)
    tensors[key].view(-1)[0] = value
    return save_safetensors(tensors)


def _nested(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, last = path.split("/")
        for p in parents:
            m = m[int(p)] if isinstance(m, list) else m[p]
        m[last] = value
    return edit


def _drop(path: str) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, last = path.split("/")
        for p in parents:
            m = m[int(p)] if isinstance(m, list) else m[p]
        del m[int(last) if isinstance(m, list) else last]
    return edit


def _rename_file(new: str) -> Callable[[dict], None]:
    return lambda m: m["files"].__setitem__(new, m["files"].pop(GRIDS))


BASE = bundle_files("v1", name="tiny")
HOSTILE: dict[str, tuple[Callable[[], dict[str, bytes]], type[AquaKVError], str]] = {
    "traversal-name": (lambda: rehash(BASE, _rename_file("../../../../evil.sh")), UnsafeBundlePathError,
                       "not a plain file name"),
    "absolute-name": (lambda: rehash(BASE, _rename_file("/tmp/aquakv-evil.sh")), UnsafeBundlePathError,
                      "not a plain file name"),
    "unknown-file": (lambda: rehash(BASE, _rename_file("evil.sh")), ManifestSchemaError, "unknown file"),
    "bundle-name-escapes": (lambda: rehash(BASE, _set("name", "../../escape")), UnsafeBundlePathError,
                            "manifest name"),
    "absolute-version": (lambda: rehash(BASE, _set("version", "/abs/v1")), UnsafeBundlePathError, "manifest version"),
    "unknown-field": (lambda: rehash(BASE, _set("surprise", 1)), ManifestSchemaError, "surprise: Extra inputs"),
    "unknown-layer-field": (lambda: rehash(BASE, _set("layers/1/keys/bits", 9)), ManifestSchemaError,
                            "layers.1.keys.bits"),
    "missing-files": (lambda: rehash(BASE, _drop("files")), ManifestSchemaError, "field files: Field required"),
    "missing-model": (lambda: rehash(BASE, _drop("model")), ManifestSchemaError, "field model: Field required"),
    "missing-sha256": (lambda: rehash(BASE, _drop(f"files/{GRIDS}/sha256")), ManifestSchemaError, "sha256"),
    "missing-predictor": (lambda: rehash(BASE, _drop("layers/1/values/predictor")), ManifestSchemaError,
                          "layers.1.values.predictor: Field required"),
    "string-size": (lambda: rehash(BASE, _set(f"files/{GRIDS}/size", "2672")), ManifestSchemaError,
                    "valid integer"),
    "huge-size": (lambda: rehash(BASE, _set(f"files/{GRIDS}/size", 10**15)), ManifestSchemaError, "size"),
    "declared-size-beyond-tensors": (lambda: rehash(BASE, _set(f"files/{GRIDS}/size", 1 << 30)),
                                     ManifestSchemaError, "the tensors it lists fit in"),
    "sinks-1e12": (lambda: rehash(BASE, _set("cache/sinks", 10**12)), ManifestSchemaError, "cache.sinks"),
    "recent-window-0": (lambda: rehash(BASE, _set("cache/recent_window", 0)), ManifestSchemaError,
                        "cache.recent_window"),
    "missing-layer": (lambda: rehash(BASE, _drop("layers/1")), ManifestSchemaError,
                      "1 layer entries but its model fingerprint has 2 layers"),
    "grid-size-not-power-of-two": (lambda: rehash(BASE, _set("layers/1/keys/size", 15)), ManifestSchemaError,
                                   "power of two"),
    "predictor-at-layer-0": (lambda: rehash(BASE, _set("layers/0/keys/predictor", [32, 32])), ManifestSchemaError,
                             "none at layer 0"),
    "predictor-shape": (lambda: rehash(BASE, _set("layers/1/keys/predictor", [32, 33])), ManifestSchemaError,
                        r"needs \[32, 32\]"),
    "nan-probe": (lambda: rehash(BASE, _set("model/weight_probe", [math.nan] * 4)), ManifestSchemaError,
                  "finite number"),
    "nested-json": (lambda: rehash(BASE, _set("validation/deep", _nested(64))), BundleLimitError, "nests JSON"),
    "nan-weights-rehashed": (lambda: rehash(BASE, predictors=_poisoned(BASE[PREDICTORS], "layers.1.keys.weight",
                                                                       math.nan)), NonFiniteBundleError,
                             "layers.1.keys.weight"),
    "inf-grid-rehashed": (lambda: rehash(BASE, grids=_poisoned(BASE[GRIDS], "grid.layers.0.keys", math.inf)),
                          NonFiniteBundleError, "grid.layers.0.keys"),
    "huge-safetensors-header": (lambda: rehash(BASE, predictors=(1 << 40).to_bytes(8, "little") + b"{}"),
                                BundleLimitError, "safetensors header of 1099511627776 bytes"),
}


def _deep_manifest() -> dict[str, bytes]:
    files = dict(BASE)
    files[MANIFEST] = files[MANIFEST][:-1] + b', "deep": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    return files


def _huge_manifest() -> dict[str, bytes]:
    return rehash(BASE, _set("validation/pad", "x" * (2 << 20)))


HOSTILE["recursion-bomb"] = (_deep_manifest, BundleLimitError, "nests JSON")
HOSTILE["manifest-over-1mib"] = (_huge_manifest, BundleLimitError, "larger than 1048576 bytes")


def _tree(root: Path, skip: Path) -> set[Path]:
    return {p for p in root.rglob("*") if skip not in (p, *p.parents)}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bundle_is_refused_locally(case: str, tmp_path: Path) -> None:
    make, error, match = HOSTILE[case]
    files = make()
    with pytest.raises(error, match=match):
        decode_bundle(files, "hostile")
    where = tmp_path / "reg" / "tiny" / "v1"
    where.mkdir(parents=True)
    for name in (MANIFEST, PREDICTORS, GRIDS):
        (where / name).write_bytes(files[name])
    with pytest.raises(error, match=match):
        read_bundle_dir(where)
    with pytest.raises(error, match=match):
        pull(str(where), to=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_every_message_is_one_line() -> None:
    for make, error, _ in HOSTILE.values():
        with pytest.raises(error) as info:
            decode_bundle(make(), "hostile")
        assert "\n" not in str(info.value) and len(str(info.value)) < 400


class Server(http.server.SimpleHTTPRequestHandler):
    """Serves ``root``; paths in ``endless`` stream zeros forever (no Content-Length); counts what it sent."""

    root = "."
    endless: set[str] = set()
    sent = {"bytes": 0}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, directory=self.root, **kwargs)

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        if self.path in self.endless:
            self.send_response(200)
            self.end_headers()
            return
        super().do_HEAD()

    def do_GET(self) -> None:  # noqa: N802
        if self.path not in self.endless:
            super().do_GET()
            return
        self.send_response(200)
        self.end_headers()
        chunk = bytes(1 << 16)
        try:
            while True:
                self.wfile.write(chunk)
                self.sent["bytes"] += len(chunk)
        except OSError:
            return


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, type[Server], Path]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = type("Handler", (Server,), {"root": str(root), "endless": set(), "sent": {"bytes": 0}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler, root
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("case", ["traversal-name", "absolute-name", "bundle-name-escapes", "absolute-version",
                                  "sinks-1e12", "missing-layer", "nan-weights-rehashed", "huge-safetensors-header",
                                  "recursion-bomb", "string-size"])
def test_hostile_pull_over_http_writes_nothing_outside_the_cache(case: str, server, tmp_path: Path) -> None:
    url, _, root = server
    make, error, match = HOSTILE[case]
    write_bundle(root / "tiny" / "v1", make())
    before = _tree(tmp_path, tmp_path / "cache")
    with pytest.raises(error, match=match):
        pull(f"{url}/tiny/v1", to=tmp_path / "cache", progress=False)
    assert _tree(tmp_path, tmp_path / "cache") == before
    assert not Path("/tmp/aquakv-evil.sh").exists()
    leftovers = [p for p in (tmp_path / "cache").rglob("*")] if (tmp_path / "cache").exists() else []
    assert all(p.is_dir() for p in leftovers) and not [p for p in leftovers if p.name.startswith(".pull-")]


def test_endless_body_is_cut_at_the_declared_size(server, tmp_path: Path) -> None:
    url, handler, root = server
    write_bundle(root / "tiny" / "v1", BASE)
    handler.endless.add(f"/tiny/v1/{PREDICTORS}")
    t = time.perf_counter()
    with pytest.raises(BundleIntegrityError, match=f"larger than the {len(BASE[PREDICTORS])} bytes"):
        pull(f"{url}/tiny/v1", to=tmp_path / "cache", progress=False)
    assert time.perf_counter() - t < 10
    time.sleep(0.2)
    assert handler.sent["bytes"] < 64 << 20  # the client stopped reading: only socket buffers were filled


def test_endless_manifest_is_cut_at_1_mib(server, tmp_path: Path) -> None:
    url, handler, root = server
    write_bundle(root / "tiny" / "v1", BASE)
    handler.endless.add(f"/tiny/v1/{MANIFEST}")
    with pytest.raises(BundleLimitError, match="larger than 1048576 bytes"):
        pull(f"{url}/tiny/v1", to=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


def test_file_larger_than_declared_is_refused_early(server, tmp_path: Path) -> None:
    url, handler, root = server
    write_bundle(root / "tiny" / "v1", BASE)
    big = root / "tiny" / "v1" / GRIDS
    with big.open("ab") as f:
        f.truncate(64 << 20)  # a 64 MiB file where the manifest declares a few KiB
    with pytest.raises(BundleIntegrityError, match="larger than"):
        pull(f"{url}/tiny/v1", to=tmp_path / "cache", progress=False)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_symlinks_out_of_a_bundle_are_never_followed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    where = write_bundle(tmp_path / "reg" / "tiny" / "v1", BASE)
    (where / GRIDS).unlink()
    (where / GRIDS).symlink_to("/dev/zero")
    for load in (read_bundle_dir, load_bundle, lambda p: pull(p, to=tmp_path / "cache", progress=False)):
        with pytest.raises(UnsafeBundlePathError, match="symbolic link"):
            load(str(where))
    with pytest.raises(SystemExit) as exit_info:
        cli(["inspect", str(where)])
    assert exit_info.value.code == 2 and "UnsafeBundlePathError" in capsys.readouterr().err
    # a link to a file with exactly the right bytes outside the bundle is refused too; so is a linked manifest
    outside = tmp_path / "outside"
    write_bundle(outside, BASE)
    (where / GRIDS).unlink()
    (where / GRIDS).symlink_to(outside / GRIDS)
    with pytest.raises(UnsafeBundlePathError):
        read_bundle_dir(where)
    (where / GRIDS).unlink()
    (where / GRIDS).write_bytes(BASE[GRIDS])
    (where / MANIFEST).unlink()
    (where / MANIFEST).symlink_to(outside / MANIFEST)
    with pytest.raises(UnsafeBundlePathError):
        load_bundle(str(where))


def test_fifo_in_a_bundle_does_not_block(tmp_path: Path) -> None:
    where = write_bundle(tmp_path / "b", BASE)
    (where / PREDICTORS).unlink()
    os.mkfifo(where / PREDICTORS)
    with pytest.raises(UnsafeBundlePathError, match="not a regular file"):
        read_bundle_dir(where)


def test_latest_pointer_must_name_a_version(tmp_path: Path) -> None:
    write_bundle(tmp_path / "reg" / "tiny" / "v1", BASE)
    (tmp_path / "reg" / "tiny" / "latest").write_text("../../../etc\n")
    with pytest.raises(UnsafeBundlePathError, match="not a version name"):
        load_bundle(str(tmp_path / "reg" / "tiny"))


def test_invalid_cached_copy_is_evicted_and_fetched_again(server, tmp_path: Path) -> None:
    url, _, root = server
    write_bundle(root / "tiny" / "v1", BASE)
    first = pull(f"{url}/tiny/v1", to=tmp_path / "cache", progress=False)
    (first / PREDICTORS).write_bytes(_poisoned(BASE[PREDICTORS], "layers.1.keys.weight", math.nan))
    assert pull(f"{url}/tiny/v1", to=tmp_path / "cache", progress=False) == first
    assert (first / PREDICTORS).read_bytes() == BASE[PREDICTORS]
    shutil.rmtree(first)
    first.symlink_to(tmp_path)  # a planted link where the cached copy goes
    assert pull(f"{url}/tiny/v1", to=tmp_path / "cache", progress=False) == first
    assert not first.is_symlink() and read_bundle_dir(first).manifest["name"] == "tiny"


def test_stale_leftovers_are_swept(server, tmp_path: Path) -> None:
    url, _, root = server
    write_bundle(root / "tiny" / "v1", BASE)
    cache = tmp_path / "cache" / "tiny"
    cache.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ours = cache / temp_name(".pull-")  # a live pull of this process: kept
    mine_dead = cache / temp_name(".pull-").replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-")
    old = cache / ".pull-otherhost-1-abc"
    for d in (ours, mine_dead, old):
        d.mkdir()
        (d / "partial").write_bytes(b"x" * 100)
    os.utime(old, (time.time() - STALE_AFTER_S - 60,) * 2)
    fresh_foreign = cache / ".pull-otherhost-2-def"
    fresh_foreign.mkdir()
    pull(f"{url}/tiny/v1", to=tmp_path / "cache", progress=False)
    assert ours.exists() and fresh_foreign.exists() and not mine_dead.exists() and not old.exists()
    assert sweep_leftovers(cache) == []


def _open_store(path: Path, barrier: threading.Barrier, failures: list[Exception]) -> None:
    barrier.wait()
    try:
        open_activations(path, 4, 6, 16, 32)
    except Exception as e:  # noqa: BLE001 - any exception is the failure under test
        failures.append(e)


def test_concurrent_collectors_open_a_fresh_store(tmp_path: Path) -> None:
    for trial in range(8):
        path, barrier, failures = tmp_path / f"t{trial}" / "activations.zarr", threading.Barrier(3), []
        threads = [threading.Thread(target=_open_store, args=(path, barrier, failures)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        group = zarr.open_group(path, mode="r")
        assert group.attrs["num_layers"] == 4 and group["keys/3"].shape == (6, 16, 32)
        assert [p.name for p in path.parent.iterdir()] == ["activations.zarr"]


def test_resume_is_keyed_by_model_and_data_content(tmp_path: Path) -> None:
    """Calibrate model A at DIR, replace DIR with model B of the same shapes: the same workdir re-collects and the
    bundle holds B's predictors (the stages of flows.calibrate, without Prefect and Ray)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aquakv.bundle import encode_bundle, fingerprint_of
    from aquakv.cache import AquaKVCache
    from aquakv.config import CalibrationConfig
    from flows.calibrate import _paths
    from pipeline.checkpoint import Checkpoint
    from pipeline.collect import collect_shard, layer_complete
    from pipeline.data import build_tokens
    from pipeline.fit import fit_all
    from pipeline.testing import write_tiny_llama

    model_dir, data = tmp_path / "DIR", tmp_path / "data.txt"
    data.write_text("\n\n".join(f"Line {i}: the fox {i * 7} jumps over {i % 13} dogs." * 3 for i in range(120)))
    q = {"dim": 2, "size": 16, "group_size": 32}

    def calibrate(workdir: Path) -> tuple[dict, list]:
        cfg = CalibrationConfig(model=str(model_dir), data=str(data), seq_len=32, num_samples=4, heldout_samples=1,
                                keys=q, values=q, first_layer=q, workdir=str(workdir))
        paths = _paths(cfg)
        ckpt = Checkpoint(model_dir)
        tokens = build_tokens(cfg, AutoTokenizer.from_pretrained(model_dir), paths["base"])
        group = open_activations(paths["activations"], ckpt.num_layers, cfg.num_samples, cfg.seq_len, ckpt.kv_dim)
        if not all(layer_complete(group, layer) for layer in range(ckpt.num_layers)):
            collect_shard(ckpt, zarr.open_group(tokens, mode="r")["calib"][:], 0, paths["activations"],
                          progress=False)
        fits = fit_all(paths["activations"], paths["fit"], cfg, progress=False)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        bundle = decode_bundle(encode_bundle([f.codec for f in fits], cfg.cache, fingerprint_of(model)))
        AquaKVCache.from_bundle(bundle, model)  # the fingerprint and the predictors come from the same model
        return bundle.manifest, [f.codec.value_predictor for f in fits[1:]]

    write_tiny_llama(model_dir, num_layers=2, seed=0)
    _, preds_a = calibrate(tmp_path / "work")
    shutil.rmtree(model_dir)
    write_tiny_llama(model_dir, num_layers=2, seed=1)  # model B: same shapes, other weights, same path
    _, preds_b = calibrate(tmp_path / "work")
    _, preds_fresh = calibrate(tmp_path / "fresh")
    assert len(list((tmp_path / "work").glob("activations-*"))) == 2
    for a, b, fresh in zip(preds_a, preds_b, preds_fresh, strict=True):
        assert torch.equal(b.weight, fresh.weight) and not torch.equal(a.weight, b.weight)
    data.write_text(data.read_text().replace("fox", "cat"))  # other data behind the same path
    calibrate(tmp_path / "work")
    assert len(list((tmp_path / "work").glob("activations-*"))) == 3
