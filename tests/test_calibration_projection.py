"""``benchmarks/calibration.py``'s projection to 80 layers x 2M tokens: the driver's solve (it depends on D, not on the
token count) scales with layers only once a run records its median; a record without it scales it with the tokens."""

import argparse
import json

import pytest

from benchmarks.calibration import TARGET_LAYERS, TARGET_TOKENS, project, reproject

ARGS = argparse.Namespace(layers=8, samples=128, seq_len=8192)


def _record(**collect_fit: float) -> dict:
    return {"whole_flow_s": 80.0, "seconds": {"ray": 10.0, "data": 20.0, "collect_fit": 44.0, "validate": 0.4,
                                              "publish": 1.0},
            "stage_seconds": {"collect_fit": {"median_layer": 5.0, "solve": 0.8, **collect_fit},
                              "validate": {"along_chain": 1.0, "exact_median_layer": 0.1,
                                           "aquakv_median_layer": 0.15}}}


def test_the_solve_scales_with_layers_not_tokens_once_recorded():
    tokens = ARGS.samples * ARGS.seq_len
    without, solve = project(_record(), ARGS), 0.09
    with_solve = project(_record(median_solve=solve), ARGS)
    assert without - with_solve == pytest.approx(solve * TARGET_LAYERS * (TARGET_TOKENS / tokens - 1) / 60)


def test_reproject_prints_the_recorded_pairs(tmp_path, capsys):
    settings = vars(ARGS)
    path = tmp_path / "flows.json"
    path.write_text(json.dumps({"runs": [_record(), _record()], "settings": settings,
                                "key": {"runs": [_record(median_solve=0.09)] * 2, "settings": settings}}))
    reproject(path)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["key"] for x in lines] == ["(top level)", "key"]
    top, key = lines
    assert top["now"][2] == key["now"][2] == 1.0 and top["mean_solve"][0] < top["now"][0]  # the mean: an estimate
    assert key["mean_solve"] == key["now"]  # a recorded median is used as it is
