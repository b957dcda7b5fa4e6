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
refused with :class:`PublishConflictError` otherwise. ``latest`` is replaced atomically (temp file + rename
locally, a single object write elsewhere) after every successful publish.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from aquakv.bundle import MANIFEST, decode_bundle, parse_manifest
from aquakv.errors import BundleError, BundleFormatError, PublishConflictError, RegistryNotWritableError
from aquakv.registry import LATEST

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
CLAIMS = ".claims"


def _read(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def _check_files(files: dict[str, bytes], name: str, version: str) -> bytes:
    """Validate names and the bundle itself (every checksum); return the manifest bytes."""
    for what, value in (("name", name), ("version", version)):
        if not _NAME.match(value) or value == LATEST:
            raise ValueError(f"bundle {what} {value!r} must match {_NAME.pattern} and not be {LATEST!r}")
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
    tmp = os.path.join(base, f".tmp-{uuid.uuid4().hex}")
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


def _set_latest(fs: fsspec.AbstractFileSystem, base: str, version: str) -> None:
    if isinstance(fs, LocalFileSystem):
        tmp = os.path.join(base, f".latest-{uuid.uuid4().hex}")
        with open(tmp, "w") as f:
            f.write(version + "\n")
        os.replace(tmp, os.path.join(base, LATEST))
    else:
        fs.pipe_file(f"{base}/{LATEST}", (version + "\n").encode())


def _verify(fs: fsspec.AbstractFileSystem, dest: str, where: str) -> None:
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
                _commit_local(base, dest, files, manifest, where)
            else:
                _commit_remote(fs, base, dest, files, manifest, where)
        _set_latest(fs, base, version)
    except BundleError:
        raise
    except OSError as e:
        raise RegistryNotWritableError(
            f"registry {registry_uri} is not writable: {type(e).__name__}: {e}; check its permissions "
            "(or credentials) or publish to another registry"
        ) from e
    _verify(fs, dest, where)
    return dest if local else fs.unstrip_protocol(dest)
