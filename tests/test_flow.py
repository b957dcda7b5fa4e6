"""End to end: the real calibrate flow (Prefect ephemeral API, local Ray) on a tiny sharded Llama checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from prefect.testing.utilities import prefect_test_harness
from transformers import AutoModelForCausalLM

import pipeline.chain
from aquakv.cache import AquaKVCache
from aquakv.compat import cache_kwargs
from aquakv.errors import CalibrationError
from aquakv.registry import load_bundle
from aquakv_cli.main import main as cli
from cluster.workers import collect_worker, connect, ray_map
from flows.calibrate import calibrate
from pipeline.collect import open_activations, read_activations
from pipeline.testing import write_tiny_llama
from pipeline.validate import validate

LAYERS = 4


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flow")
    model = write_tiny_llama(root / "model", num_layers=LAYERS, max_positions=256, init_std=0.2)  # sharp attention
    text = "\n\n".join(f"Paragraph {i}: the fox number {i * 7} jumps over {i % 13} lazy dogs by the river." * 3
                       for i in range(300))
    (root / "data.txt").write_text(text)
    return {"root": root, "model": str(model), "data": str(root / "data.txt")}


def config(assets: dict, run: str, **kw: object) -> dict:
    q = {"dim": 2, "size": 16, "group_size": 32}
    base = {"name": "tiny", "model": assets["model"], "data": assets["data"], "seq_len": 64, "num_samples": 6,
            "heldout_samples": 2, "keys": q, "values": q, "first_layer": {**q, "size": 256},
            "cache": {"recent_window": 16}, "max_ppl_increase": 0.5, "workers": 2,
            "registry": str(assets["root"] / run / "registry"), "workdir": str(assets["root"] / run / "work")}
    return {**base, **kw}


def bundle_bytes(uri: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(uri).iterdir())}


@pytest.fixture(scope="module")
def first_run(harness, assets) -> dict:
    return calibrate(config(assets, "a"))


def test_flow_publishes_a_bundle_that_generates(first_run, assets, capsys):
    bundle = load_bundle(Path(first_run["bundle"]).parent)  # through the `latest` pointer
    assert bundle.manifest["validation"]["ppl_exact"] == pytest.approx(first_run["ppl_exact"])
    assert first_run["ppl_increase"] < 0.5
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    cache = AquaKVCache.from_bundle(bundle, model)
    out = model.generate(torch.randint(3, 200, (2, 40)), **cache_kwargs(model, cache), max_new_tokens=30,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 70) and cache.layers[LAYERS - 1].compressed_len > 0
    # the flow validated on its Ray workers, streaming the checkpoint: the whole model in memory gives the same
    tokens = next((assets["root"] / "a" / "work").glob("activations-*/tokens.zarr"))
    heldout = torch.from_numpy(zarr.open_group(str(tokens), mode="r")["heldout"][:]).long()
    whole = validate(model, heldout, bundle)
    for key in ("ppl_exact", "ppl_aquakv", "cache_bits_per_value"):
        assert bundle.manifest["validation"][key] == pytest.approx(whole[key], rel=1e-5), key
    cli(["inspect", first_run["bundle"]])
    shown = capsys.readouterr().out
    assert "tiny/v1" in shown and "d=2 n=256" in shown and "ppl_exact" in shown
    assert "(llama)" in shown and "full+rope" in shown and " f16 " in shown  # the scales' dtype


def test_rerun_after_crash_resumes_and_publishes_identical_bytes(first_run, harness, assets, monkeypatch):
    real_save = pipeline.chain.save_codec
    saved: list[int] = []

    def crash_after_two(stem, codec, info):
        if len(saved) == 2:
            raise KeyboardInterrupt("simulated crash after two layers")
        real_save(stem, codec, info)
        saved.append(info["layer"])

    monkeypatch.setattr(pipeline.chain, "save_codec", crash_after_two)
    with pytest.raises(BaseException, match="simulated crash"):
        calibrate(config(assets, "b"))
    assert saved == [0, 1]
    assert not (assets["root"] / "b" / "registry").exists()

    monkeypatch.setattr(pipeline.chain, "save_codec", real_save)
    fitted: list[int] = []
    real_solve = pipeline.chain.solve_layer
    monkeypatch.setattr(pipeline.chain, "solve_layer",
                        lambda cfg, layer, *a, **k: fitted.append(layer) or real_solve(cfg, layer, *a, **k))
    resumed = calibrate(config(assets, "b"))
    assert fitted == [2, 3]  # layers 0 and 1 were loaded, not recomputed
    assert bundle_bytes(resumed["bundle"]) == bundle_bytes(first_run["bundle"])


def test_cli_refit_with_other_bits_reuses_activations(first_run, harness, assets, tmp_path):
    act = next((assets["root"] / "a" / "work").glob("activations-*/activations.zarr"))
    before = {p: p.stat().st_mtime_ns for p in act.rglob("*") if p.is_file()}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config(assets, "a")))
    cli(["calibrate", "--config", str(tmp_path / "a.yaml"), "--bits", "3", "--version", "v2"])
    assert {p: p.stat().st_mtime_ns for p in act.rglob("*") if p.is_file()} == before
    bundle = load_bundle(assets["root"] / "a" / "registry" / "tiny")
    assert bundle.manifest["version"] == "v2" and bundle.manifest["layers"][1]["keys"]["size"] == 64
    assert bundle.bits_per_value()["index"] > first_run["bits_per_value"]["index"]


def test_bit_budget_measures_the_sensitivity_on_a_worker_and_reuses_activations(first_run, harness, assets):
    act = next((assets["root"] / "a" / "work").glob("activations-*/activations.zarr"))
    before = {p: p.stat().st_mtime_ns for p in act.rglob("*") if p.is_file()}
    summary = calibrate(config(assets, "a", bit_budget=2.6, version="budget"))
    assert {p: p.stat().st_mtime_ns for p in act.rglob("*") if p.is_file()} == before  # nothing collected again
    assert summary["bits_per_value"]["total"] <= 2.6 + 1e-6
    saved = json.loads(next(act.parent.glob("fit-*/fit/budget.json")).read_text())
    sens = saved["sensitivity"]
    assert len(sens["keys"]) == len(sens["values"]) == LAYERS and min(sens["keys"] + sens["values"]) > 0
    layers = load_bundle(summary["bundle"]).manifest["layers"]
    assert len({(e["keys"]["size"], e["values"]["size"]) for e in layers[1:]}) > 1  # grids follow the allocation


def test_cli_eval_compares_methods(first_run, assets, tmp_path, capsys):
    out = tmp_path / "eval.json"
    cli(["eval", "--model", assets["model"], "--bundle", first_run["bundle"], "--text", assets["data"],
         "--window", "128", "--windows", "2", "--step", "16", "--methods", "exact,aquakv,no-predictors,kivi-2bit",
         "--json", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"exact", "aquakv", "no-predictors", "kivi-2bit"}
    assert rows["aquakv"]["held_bytes"] < rows["exact"]["held_bytes"] / 2
    assert abs(rows["aquakv"]["rel_increase"]) < 0.1
    assert "kivi-2bit" in capsys.readouterr().out


def test_cli_eval_reads_a_low_rank_bundle_stored_and_refuses_a_full_rank_one(first_run, harness, assets, tmp_path,
                                                                              capsys):
    low = calibrate(config(assets, "a", predictor_rank=8, version="r8"))  # D = 32: rank D/4; a refit of run "a"
    rows = {}
    for prediction in ("chained", "stored"):
        out = tmp_path / f"{prediction}.json"
        cli(["eval", "--model", assets["model"], "--bundle", low["bundle"], "--text", assets["data"], "--window", "128",
             "--windows", "2", "--step", "16", "--methods", "exact,aquakv", "--prediction", prediction,
             "--json", str(out)])
        rows[prediction] = {r["method"]: r for r in json.loads(out.read_text())["rows"]}["aquakv"]
    assert rows["stored"]["held_bytes"] > rows["chained"]["held_bytes"]  # each token's projections are held too
    assert abs(rows["stored"]["ppl"] / rows["chained"]["ppl"] - 1) < 0.02  # float8 projections, same predictors
    with pytest.raises(SystemExit) as e:
        cli(["eval", "--model", assets["model"], "--bundle", first_run["bundle"], "--text", assets["data"],
             "--window", "128", "--windows", "1", "--methods", "aquakv", "--prediction", "stored"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ConfigError: layer 1's key predictor: prediction='stored' needs low-rank"), err


def test_two_ray_workers_collect_the_same_activations_as_one(first_run, assets, tmp_path):
    tokens = str(next((assets["root"] / "a" / "work").glob("activations-*/tokens.zarr")))
    connect(None, 2)
    stores = []
    for shards in ([(0, 6)], [(0, 3), (3, 6)]):
        path = str(tmp_path / f"act{len(shards)}.zarr")
        open_activations(path, LAYERS, 6, 64, 32)
        n = len(shards)
        ray_map(collect_worker, [assets["model"]] * n, [tokens] * n, [a for a, _ in shards], [b for _, b in shards],
                [path] * n, ["float32"] * n)
        stores.append(zarr.open_group(path, mode="r"))
    for layer in range(LAYERS):
        for kind in ("keys", "values"):
            a, b = (read_activations(s, kind, layer) for s in stores)
            assert torch.equal(a, b)


@pytest.mark.parametrize("resident", [False, True])
def test_missing_shard_fails_clearly_and_publishes_nothing(harness, assets, tmp_path, resident):
    """The flow checks its inputs in the data stage, beside Ray's start (and, resident, the workers' start): the
    error is the input check's, the started workers are freed, nothing is published."""
    import ray

    broken = tmp_path / "model"
    broken.mkdir()
    src = Path(assets["model"])
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    for p in src.iterdir():
        if p.name != shards[-1]:
            (broken / p.name).write_bytes(p.read_bytes())
    with pytest.raises(CalibrationError, match=shards[-1]):
        calibrate(config(assets, "c", model=str(broken), resident=resident))
    assert not (assets["root"] / "c" / "registry").exists()
    deadline = time.monotonic() + 30  # the started workers were killed: their CPU slots come back
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


