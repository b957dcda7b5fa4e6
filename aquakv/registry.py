"""Fetching bundles from any fsspec URI into a verified local cache, and resolving ``latest`` pointers.

Registry layout: ``REGISTRY/name/version/<bundle files>`` and ``REGISTRY/name/latest`` (a text file
holding a version: the highest published one in :func:`version_key` order). A URI may name a bundle directory,
``REGISTRY/name`` or ``REGISTRY/name/latest``.
Local cache: ``$AQUAKV_CACHE/bundles/<name>/<version>-<manifest sha256[:16]>``; a pull whose manifest
is already there (and verifies) is instant; a cached copy that no longer verifies is evicted and fetched again.

A pull validates the manifest (:func:`aquakv.bundle.parse_manifest`, at most 1 MiB) before it writes anything,
then streams each file in 1 MiB chunks into a temp dir ``.pull-<host>-<pid>-<random>`` inside the cache with a
running SHA-256, stopping the moment a file exceeds its declared size: a download holds at most one 1 MiB chunk
(HTTP is streamed; other fsspec backends add one 1 MiB read block) whatever the server sends. The temp dir is
renamed into place after every file verified (and the tensors checked), so a failed pull leaves nothing behind;
leftovers of killed runs are removed by later runs (:func:`sweep_leftovers`). Local sources are read without
following links.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem
from packaging.version import InvalidVersion, Version
from tqdm.auto import tqdm

from aquakv.bundle import (
    CHUNK,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SAFE_NAME,
    Bundle,
    open_regular,
    parse_manifest,
    read_bundle_dir,
    read_capped,
    sha256,
)
from aquakv.errors import (
    BundleError,
    BundleIntegrityError,
    BundleLimitError,
    BundleNotFoundError,
    UnsafeBundlePathError,
)
from aquakv.grids import cache_dir

LATEST = "latest"
STALE_AFTER_S = 3600  # a temp dir untouched this long is a leftover, whoever made it
LEFTOVER_PREFIXES = (".pull-", ".tmp-", ".latest-")
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def version_key(version: str) -> tuple[int, Version | None, str]:
    """Order of versions for ``latest``: PEP 440 (``v1 < v2 < v10 < v10.1``, a leading ``v`` allowed), then the
    string; versions that are not PEP 440 rank below every version that is."""
    try:
        return 1, Version(version), version
    except InvalidVersion:
        return 0, None, version


def temp_name(prefix: str) -> str:
    """A temp-dir name that says which host and process own it: ``<prefix><host>-<pid>-<random>``."""
    return f"{prefix}{_HOST}-{os.getpid()}-{os.urandom(6).hex()}"


def _stale(path: Path, prefix: str, now: float) -> bool:
    try:
        if now - path.lstat().st_mtime > STALE_AFTER_S:
            return True
    except FileNotFoundError:
        return False
    host, _, rest = path.name[len(prefix):].partition("-")
    pid = rest.partition("-")[0]
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def sweep_leftovers(directory: str | Path, prefixes: tuple[str, ...] = LEFTOVER_PREFIXES) -> list[Path]:
    """Remove temp dirs/files of killed pulls and publishes in ``directory``: those of a process of this host that
    is gone, and any older than :data:`STALE_AFTER_S`. Returns what was removed."""
    removed, now = [], time.time()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for path in Path(directory).iterdir():
            prefix = next((p for p in prefixes if path.name.startswith(p)), None)
            if prefix is None or not _stale(path, prefix, now):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def _open(fs: fsspec.AbstractFileSystem, path: str, where: str) -> Iterator[BinaryIO]:
    """A source file: locally without following links; over HTTP as one streamed GET (``block_size=0``: no
    range requests, no read-ahead); elsewhere through fsspec with 1 MiB blocks."""
    if isinstance(fs, LocalFileSystem):
        with open_regular(path, where) as f:
            yield f
        return
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    with fs.open(path, "rb", block_size=0 if protocols & {"http", "https"} else CHUNK) as f:
        yield f


def _pointer(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> str:
    """The version a ``latest`` pointer names; it must be a plain name."""
    with _open(fs, path, uri) as f:
        version = read_capped(f, 256).decode(errors="replace").strip()
    if not SAFE_NAME.match(version) or version == LATEST:
        raise UnsafeBundlePathError(f"{uri}: the '{LATEST}' pointer holds {version[:80]!r}, not a version name; "
                                    "name a version explicitly or re-publish to repair the pointer")
    return version


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, bundle directory path) for a bundle, ``name`` or ``name/latest`` URI."""
    try:
        fs, path = fsspec.core.url_to_fs(str(uri))
    except (ImportError, ValueError) as e:
        raise BundleNotFoundError(f"cannot open {uri}: {e} (install the fsspec backend for this scheme?)") from e
    path = path.rstrip("/")
    try:
        if path.endswith("/" + LATEST) and fs.isfile(path):
            path = path.rsplit("/", 1)[0] + "/" + _pointer(fs, path, uri)
        elif not fs.exists(f"{path}/{MANIFEST}") and fs.exists(f"{path}/{LATEST}"):
            path = f"{path}/{_pointer(fs, f'{path}/{LATEST}', uri)}"
        if not fs.exists(f"{path}/{MANIFEST}"):
            raise BundleNotFoundError(f"{uri}: no bundle there (no {MANIFEST}, no '{LATEST}' pointer)")
    except BundleError:
        raise
    except Exception as e:  # network errors of any fsspec backend
        raise BundleNotFoundError(f"cannot reach {uri}: {type(e).__name__}: {e}; check the URI and the network") from e
    return fs, path


