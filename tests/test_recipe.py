"""Recipes: validation, overrides, and a property-based fuzz that never produces a traceback."""

from __future__ import annotations

import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_compress import cli
from moe_compress.errors import UserError
from moe_compress.recipe import build_recipe, load_recipe_file, parse_overrides

BASE = {"model": "builtin:mixtral-8e", "method": "frequency", "experts": 6, "output": "out",
        "calibration": {"data": "builtin:demo", "n_samples": 8, "seq_len": 64}}


def test_valid_recipe_and_overrides():
    r = build_recipe(BASE, parse_overrides(["calibration.n_samples=32", "mode=sequential",
                                            "params.protect_super=false"]))
    assert r.calibration.n_samples == 32 and r.mode == "sequential" and r.params == {"protect_super": False}
    assert r.target_experts(8) == 6


def test_ratio_budget():
    data = {**BASE, "ratio": 0.5}
    data.pop("experts")
    assert build_recipe(data).target_experts(8) == 4


@pytest.mark.parametrize("change,pattern", [
    ({"methdo": "reap"}, "methdo: unknown key"),
    ({"calibration": {"n_sample": 3}}, "calibration.n_sample: unknown key"),
    ({"ratio": 0.5}, "exactly one budget"),
    ({"experts": 0}, "experts"),
    ({"mode": "fast"}, "mode"),
    ({"calibration": {"seq_len": 1}}, "seq_len"),
])
def test_invalid_recipes(change, pattern):
    with pytest.raises(UserError, match=pattern):
        build_recipe({**BASE, **change})


def test_bad_override_syntax():
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["experts"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_recipe_file(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe_file(tmp_path / "bad.yaml")


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(-2, 2, allow_nan=False),
                     st.text(max_size=12))
_keys = st.sampled_from(["model", "method", "experts", "ratio", "output", "mode", "device", "dtype", "seed",
                         "params", "calibration", "evaluation", "overwrite", "bogus", "n_samples", "data"])
_values = st.recursive(_scalars, lambda inner: st.dictionaries(_keys, inner, max_size=4) | st.lists(inner, max_size=3),
                       max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(_keys, _values, max_size=8))
def test_fuzzed_recipe_files_never_traceback(tmp_path, monkeypatch, capsys, doc):
    """Any YAML recipe gives either a dry-run plan or one error line with exit code 2 — never a traceback."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(sys, "argv", ["moe-compress", "compress", "--recipe", str(path), "--dry-run"])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err
    if code == 2:
        assert len([l for l in err.splitlines() if l.strip()]) == 1, err
