"""Fetching bundles from any fsspec URI into a verified local cache, and resolving ``latest`` pointers.

Registry layout: ``REGISTRY/name/version/<bundle files>`` and ``REGISTRY/name/latest`` (a text file
holding a version). A URI may name a bundle directory, ``REGISTRY/name`` or ``REGISTRY/name/latest``.
Local cache: ``$AQUAKV_CACHE/bundles/<name>/<version>-<manifest sha256[:16]>``; a pull whose manifest
is already there (and verifies) is instant. Downloads land in a temp dir renamed into place after
verification, so a failed pull leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import fsspec
from tqdm.auto import tqdm

from aquakv.bundle import MANIFEST, Bundle, parse_manifest, read_bundle_dir, sha256, verify_file
from aquakv.errors import BundleError, BundleNotFoundError
from aquakv.grids import cache_dir

LATEST = "latest"


def _read(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, bundle directory path) for a bundle, ``name`` or ``name/latest`` URI."""
    try:
        fs, path = fsspec.core.url_to_fs(str(uri))
    except (ImportError, ValueError) as e:
        raise BundleNotFoundError(f"cannot open {uri}: {e} (install the fsspec backend for this scheme?)") from e
    path = path.rstrip("/")
    try:
        if path.endswith("/" + LATEST) and fs.isfile(path):
            path = path.rsplit("/", 1)[0] + "/" + _read(fs, path).decode().strip()
        elif not fs.exists(f"{path}/{MANIFEST}") and fs.exists(f"{path}/{LATEST}"):
            path = f"{path}/{_read(fs, f'{path}/{LATEST}').decode().strip()}"
        if not fs.exists(f"{path}/{MANIFEST}"):
            raise BundleNotFoundError(f"{uri}: no bundle there (no {MANIFEST}, no '{LATEST}' pointer)")
    except BundleError:
        raise
    except Exception as e:  # network errors of any fsspec backend
        raise BundleNotFoundError(f"cannot reach {uri}: {type(e).__name__}: {e}; check the URI and the network") from e
    return fs, path


def pull(uri: str | os.PathLike, to: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download and verify a bundle; return its local directory (a cached copy when already pulled)."""
    fs, path = resolve(str(uri))
    try:
        raw = _read(fs, f"{path}/{MANIFEST}")
    except Exception as e:
        raise BundleNotFoundError(f"cannot read {uri}/{MANIFEST}: {e}") from e
    manifest = parse_manifest(raw, str(uri))
    root = Path(to) if to is not None else cache_dir() / "bundles"
    dest = root / manifest["name"] / f"{manifest['version']}-{sha256(raw)[:16]}"
    if dest.is_dir():
        try:
            read_bundle_dir(dest)
            return dest
        except BundleError:
            shutil.rmtree(dest)  # a damaged cached copy is fetched again
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=dest.parent))
    try:
        total = sum(e["size"] for e in manifest["files"].values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"pull {manifest['name']}/{manifest['version']}",
                  disable=not progress) as bar:
            for name in manifest["files"]:
                try:
                    data = _read(fs, f"{path}/{name}")
                except Exception as e:
                    raise BundleNotFoundError(f"cannot download {uri}/{name}: {e}") from e
                verify_file(manifest, name, data, str(uri))
                (tmp / name).write_bytes(data)
                bar.update(len(data))
        (tmp / MANIFEST).write_bytes(raw)
        try:
            os.replace(tmp, dest)
        except OSError:  # a concurrent pull of the same version won: use its copy
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_bundle(uri: str | os.PathLike | Bundle) -> Bundle:
    """A verified :class:`Bundle` from a local directory or any URI (remote ones go through :func:`pull`)."""
    if isinstance(uri, Bundle):
        return uri
    local = Path(str(uri))
    if "://" not in str(uri) and (local / MANIFEST).is_file():
        return read_bundle_dir(local)
    return read_bundle_dir(pull(uri, progress=False))