def _download(fs: fsspec.AbstractFileSystem, src: str, dst: Path, entry: dict, where: str, bar: tqdm) -> None:
    """Stream ``src`` into a new file ``dst`` with a running SHA-256, refusing as soon as it exceeds its size."""
    digest, n, size = hashlib.sha256(), 0, entry["size"]
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out, _open(fs, src, where) as f:
        while chunk := f.read(CHUNK):
            n += len(chunk)
            if n > size:
                raise BundleIntegrityError(
                    f"{where}/{dst.name} is larger than the {size} bytes the manifest declares (stopped after {n}); "
                    "the source is altered or hostile: do not use it")
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    if n != size:
        raise BundleIntegrityError(f"{where}/{dst.name} is {n} bytes, the manifest says {size} (truncated or altered); "
                                   "pull the bundle again")
    if digest.hexdigest() != entry["sha256"]:
        raise BundleIntegrityError(f"{where}/{dst.name} does not match its SHA-256 in the manifest (tampered or "
                                   "corrupt); pull the bundle again")


def _evict(dest: Path) -> None:
    if dest.is_symlink() or not dest.is_dir():
        dest.unlink(missing_ok=True)
    else:
        shutil.rmtree(dest, ignore_errors=True)


def pull(uri: str | os.PathLike, to: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download and verify a bundle; return its local directory (a cached copy when already pulled)."""
    fs, path = resolve(str(uri))
    try:
        with _open(fs, f"{path}/{MANIFEST}", str(uri)) as f:
            raw = read_capped(f, MAX_MANIFEST_BYTES)
    except BundleError:
        raise
    except Exception as e:
        raise BundleNotFoundError(f"cannot read {uri}/{MANIFEST}: {e}") from e
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleLimitError(f"{uri}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes; do not use this bundle")
    manifest = parse_manifest(raw, str(uri))  # the whole schema, before anything is written
    root = Path(to) if to is not None else cache_dir() / "bundles"
    dest = root / manifest["name"] / f"{manifest['version']}-{sha256(raw)[:16]}"
    if dest.is_dir() and not dest.is_symlink():
        with contextlib.suppress(BundleError):
            read_bundle_dir(dest)
            return dest
    _evict(dest)  # a damaged, no longer valid or foreign cached copy is fetched again
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(dest.parent)
    tmp = dest.parent / temp_name(".pull-")
    tmp.mkdir(mode=0o700)
    try:
        total = sum(e["size"] for e in manifest["files"].values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"pull {manifest['name']}/{manifest['version']}",
                  disable=not progress) as bar:
            for name, entry in manifest["files"].items():
                try:
                    _download(fs, f"{path}/{name}", tmp / name, entry, str(uri), bar)
                except BundleError:
                    raise
                except Exception as e:
                    raise BundleNotFoundError(f"cannot download {uri}/{name}: {type(e).__name__}: {e}") from e
                os.utime(tmp)  # a live pull is never mistaken for a leftover
        (tmp / MANIFEST).write_bytes(raw)
        read_bundle_dir(tmp)  # tensors parse and are finite before the copy is cached
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
    if "://" not in str(uri) and (local / MANIFEST).exists():
        return read_bundle_dir(local)
    return read_bundle_dir(pull(uri, progress=False))
