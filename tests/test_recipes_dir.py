"""The example recipes in recipes/: each validates against the schema, each one's budget is valid for its model,
and the testbed ones plan (``--dry-run``) against builtin:mixtral-8e writing nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from clitools import run_cli_in

from moe_compress.methods.base import all_methods
from moe_compress.recipe import build_recipe, load_recipe_file

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TESTBED = [p for p in RECIPES if load_recipe_file(p)["model"].startswith("builtin:")]
HUB = [p for p in RECIPES if p not in TESTBED]

# The expert layout of each hub model a recipe names (from its config.json on the hub): enough for a dry run from
# a config alone, so the recipe's budget is checked against the real expert count, top-k and groups offline.
HUB_CONFIGS = {
    "mistralai/Mixtral-8x7B-v0.1": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    "Qwen/Qwen1.5-MoE-A2.7B": ("qwen2_moe", dict(num_experts=60, num_experts_per_tok=4)),
    "Qwen/Qwen3-30B-A3B": ("qwen3_moe", dict(num_experts=128, num_experts_per_tok=8)),
    "deepseek-ai/DeepSeek-V2-Lite": ("deepseek_v2", dict(n_routed_experts=64, num_experts_per_tok=6, n_group=1,
                                                         topk_group=1)),
    "allenai/OLMoE-1B-7B-0924": ("olmoe", dict(num_experts=64, num_experts_per_tok=8)),
}




def test_there_are_recipes_for_every_method_and_the_named_hub_models():
    assert len(RECIPES) >= 10
    methods = {load_recipe_file(p)["method"] for p in RECIPES}
    assert set(all_methods()) <= methods, f"no example recipe for {sorted(set(all_methods()) - methods)}"
    models = {load_recipe_file(p)["model"] for p in HUB}
    assert models == set(HUB_CONFIGS), models


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    data = load_recipe_file(path)
    recipe = build_recipe(data)  # UserError on an unknown key, a wrong type or two budgets
    cls = all_methods()[recipe.method]
    method = cls(**recipe.params)  # the method's own parameter schema
    if method.needs_data:  # the instance's: a method's parameters can make it read data (stun)
        assert recipe.calibration.data, f"{path.name}: method {recipe.method} needs calibration data"
    # the header says how to run it, naming this very file
    assert f"--recipe recipes/{path.name}" in path.read_text()
    assert Path(recipe.output).parts[0] == "out", "outputs of the examples go under out/"


@pytest.mark.parametrize("path", TESTBED, ids=lambda p: p.name)
def test_testbed_recipe_dry_run(monkeypatch, capsys, tmp_path, path):
    """From the repository root, as the recipe header says; nothing is written."""
    before = set(ROOT.iterdir())
    code, out, err = run_cli_in(monkeypatch, capsys, ROOT, "compress", "--recipe", path.relative_to(ROOT), "--dry-run")
    assert code == 0, err
    data = load_recipe_file(path)
    assert f"plan (dry run, nothing written): {data['model']} -> {data['output']}" in out
    from moe_compress.methods.base import method_class
    if method_class(data["method"]).keeps_experts:  # heapr: every expert kept, narrowed to N experts' parameters
        assert f"all 8 routed experts kept, each narrowed to about {data['experts']}/8" in out
    else:
        assert f"8 -> {data['experts']} routed experts each" in out
    assert "MoE layers  6 of 6" in out and "parameters" in out and "memory" in out and "time" in out
    assert set(ROOT.iterdir()) == before and not (ROOT / data["output"]).exists()


@pytest.mark.parametrize("path", HUB, ids=lambda p: p.name)
def test_hub_recipe_dry_run_on_its_config(monkeypatch, capsys, tmp_path, path):
    """The hub model's expert layout in a local config: the budget is valid and the plan is printed."""
    from moe_compress.models.tiny import tiny_config

    data = load_recipe_file(path)
    model_type, layout = HUB_CONFIGS[data["model"]]
    tiny_config(model_type, **layout).save_pretrained(tmp_path / "config")
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, "compress", "--recipe", path, "--set",
                             f"model={tmp_path / 'config'}", "--dry-run")
    assert code == 0, err
    n_orig = next(v for k, v in layout.items() if k != "num_experts_per_tok" and "expert" in k)
    assert f"{n_orig} -> {data['experts']} routed experts each" in out
    assert f"top-{layout['num_experts_per_tok']}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config"]


def test_a_testbed_recipe_runs_end_to_end(tmp_path):
    """The recipe header's command, for real (random needs no data): a checkpoint whose compression.json holds
    the same recipe again."""
    import json

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "moe_compress.cli", "compress", "--recipe",
                           "recipes/testbed-random.yaml", "--set", f"output={out}", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.match(rf"wrote {re.escape(str(out))}: random, 8 -> 4 experts per layer", proc.stdout)
    manifest = json.loads((out / "compression.json").read_text())
    again = yaml.safe_load((ROOT / "recipes/testbed-random.yaml").read_text())
    assert {k: manifest["recipe"][k] for k in ("model", "method", "experts")} == \
        {k: again[k] for k in ("model", "method", "experts")}


@pytest.mark.parametrize("path", TESTBED, ids=lambda p: p.name)
def test_testbed_recipe_reads_nothing_outside_a_clone(path):
    """A testbed recipe must run in a fresh clone with nothing beside it: its calibration data is bundled
    (builtin:) or a path inside the repository, and exists (what --dry-run checks)."""
    from moe_compress.calibration.data import check_spec, split_mixture

    spec = load_recipe_file(path)["calibration"]["data"]
    for part, _ in split_mixture(spec):
        assert part.startswith("builtin:") or (not part.startswith("hf:") and ".." not in Path(part).parts
                                               and (ROOT / part).exists()), part
    check_spec(spec)


@pytest.mark.parametrize("path", HUB, ids=lambda p: p.name)
def test_hub_recipe_states_its_offline_fallback(path):
    text = path.read_text()
    if "calibration" in load_recipe_file(path) and load_recipe_file(path)["calibration"]["data"].startswith("hf:"):
        assert "Offline:" in text and "--set calibration.data=" in text and "--set model=DIR" in text
