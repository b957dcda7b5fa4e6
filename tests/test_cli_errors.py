"""Every expected failure of the CLI ends with one line ``error: <Kind>: <what to do>`` and exit code 2.

Input checks run the CLI's ``main`` in-process (they fail before anything starts); ``-v`` and a failure deep inside
the Prefect flow's Ray workers run it as a user does, in a subprocess, so a traceback wall on stderr would show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from aquakv_cli.main import main as cli
from pipeline.testing import write_tiny_llama

ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "HF_HUB_OFFLINE": "1"}


def aquakv(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aquakv_cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    text = "\n\n".join(f"Paragraph {i}: the fox number {i * 7} jumps over {i % 13} lazy dogs." * 3 for i in range(200))
    (root / "data.txt").write_text(text)
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    model = write_tiny_llama(root / "model", num_layers=3, max_positions=256)
    broken = write_tiny_llama(root / "broken", num_layers=3, max_positions=256)
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    (broken / sorted(set(index.values()))[-1]).unlink()
    nan = write_tiny_llama(root / "nan", num_layers=3, max_positions=256)
    name = "model.layers.1.self_attn.v_proj.weight"
    shard = nan / json.loads((nan / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    (root / "mla").mkdir()
    (root / "mla" / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "kv_lora_rank": 512}))
    (root / "bad.yaml").write_text(f"model: {model}\ndata: data.txt\nseq_len: 4\nbogus_field: 1\n")
    (root / "broken.yaml").write_text("model: [unclosed\n")
    (root / "rank.yaml").write_text(f"model: {model}\ndata: data.txt\npredictor_rank: {{keys: 16}}\n")
    (root / "readonly").mkdir()
    (root / "readonly" / "registry").write_text("a file where the registry directory should be")
    return {"root": root, "model": model, "broken": broken, "nan": nan}


def flags(inputs: dict[str, Path], **kw: str) -> list[str]:
    base = {"--model": str(inputs["model"]), "--data": "data.txt", "--samples": "4", "--seq-len": "256",
            "--out": str(inputs["root"] / "registry"), "--workdir": str(inputs["root"] / "work"), "--workers": "1"}
    base.update(kw)
    return ["calibrate", *[x for kv in base.items() for x in kv]]


CASES = {
    "invalid config": (["calibrate", "--config", "bad.yaml"],
                       "ConfigError: invalid config (bad.yaml): seq_len: Input should be greater than or equal to 8"),
    "half a rank": (["calibrate", "--config", "rank.yaml"],
                    "ConfigError: invalid config (rank.yaml): predictor_rank.per kind.values: Field required"),
    "unparsable yaml": (["calibrate", "--config", "broken.yaml"], "ConfigError: config broken.yaml is not valid YAML"),
    "missing data": ({"--data": "missing.txt"}, "CalibrationError: data file missing.txt does not exist"),
    "empty data": ({"--data": "empty.txt"}, "CalibrationError: data file empty.txt is empty"),
    "binary data": ({"--data": "binary.txt"}, "CalibrationError: data file binary.txt is not UTF-8 text"),
    "missing model": ({"--model": "no-such-model"}, "CalibrationError: model directory no-such-model does not exist"),
    "missing shard": ({"--model": "BROKEN"}, "CalibrationError: checkpoint "),
    "unsupported model": ({"--model": "mla"}, "UnsupportedModelError: model_type 'deepseek_v3' is not supported: "
                          "multi-head latent attention"),
    "sequence too long": ({"--seq-len": "512"}, "CalibrationError: seq_len 512 exceeds the model's "
                          "max_position_embeddings 256"),
    "unwritable registry": ({"--out": "readonly/registry"}, "RegistryNotWritableError: registry readonly/registry"),
    "missing bundle": (["inspect", "no-such-bundle"], "BundleNotFoundError: no-such-bundle"),
}


@pytest.mark.parametrize("case", CASES)
def test_expected_failures_print_one_line(inputs: dict[str, Path], case: str, monkeypatch, capsys) -> None:
    args, expected = CASES[case]
    if isinstance(args, dict):
        args = flags(inputs, **{k: str(inputs["broken"]) if v == "BROKEN" else v for k, v in args.items()})
    monkeypatch.chdir(inputs["root"])
    with pytest.raises(SystemExit) as exit_:
        cli(list(args))
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr  # checked before Prefect and Ray start: nothing else is printed
    assert lines[0].startswith(f"error: {expected}"), lines[0]
    assert "shard" not in case or "copy the complete checkpoint" in lines[0]


def test_verbose_shows_the_traceback(inputs: dict[str, Path]) -> None:
    done = aquakv("-v", *flags(inputs, **{"--data": "empty.txt"}), cwd=inputs["root"])
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: CalibrationError: data file empty.txt is empty")


@pytest.mark.slow
def test_nan_inside_the_flow_is_one_line_without_a_traceback_wall(inputs: dict[str, Path]) -> None:
    """A NaN weight is only found inside a Ray worker of the Prefect flow: still one error line, no traceback."""
    done = aquakv(*flags(inputs, **{"--model": str(inputs["nan"])}), cwd=inputs["root"])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr
    assert errors[0].startswith("error: NonFiniteError:") and "layer 1" in errors[0], errors[0]
