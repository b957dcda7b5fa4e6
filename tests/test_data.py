"""pipeline.data: text loading and tokens.zarr windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from transformers import PreTrainedTokenizerBase

import pipeline.data as data
from aquakv.config import CalibrationConfig
from aquakv.errors import CalibrationError, ConfigError
from pipeline.data import build_tokens, load_texts, split_windows, token_stream
from pipeline.testing import tiny_tokenizer

WORDS = "the quick brown fox jumps over the lazy dog and keeps running through the field".split()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return tiny_tokenizer(320)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) for _ in range(40)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def cfg(data_path: Path, **kw: object) -> CalibrationConfig:
    return CalibrationConfig(model="tiny", data=str(data_path), **{"seq_len": 16, "num_samples": 8, **kw})


def test_load_txt_splits_on_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n  \n\nsecond doc\n\n\n")
    assert load_texts(tmp_path / "a.txt") == ["first doc\nstill first", "second doc"]


def test_load_jsonl_parquet_and_directory(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate("xy")) + "\n")
    pq.write_table(pa.table({"body": ["p1", "", "p2"]}), tmp_path / "c.parquet")
    assert load_texts(tmp_path / "b.jsonl", text_field="body") == ["x", "y"]
    assert load_texts(tmp_path / "c.parquet", text_field="body") == ["p1", "p2"]
    (tmp_path / "ignored.csv").write_text("not read")
    assert load_texts(tmp_path, text_field="body") == ["x", "y", "p1", "p2"]


def test_load_errors(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(CalibrationError, match="no field 'body'"):
        load_texts(tmp_path / "b.jsonl", text_field="body")
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CalibrationError, match="no text"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CalibrationError, match="holds no"):
        load_texts(tmp_path / "empty_dir")


def test_hub_name_goes_to_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["hub doc", " "]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_texts("someone/corpus") == ["hub doc"]
    assert calls == [("someone/corpus", "train")]
    with pytest.raises(CalibrationError, match="no column 'body'"):
        load_texts("someone/corpus", text_field="body")


def test_windows_are_shuffled_disjoint_and_cover_the_stream() -> None:
    stream = np.arange(100)
    calib, heldout = split_windows(stream, seq_len=10, num_samples=6, heldout=3, seed=1)
    assert calib.shape == (6, 10) and heldout.shape == (3, 10)
    starts = [int(w[0]) for w in np.concatenate([calib, heldout])]
    assert all(s % 10 == 0 for s in starts) and len(set(starts)) == 9
    assert starts != sorted(starts)
    assert np.array_equal(calib, split_windows(stream, 10, 6, 3, seed=1)[0])
    with pytest.raises(CalibrationError, match="10 windows"):
        split_windows(stream, 10, 8, 3, seed=0)


def test_token_stream_puts_eos_after_each_document(tokenizer: PreTrainedTokenizerBase) -> None:
    stream = token_stream(["a b", "c"], tokenizer)
    assert (stream == tokenizer.eos_token_id).sum() == 2 and stream[-1] == tokenizer.eos_token_id


def test_build_tokens_store(tmp_path: Path, corpus: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    config = cfg(corpus, heldout_samples=3, seed=5)
    store = build_tokens(config, tokenizer, tmp_path / "out", max_positions=256, vocab_size=320)
    assert store == tmp_path / "out" / "tokens.zarr"
    group = zarr.open_group(store, mode="r")
    calib, heldout = group["calib"][:], group["heldout"][:]
    assert calib.shape == (8, 16) and heldout.shape == (3, 16) and calib.dtype == np.int32
    stream = token_stream(load_texts(corpus), tokenizer)
    windows = {tuple(w) for w in stream[: len(stream) // 16 * 16].reshape(-1, 16)}
    rows = [tuple(r) for r in np.concatenate([calib, heldout])]
    assert set(rows) <= windows and len(set(rows)) == 11
    assert group.attrs["collect_digest"] == config.collect_digest()
    assert group.attrs["tokenizer_vocab_size"] == 320
    assert group.attrs["windows"] == len(stream) // 16


def test_heldout_windows_are_cut_from_the_heldout_samples(tmp_path: Path, corpus: Path,
                                                          tokenizer: PreTrainedTokenizerBase) -> None:
    """``heldout_seq_len`` keeps the held-out tokens and cuts each sample into shorter rows; calibration is as it was;
    the digests change with it and stay as before without it."""
    whole = zarr.open_group(build_tokens(cfg(corpus, heldout_samples=3, seed=5), tokenizer, tmp_path / "a"), mode="r")
    config = cfg(corpus, heldout_samples=3, seed=5, heldout_seq_len=8)
    cut = zarr.open_group(build_tokens(config, tokenizer, tmp_path / "b"), mode="r")
    assert cut["heldout"].shape == (6, 8)
    assert (cut["heldout"][:] == whole["heldout"][:].reshape(6, 8)).all()
    assert (cut["calib"][:] == whole["calib"][:]).all()
    assert config.collect_digest() != cfg(corpus, heldout_samples=3, seed=5).collect_digest()
    plain = CalibrationConfig(model="m", data="d", seq_len=64, num_samples=4, heldout_samples=2)
    assert (plain.collect_digest(), plain.fit_digest(), plain.digest()) == (
        "7c5e89fb6cb7ce8a", "f96cd38bebe1d398", "51c18946fea1189e")  # the digests before the field existed
    with pytest.raises(ConfigError, match="heldout_seq_len 12 must divide seq_len 16"):
        CalibrationConfig.validated({"model": "m", "data": "d", "seq_len": 16, "heldout_seq_len": 12})


def test_build_tokens_reuses_matching_store(
    tmp_path: Path, corpus: Path, tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = zarr.open_group(build_tokens(cfg(corpus), tokenizer, out), mode="r")["calib"][:]
    with monkeypatch.context() as m:
        m.setattr(data, "load_texts", lambda *a: pytest.fail("store should be reused"))
        build_tokens(cfg(corpus), tokenizer, out)
    reseeded = zarr.open_group(build_tokens(cfg(corpus, seed=7), tokenizer, out), mode="r")
    assert reseeded.attrs["collect_digest"] == cfg(corpus, seed=7).collect_digest()
    assert not np.array_equal(first, reseeded["calib"][:])
    assert [p.name for p in out.iterdir()] == ["tokens.zarr"]  # no temporary leftovers


def test_build_tokens_errors(tmp_path: Path, corpus: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(CalibrationError, match="windows of 16"):
        build_tokens(cfg(corpus, num_samples=10_000), tokenizer, tmp_path)
    with pytest.raises(CalibrationError, match="max_position_embeddings 8"):
        build_tokens(cfg(corpus), tokenizer, tmp_path, max_positions=8)
    with pytest.raises(CalibrationError, match="does not match the model"):
        build_tokens(cfg(corpus), tokenizer, tmp_path, vocab_size=100)
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(CalibrationError, match="no text"):
        build_tokens(cfg(tmp_path / "blank.txt"), tokenizer, tmp_path)
    assert not (tmp_path / "tokens.zarr").exists()
