"""Publish an encoded bundle to a registry on any fsspec URI: versioned, atomic, idempotent, ``latest`` pointer.

Layout (read by :mod:`aquakv.registry`)::

    REGISTRY/name/version/{manifest.json, predictors.safetensors, grids.safetensors}
    REGISTRY/name/latest            text file holding the newest published version

Commit protocol:

- Local filesystem: the files are written to ``REGISTRY/name/.tmp-<uuid>/`` and the directory is renamed to
  ``version/``. ``rename(2)`` onto an existing non-empty directory fails, so of two concurrent publishes of one
  version exactly one wins; readers never see a partial version.
- Other filesystems (object stores have no atomic rename): the version is claimed by creating
  ``REGISTRY/name/.claims/version`` exclusively (``open(..., "xb")``: atomic on backends with conditional writes,
  e.g. memory, local, recent s3fs/gcsfs; best effort elsewhere), then the files are written into ``version/``,
  ``manifest.json`` last: a version without a manifest is not a bundle to :func:`aquakv.registry.resolve`.

A version that already exists is returned as is when its manifest is byte-identical (an idempotent rerun), and
refused with :class:`PublishConflictError` otherwise.

``latest`` names the highest complete version in :func:`aquakv.registry.version_key` order (PEP 440: ``v2 < v10``),
not the last writer: it is moved only after the version is complete and verified, and only forward (re-publishing
``v1`` after ``v2`` leaves it at ``v2``). Locally the move happens under an exclusive ``flock`` of
``REGISTRY/name/`` (temp file + rename), so concurrent ``v2`` and ``v3`` publishes leave ``latest = v3``; on object
stores it is a single object write after listing the versions (best effort under races). When the pointer cannot
be written, :class:`LatestPointerError` says which version was published and what ``latest`` still names.
Leftovers of killed local publishes (``.tmp-*``, ``.latest-*``) are removed by later publishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from aquakv.bundle import MANIFEST, SAFE_NAME, decode_bundle, parse_manifest, read_bundle_dir
from aquakv.errors import (
    BundleError,
    BundleFormatError,
    LatestPointerError,
    PublishConflictError,
    RegistryNotWritableError,
    UnsafeBundlePathError,
)
from aquakv.registry import LATEST, sweep_leftovers, temp_name, version_key

CLAIMS = ".claims"


def _read(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def _check_files(files: dict[str, bytes], name: str, version: str) -> bytes:
    """Validate names and the bundle itself (every checksum); return the manifest bytes."""
    for what, value in (("name", name), ("version", version)):
        if not SAFE_NAME.match(value) or value == LATEST:
            raise UnsafeBundlePathError(
                f"bundle {what} {value[:80]!r} is not a plain name: use one matching {SAFE_NAME.pattern}, "
                f"not {LATEST!r}")
    if MANIFEST not in files:
        raise BundleFormatError(f"no {MANIFEST} among the files to publish; build them with encode_bundle")
    decode_bundle(files, f"{name}/{version} (to publish)")
    manifest = parse_manifest(files[MANIFEST], name)
    if (manifest["name"], manifest["version"]) != (name, version):
        raise BundleFormatError(
            f"the manifest names the bundle {manifest['name']}/{manifest['version']} but it is published as "
            f"{name}/{version}; pass name= and version= to encode_bundle"
        )
    return files[MANIFEST]


def _existing(fs: fsspec.AbstractFileSystem, dest: str, manifest: bytes, where: str) -> bool:
    """True when ``dest`` already holds this exact bundle; :class:`PublishConflictError` when it holds another."""
    if not fs.exists(f"{dest}/{MANIFEST}"):
        return False
    if _read(fs, f"{dest}/{MANIFEST}") == manifest:
        return True
    raise PublishConflictError(
        f"{where} is already published with different contents; publish under a new version "
        "(bundle versions are immutable)"
    )


def _ordered(files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """Files with the manifest last, so a reader seeing a manifest sees a whole bundle."""
    return sorted(files.items(), key=lambda item: item[0] == MANIFEST)


def _commit_local(base: str, dest: str, files: dict[str, bytes], manifest: bytes, where: str) -> None:
    tmp = os.path.join(base, temp_name(".tmp-"))
    os.makedirs(tmp)
    try:
        for fname, data in _ordered(files):
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):
                raise
            if not _existing(LocalFileSystem(), dest, manifest, where):
                raise PublishConflictError(
                    f"{where} exists but holds no {MANIFEST} (a partial or foreign directory); remove it or "
                    "publish under a new version"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit_remote(fs: fsspec.AbstractFileSystem, base: str, dest: str, files: dict[str, bytes], manifest: bytes,
                   where: str) -> None:
    claim = f"{base}/{CLAIMS}/{dest.rsplit('/', 1)[1]}"
    fs.makedirs(f"{base}/{CLAIMS}", exist_ok=True)
    try:
        with fs.open(claim, "xb") as f:
            f.write(manifest)
    except FileExistsError:
        if _existing(fs, dest, manifest, where):
            return
        if _read(fs, claim) != manifest:
            raise PublishConflictError(
                f"{where} is being (or was, and crashed) published by another run with different contents "
                f"(claim {fs.unstrip_protocol(claim)}); publish under a new version, or delete the claim if no "
                "publish is running"
            ) from None
    for fname, data in _ordered(files):
        fs.pipe_file(f"{dest}/{fname}", data)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """An exclusive ``flock`` on a local directory, released on exit (and by the kernel if the process dies)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _current(fs: fsspec.AbstractFileSystem, base: str) -> str | None:
    try:
        return _read(fs, f"{base}/{LATEST}").decode(errors="replace").strip() or None
    except OSError:
        return None


