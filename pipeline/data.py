"""Calibration text -> ``tokens.zarr``: shuffled non-overlapping windows, calibration and held-out disjoint.

The store is keyed by content: it is reused only when both the config's ``collect_digest`` and the SHA-256 of the
data files (:func:`data_fingerprint`) match, so other text behind the same path is tokenized again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import zarr
from transformers import PreTrainedTokenizerBase

from aquakv.config import CalibrationConfig
from aquakv.errors import CalibrationError

TOKENS_STORE = "tokens.zarr"
SUFFIXES = (".txt", ".jsonl", ".parquet")
_BLANK_LINES = re.compile(r"\n\s*\n")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); pass a .txt/.jsonl file of "
                               "text or a .parquet file") from e


def _read_file(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".txt":
        return _BLANK_LINES.split(_read_text(path))
    if path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: not JSON Lines ({e.msg} at line {e.lineno})") from e
        if bad := [i for i, row in enumerate(rows) if not isinstance(row, dict)]:
            raise CalibrationError(f"{path}: line {bad[0] + 1} is not a JSON object")
        if missing := [i for i, row in enumerate(rows) if text_field not in row]:
            raise CalibrationError(f"{path}: line {missing[0] + 1} has no field {text_field!r}")
        return [row[text_field] for row in rows]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise CalibrationError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
        return table.column(text_field).to_pylist()
    raise CalibrationError(f"{path}: unsupported file type {path.suffix!r}, expected one of {SUFFIXES}")


def _load_hub(name: str, text_field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # the hub client raises many types; all mean "cannot get this dataset"
        raise CalibrationError(f"{name!r} is not a local path and cannot be loaded with datasets: {e}") from e
    if text_field not in ds.column_names:
        raise CalibrationError(f"dataset {name!r}: no column {text_field!r} (columns: {ds.column_names})")
    return ds[text_field]


def load_texts(source: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a local .txt (split on blank lines), .jsonl, .parquet, a directory of those, or a hub dataset.

    A hub name is tried only when ``source`` is not an existing path. Empty documents are dropped.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise CalibrationError(f"directory {path} holds no {'/'.join(SUFFIXES)} files")
        texts = [t for f in files for t in _read_file(f, text_field)]
    elif path.is_file():
        texts = _read_file(path, text_field)
    elif path.suffix in SUFFIXES or str(source).startswith(("/", ".", "~")):
        raise CalibrationError(f"data file {path} does not exist")
    else:
        texts = _load_hub(str(source), text_field)
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError(f"no text in {source}")
    return texts


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(source: str | Path) -> str:
    """What the texts of :func:`load_texts` depend on: the SHA-256 of every data file (with its name, for a
    directory); a hub dataset is named only (its revision is not pinned)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        blob = json.dumps([[str(f.relative_to(path)), file_sha256(f)] for f in files]).encode()
        return hashlib.sha256(blob).hexdigest()
    if path.is_file():
        return file_sha256(path)
    return f"hub:{source}"


def token_stream(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All documents tokenized (no special tokens) and concatenated, EOS after each: ``[N]`` int64."""
    if tokenizer.eos_token_id is None:
        raise CalibrationError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents")
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    return np.concatenate([np.asarray(doc + eos, dtype=np.int64) for doc in ids])


def split_windows(
    stream: np.ndarray, seq_len: int, num_samples: int, heldout: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``[N]`` into ``N // seq_len`` windows, shuffle with ``seed``; return disjoint ``calib``, ``heldout``."""
    n_windows = len(stream) // seq_len
    if n_windows < num_samples + heldout:
        raise CalibrationError(
            f"not enough tokens: {len(stream)} tokens make {n_windows} windows of {seq_len}, "
            f"but {num_samples} calibration + {heldout} held-out samples were requested"
        )
    windows = stream[: n_windows * seq_len].reshape(n_windows, seq_len)
    order = np.random.default_rng(seed).permutation(n_windows)
    return windows[order[:num_samples]], windows[order[num_samples : num_samples + heldout]]


def _existing_digests(store: Path) -> tuple[str | None, str | None]:
    try:
        attrs = zarr.open_group(store, mode="r").attrs
    except FileNotFoundError:  # also zarr.errors.NodeNotFoundError
        return None, None
    return attrs.get("collect_digest"), attrs.get("data_digest")


def build_tokens(
    cfg: CalibrationConfig,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    max_positions: int | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Write ``out/tokens.zarr`` (int32 ``calib [num_samples, seq_len]``, ``heldout [heldout_samples * seq_len / L,
    L]`` with ``L = cfg.heldout_window``: each held-out sample cut into windows of ``L``).

    ``max_positions`` and ``vocab_size`` are the model's; the call fails early when they do not fit.
    Reuses an existing store made for the same ``cfg.collect_digest()`` and the same data content
    (:func:`data_fingerprint`); writes atomically otherwise.
    """
    if max_positions is not None and cfg.seq_len > max_positions:
        raise CalibrationError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings {max_positions}")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise CalibrationError(
            f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but the model only {vocab_size}: "
            "the tokenizer does not match the model"
        )
    out = Path(out)
    store = out / TOKENS_STORE
    digest, data_digest = cfg.collect_digest(), data_fingerprint(cfg.data)
    if _existing_digests(store) == (digest, data_digest):
        return store

    stream = token_stream(load_texts(cfg.data, cfg.text_field), tokenizer)
    calib, heldout = split_windows(stream, cfg.seq_len, cfg.num_samples, cfg.heldout_samples, cfg.seed)
    heldout = heldout.reshape(-1, cfg.heldout_window)

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokens-", dir=out))
    try:
        group = zarr.open_group(tmp / TOKENS_STORE, mode="w")
        for name, data in (("calib", calib), ("heldout", heldout)):
            arr = group.create_array(name, shape=data.shape, dtype="int32", chunks=(1, data.shape[1]))
            arr[:] = data.astype(np.int32)
        group.attrs.update(
            {
                "collect_digest": digest,
                "data_digest": data_digest,
                "tokenizer": tokenizer.name_or_path,
                "tokenizer_vocab_size": len(tokenizer),
                "total_tokens": int(len(stream)),
                "windows": int(len(stream) // cfg.seq_len),
            }
        )
        if store.exists():
            shutil.rmtree(store)
        (tmp / TOKENS_STORE).rename(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return store
