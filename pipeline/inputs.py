"""Check a calibration run's inputs before any work (no Ray, no model load): the CLI calls it before the flow starts,
the flow first thing in its data stage, while Ray and the workers start.

Every expected mistake — a missing model or shard, a sequence longer than the model allows, missing, empty or binary
data, an unwritable registry or work directory — fails here in a second with one :class:`AquaKVError` line, instead
of minutes later inside a Ray worker. The stages keep their own checks: this is the fast path, not the only one.
Names the project prepares itself (``smollm2``, ``kjv-calib``...) are checked by the stage that prepares them.
"""

from __future__ import annotations

import codecs
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

from aquakv.config import CalibrationConfig
from aquakv.errors import CalibrationError, RegistryNotWritableError
from aquakv.family import check_supported
from pipeline.checkpoint import weight_map
from pipeline.data import SUFFIXES
from pipeline.sources import TEXTS
from pipeline.validate import check_heldout_length

_SNIFF = 1 << 16  # bytes of a text file looked at for binary content


def check_model(model: str, seq_len: int) -> None:
    """A model directory with config.json and every safetensors shard; ``seq_len`` within its positions."""
    if model == "smollm2":
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CalibrationError(f"model directory {path} does not exist; pass a folder with config.json and "
                               "safetensors weights, or 'smollm2'")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CalibrationError(f"{path} is not a model directory (no config.json); pass a folder or 'smollm2'") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path / 'config.json'} is not valid JSON; re-export the model") from e
    if not isinstance(config, dict):
        raise CalibrationError(f"{path / 'config.json'} is not a JSON object; re-export the model")
    check_supported(SimpleNamespace(**config))
    weight_map(path)
    limit = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise CalibrationError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {limit}; "
                               f"use seq_len <= {limit}")


def _check_text_file(path: Path) -> None:
    if path.stat().st_size == 0:
        raise CalibrationError(f"data file {path} is empty")
    if path.suffix not in (".txt", ".jsonl"):
        return
    with path.open("rb") as f:
        head = f.read(_SNIFF)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise CalibrationError(f"data file {path} is not UTF-8 text (bad byte at offset {e.start}); pass a "
                               ".txt/.jsonl file of text or a .parquet file") from e
    if b"\0" in head:
        raise CalibrationError(f"data file {path} holds NUL bytes: it looks binary, not text")


def check_data(data: str) -> None:
    """A local data file or folder exists, is not empty and, for text formats, is text. Hub names pass."""
    if data in TEXTS:
        return
    path = Path(data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise CalibrationError(f"directory {path} holds no {'/'.join(SUFFIXES)} files")
        for f in files:
            _check_text_file(f)
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise CalibrationError(f"{path}: unsupported file type {path.suffix!r}, expected one of {SUFFIXES}")
        _check_text_file(path)
    elif path.suffix in SUFFIXES or data.startswith(("/", ".", "~")):
        raise CalibrationError(f"data file {path} does not exist")


def _check_writable(path: Path, error: type[Exception], what: str) -> None:
    """``path`` (or, if it does not exist yet, its nearest existing parent) is a directory this process can write;
    nothing is created, so a run that fails later leaves no empty registry behind."""
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise error(f"{what} {path} is not writable ({target} is not a directory); choose another location")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-check-"):
            pass
    except OSError as e:
        raise error(f"{what} {path} is not writable ({e.strerror or e}); choose another directory or fix its "
                    "permissions") from e


def check_inputs(cfg: CalibrationConfig) -> None:
    """All of the above for a run, plus writable local registry and work directory and held-out rows long enough
    to validate anything."""
    check_heldout_length(cfg.heldout_window, cfg.cache)
    check_model(cfg.model, cfg.seq_len)
    check_data(cfg.data)
    if "://" not in cfg.registry:
        _check_writable(Path(cfg.registry).expanduser(), RegistryNotWritableError, "registry")
    _check_writable(Path(cfg.workdir).expanduser(), CalibrationError, "work directory")