def _highest(fs: fsspec.AbstractFileSystem, base: str, version: str) -> str:
    """The highest complete version under ``base`` (``version`` is complete)."""
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    higher = sorted((n for n in names if SAFE_NAME.match(n) and n != LATEST and version_key(n) > version_key(version)),
                    key=version_key, reverse=True)
    return next((n for n in higher if fs.exists(f"{base}/{n}/{MANIFEST}")), version)


def _set_latest(fs: fsspec.AbstractFileSystem, base: str, version: str) -> None:
    """Point ``latest`` at the highest complete version (it only moves forward)."""
    if not isinstance(fs, LocalFileSystem):
        target = _highest(fs, base, version)
        if _current(fs, base) != target:
            fs.pipe_file(f"{base}/{LATEST}", (target + "\n").encode())
        return
    with _locked(base):
        target = _highest(fs, base, version)
        if _current(fs, base) != target:
            tmp = os.path.join(base, temp_name(".latest-"))
            try:
                with open(tmp, "w") as f:
                    f.write(target + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(base, LATEST))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


def _verify(fs: fsspec.AbstractFileSystem, dest: str, where: str) -> None:
    if isinstance(fs, LocalFileSystem):
        read_bundle_dir(dest)
        return
    manifest = parse_manifest(_read(fs, f"{dest}/{MANIFEST}"), where)
    files = {MANIFEST: _read(fs, f"{dest}/{MANIFEST}")}
    files.update({fname: _read(fs, f"{dest}/{fname}") for fname in manifest["files"]})
    decode_bundle(files, where)


def publish(files: dict[str, bytes], registry_uri: str, name: str, version: str) -> str:
    """Publish ``files`` (from :func:`aquakv.bundle.encode_bundle`) as ``registry_uri/name/version``.

    Returns the version's URI (a plain path for a local registry), which :func:`aquakv.registry.pull` and
    :func:`aquakv.registry.load_bundle` accept, as they accept ``registry_uri/name`` (the ``latest`` version).
    Raises :class:`PublishConflictError` when that version exists with other contents (or another run is
    publishing it), :class:`RegistryNotWritableError` when the registry cannot be written.
    """
    manifest = _check_files(files, name, version)
    fs, root = fsspec.core.url_to_fs(str(registry_uri))
    local = isinstance(fs, LocalFileSystem)
    base, where = f"{root.rstrip('/')}/{name}", f"{registry_uri}/{name}/{version}"
    dest = f"{base}/{version}"
    try:
        if not _existing(fs, dest, manifest, where):
            fs.makedirs(base, exist_ok=True)
            if local:
                sweep_leftovers(base)
                _commit_local(base, dest, files, manifest, where)
            else:
                _commit_remote(fs, base, dest, files, manifest, where)
    except BundleError:
        raise
    except OSError as e:
        raise RegistryNotWritableError(
            f"registry {registry_uri} is not writable: {type(e).__name__}: {e}; check its permissions "
            "(or credentials) or publish to another registry"
        ) from e
    _verify(fs, dest, where)
    try:
        _set_latest(fs, base, version)
    except OSError as e:
        raise LatestPointerError(
            f"published {where} (complete and verified), but {registry_uri}/{name}/{LATEST} could not be moved to it "
            f"({type(e).__name__}: {e}); '{LATEST}' still names {_current(fs, base) or 'no version'}: load {where} "
            "directly, or rerun this publish (idempotent) once the registry is writable"
        ) from e
    return dest if local else fs.unstrip_protocol(dest)