@pytest.fixture(scope="module")
def trained_model(assets) -> str:
    """The tiny checkpoint trained briefly on the flow's text: a random model's held-out perplexity can fall when its
    cache is degraded (it is confidently wrong), a model that predicts the text loses when its cache is degraded."""
    from transformers import AutoTokenizer

    path = assets["root"] / "trained"
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    ids = tokenizer(Path(assets["data"]).read_text(), return_tensors="pt").input_ids[0]
    rows = ids[: len(ids) // 64 * 64].view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        batch = rows[torch.randint(0, len(rows), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_missed_gate_publishes_nothing(first_run, harness, assets, trained_model):
    q1 = {"dim": 1, "size": 2, "group_size": 32}  # 1 bit per value: the trained model's perplexity must rise
    with pytest.raises(CalibrationError, match=r"validation gate missed.*\(\+[0-9.]+%\)"):
        calibrate(config(assets, "a", model=trained_model, keys=q1, values=q1, first_layer=q1,
                         max_ppl_increase=1e-6, version="v9"))
    assert not (assets["root"] / "a" / "registry" / "tiny" / "v9").exists()
    assert np.isfinite(first_run["ppl_aquakv"])


def test_resident_flow_without_activations_publishes_the_staged_bundle(first_run, harness, assets):
    """resident: true, write_activations: false: collect+fit on the workers, nothing written to activations.zarr,
    validation along the chain on the workers, and the same predictors, codes and perplexity as the staged run."""
    summary = calibrate(config(assets, "resident", resident=True, write_activations=False))
    assert not list((assets["root"] / "resident" / "work").glob("activations-*/activations.zarr"))
    assert set(summary["seconds"]) == {"ray", "data", "collect_fit", "validate", "publish"}
    staged = {p.name: p.read_bytes() for p in Path(first_run["bundle"]).glob("*.safetensors")}
    resident = {p.name: p.read_bytes() for p in Path(summary["bundle"]).glob("*.safetensors")}
    assert staged and resident == staged
    assert summary["ppl_aquakv"] == pytest.approx(first_run["ppl_aquakv"], rel=1e-6)


def test_resident_flow_with_more_workers_than_samples_starts_one_per_sample(first_run, harness, assets):
    """The workers start before the data exists: as many as there are shards (one per sample at most), not
    ``workers``."""
    summary = calibrate(config(assets, "few", resident=True, write_activations=False, num_samples=1, workers=2))
    workers = {k.split(".")[0] for k in summary["stage_seconds"]["collect_fit"] if k.startswith("worker")}
    assert workers == {"worker0"}
    assert Path(summary["bundle"]).is_dir()
