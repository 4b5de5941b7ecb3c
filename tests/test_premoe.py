"""PreMoe: the TCESS statistic against a literal loop over tokens and experts (the router's own input, logits
recomputed in fp64), the kept sets, the family of checkpoints `compress` writes (each reloads and equals the
original with its routers masked to that checkpoint's experts), `route` (the query pattern from the output
folder alone equals the original model's; on the bundled testbed it picks the domain a prompt's text came from),
bad input, and the bench rows."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from clitools import assert_user_error, run_cli
from conftest import ARCHS
from helpers import SENTENCES, capture_block_inputs, ids
from test_pruning import check_reduced_checkpoint, n_keep_for

from moe_compress.calibration.runner import run_layers
from moe_compress.methods.base import LayerContext, get_method
from moe_compress.models.registry import get_adapter
from moe_compress.models.surgery import keep_experts, pruned_copy
from moe_compress.models.tiny import tiny_model

FAST_CLI = ["mixtral", "deepseek_v3"]  # softmax top-k; sigmoid groups with a dense first layer


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """A jsonl file with two domains of different text (code lines, prose lines)."""
    code = [SENTENCES[2], "for i in range(10):\n    print(i)\n", "import os\nos.path.join(a, b)\n"]
    prose = [SENTENCES[0], SENTENCES[5], SENTENCES[4]]
    p = tmp_path_factory.mktemp("premoe") / "two.jsonl"
    with open(p, "w") as fh:
        for i in range(24):
            texts, domain = (code, "code") if i % 2 else (prose, "prose")
            fh.write(json.dumps({"text": " ".join(texts[i % 3:] + texts[:i % 3]) * 2, "domain": domain}) + "\n")
    return p


# ---------------------------------------------------------------------------------------------------------------
# the statistic and the kept sets against the formula
# ---------------------------------------------------------------------------------------------------------------

def router_inputs(model, x) -> dict[int, torch.Tensor]:
    """{MoE layer: [T, H]} the input each router received when the whole model ran on x (B-major tokens)."""
    seen = capture_block_inputs(model, x, lambda adapter, block: adapter.router(block))
    return {i: args[0].reshape(-1, args[0].shape[-1]) for i, args in seen.items()}


def literal_markers(z: list[float], score: str, k: int, min_prob: float, sigmoid: bool) -> list[float]:
    """One token's marker by the formula, in Python floats."""
    order = sorted(range(len(z)), key=lambda e: (-z[e], e))[:k]
    top = [z[e] for e in order]
    mx = max(top)
    p_top = [math.exp(v - mx) / sum(math.exp(u - mx) for u in top) for v in top]
    zmax = max(z)
    probs = [1 / (1 + math.exp(-v)) if sigmoid else math.exp(v - zmax) / sum(math.exp(u - zmax) for u in z)
             for v in z]
    out = [0.0] * len(z)
    for j, e in enumerate(order):
        if min_prob > 0 and p_top[j] < min_prob:
            continue
        out[e] = z[e] if score == "logit" else probs[e]
    return out


def literal_tcess(model, x, row_domains: list[int], score="prob", k=1, min_prob=0.0):
    """{layer: (sums [D, E], tokens [D])} by a loop over tokens and experts; logits = W h (+ b) in fp64."""
    adapter = get_adapter(model)
    rule = adapter.rule()
    sigmoid = rule.kind == "sigmoid_group"
    n_dom = max(row_domains) + 1
    out = {}
    for i, h in router_inputs(model, x).items():
        layer = adapter.layer(model, i)
        w = layer.router_weight.detach().double()
        b = None if layer.router_bias is None else layer.router_bias.detach().double()
        sums = [[0.0] * layer.n_experts for _ in range(n_dom)]
        tokens = [0.0] * n_dom
        for t in range(h.shape[0]):
            d = row_domains[t // x.shape[1]]
            z = (w @ h[t].double()).tolist()  # z_e = w_e . h_t (+ b_e), one dot product per expert
            if b is not None:
                z = [v + float(c) for v, c in zip(z, b)]
            for e, m in enumerate(literal_markers(z, score, k, min_prob, sigmoid)):
                sums[d][e] += m
            tokens[d] += 1
        out[i] = torch.tensor(sums, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64)
    return out


def runner_tcess(model, x, row_domains, **options) -> dict[int, dict]:
    stats = {}

    def on_layer(run):
        if run.observer is not None:
            stats[run.index] = run.observer.results()

    run_layers(model, get_adapter(model), x, on_layer=on_layer, stats=("tcess_prob_by_domain",),
               observer_options=options, domains=torch.tensor(row_domains))
    return stats


@pytest.mark.parametrize("arch", ARCHS)
def test_tcess_equals_the_formula(arch):
    """The default marker on every architecture; the raw logit, k = 2 and the min_prob filter on a softmax
    router, the sigmoid one and the one with a router bias."""
    model = tiny_model(arch)
    x = ids(3, 12)
    rows = [0, 1, 1]
    variants = [dict(score="prob", k=1, min_prob=0.0)]
    if arch in ("mixtral", "deepseek_v3", "gpt_oss"):
        variants += [dict(score="logit", k=2, min_prob=0.0), dict(score="prob", k=2, min_prob=0.4)]
    for v in variants:
        reference = literal_tcess(model, x, rows, **v)
        stats = runner_tcess(model, x, rows, tcess_k=v["k"], tcess_min_prob=v["min_prob"])
        key = f"tcess_{v['score']}_by_domain"
        assert set(stats) == set(reference)
        for i, (sums, tokens) in reference.items():
            torch.testing.assert_close(stats[i][key], sums, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats[i]["tokens_by_domain"], tokens)
            assert tokens.tolist() == [12.0, 24.0]
        if v["min_prob"] > 0:  # the filter dropped some selections: fewer markers than tokens x k
            marked = sum(int((stats[i][key] != 0).sum()) for i in stats)
            assert marked > 0


def test_padding_tokens_do_not_count():
    model = tiny_model("olmoe")
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    stats = {}
    run_layers(model, get_adapter(model), x, mask, stats=("tcess_prob_by_domain",), domains=torch.tensor([0, 1]),
               on_layer=lambda run: stats.setdefault(run.index, run.observer.results()) if run.observer else None)
    first = min(stats)
    assert stats[first]["tokens_by_domain"].tolist() == [12.0, 6.0]
    ref, _ = literal_tcess(model, x[1:, :6], [0])[first]  # first MoE layer: causal, unaffected by the padding
    torch.testing.assert_close(stats[first]["tcess_prob_by_domain"][1], ref[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_kept_sets_are_the_top_tcess_of_each_domain(arch):
    model = tiny_model(arch)
    x = ids(4, 12)
    rows = [0, 1, 0, 1]
    adapter = get_adapter(model)
    n_keep, n_group = n_keep_for(arch), adapter.rule().n_group
    method = get_method("premoe", score="prob")

    def top(scores):
        per = 8 // n_group
        kept = []
        for g in range(n_group):
            kept += sorted(range(g * per, (g + 1) * per), key=lambda e: (-float(scores[e]), e))[:n_keep // n_group]
        return sorted(kept)

    for i, (sums, tokens) in literal_tcess(model, x, rows).items():
        stats = {"tcess_prob_by_domain": sums.float(), "tokens_by_domain": tokens.float()}
        plan = method.plan(LayerContext(adapter.layer(model, i), n_keep, stats, domain_names=["a", "b"]))
        per_domain = sums / tokens[:, None]
        overall = sums.sum(0) / tokens.sum()
        assert plan.info["kept"] == top(overall)
        for d, name in enumerate(["a", "b"]):
            assert plan.info["domains"][name]["kept"] == top(per_domain[d])
            torch.testing.assert_close(torch.tensor(plan.info["domains"][name]["tcess"], dtype=torch.float64),
                                       per_domain[d], rtol=1e-6, atol=1e-9)
        assert [s[0][0] for s in plan.expert_set.sources] == plan.info["kept"]


def test_pruned_copy_leaves_the_original_and_equals_in_place_pruning():
    model = tiny_model("gpt_oss")
    x = ids(2, 10)
    with torch.no_grad():
        before = model(x).logits
    kept = {i: [0, 2, 5, 7] for i in get_adapter(model).moe_blocks(model)}
    copy_ = pruned_copy(get_adapter(model), model, kept)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
        in_place = tiny_model("gpt_oss")
        keep_experts(get_adapter(in_place), in_place, kept)
        assert torch.equal(copy_(x).logits, in_place(x).logits)
    assert get_adapter(copy_).n_experts() == 4 and get_adapter(model).n_experts() == 8


# ---------------------------------------------------------------------------------------------------------------
# compress: the family of checkpoints, and route from the output folder alone
# ---------------------------------------------------------------------------------------------------------------

def _safetensors_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


@pytest.mark.parametrize("arch", FAST_CLI + [pytest.param(a, marks=pytest.mark.slow) for a in ARCHS
                                             if a not in FAST_CLI])
def test_compress_writes_one_checkpoint_per_domain(monkeypatch, capsys, saved_models, two_domains, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from moe_compress.route import load_family

    n_keep = n_keep_for(arch)
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "compress", saved_models[arch], "--method", "premoe",
                                "--experts", n_keep, "--calib", two_domains, "--n-samples", 8, "--seq-len", 16,
                                "--out", out, "-q")
    assert code == 0, err
    assert "plus 2 domain checkpoints of the same size" in stdout and "3 checkpoints" in stdout
    manifest = json.loads((out / "compression.json").read_text())
    index = json.loads((out / "premoe.json").read_text())
    assert manifest["experts"] == {"original": 8, "kept": n_keep}
    c = manifest["companions"]
    assert c["count"] == 3 and set(c["checkpoints"]) == {"code", "prose"}
    assert c["bytes"]["total"] == _safetensors_bytes(out)  # every weight byte written, counted once
    assert c["bytes"]["main"] == manifest["export"]["bytes"]["written"]
    x = ids(2, 12, vocab=90, seed=7)
    kept_all = {int(i): info["kept"] for i, info in manifest["layers"].items()}
    check_reduced_checkpoint(saved_models[arch], out, kept_all, n_keep, x)
    assert index["checkpoints"] == {"all domains": ".", "code": "domains/code", "prose": "domains/prose"}
    for name in ("code", "prose"):
        folder = out / "domains" / name
        kept = {int(i): info["domains"][name]["kept"] for i, info in manifest["layers"].items()}
        assert {int(i): v["kept"] for i, v in index["domains"][name]["layers"].items()} == kept
        check_reduced_checkpoint(saved_models[arch], folder, kept, n_keep, x)
        own = json.loads((folder / "compression.json").read_text())
        assert own["companion"]["name"] == name and own["experts"]["kept"] == n_keep
        assert (folder / "tokenizer.json").is_file() and (folder / "README.md").is_file()
    # the query pattern from the output folder alone equals the original model's, by the formula
    family = load_family(out)
    reduced = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(saved_models[arch], dtype=torch.float32).eval()
    first = min(kept_all)
    assert family.chooser.layer == first == index["query"]["layer"]
    sums, tokens = literal_tcess(original, x[:1], [0], score="logit")[first]  # the default score
    got = family.chooser.query_patterns(reduced, x[:1])[0]
    torch.testing.assert_close(got, sums[0] / tokens[0], rtol=1e-5, atol=1e-7)
    name, dist = family.chooser.choose(reduced, x[:1])[0]
    assert dist[name] == min(dist.values()) and set(dist) == {"code", "prose"}
    patterns = {n: torch.tensor(index["domains"][n]["layers"][str(first)]["tcess"], dtype=torch.float64)
                for n in dist}
    for n, d in dist.items():
        assert d == pytest.approx(float(torch.linalg.vector_norm(got - patterns[n])), rel=1e-6)


def test_recipe_family_and_route_pick_the_domain_of_the_text(monkeypatch, capsys, tmp_path):
    """The testbed recipe (builtin:mixtral-8e, calibrated on builtin:demo's 6 domains), then route: the text of
    each domain's calibration documents is routed to that domain's checkpoint."""
    from pathlib import Path

    from moe_compress.calibration.data import read_documents
    from moe_compress.models.loading import load_model, load_tokenizer
    from moe_compress.route import load_family

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "pm"
    code, stdout, err = run_cli(monkeypatch, capsys, "compress", "--recipe", root / "recipes" / "testbed-premoe.yaml",
                                "--set", f"output={out}", "--set", "calibration.n_samples=24", "--set",
                                "calibration.seq_len=128", "-q")
    assert code == 0, err
    assert "7 checkpoints" in stdout
    family = load_family(out)
    model, tok = load_model(str(out), dtype=torch.float32), load_tokenizer(str(out))
    docs = read_documents("builtin:demo")
    domains = sorted({d.domain for d in docs})
    assert list(family.chooser.patterns) == domains
    for domain in domains:
        text = "\n\n".join(d.text for d in docs if d.domain == domain)[:2000]
        assert family.chooser.choose(model, tok(text, return_tensors="pt")["input_ids"])[0][0] == domain
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("\n\n".join(d.text for d in docs if d.domain == "math")[:2000])
    code, stdout, err = run_cli(monkeypatch, capsys, "route", out, "--prompt-file", prompt)
    assert code == 0, err
    assert stdout.splitlines()[0] == str(out / "domains" / "math")
    code, stdout, err = run_cli(monkeypatch, capsys, "route", out, "--prompt", "def main():\n    return 0\n", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["checkpoint"] == str(out / "domains" / result["domain"]) and len(result["distances"]) == 6
    assert list(result["distances"].values()) == sorted(result["distances"].values())


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,pattern", [
    (["--method", "premoe[select_k=0]"], "invalid parameter select_k"),
    (["--method", "premoe[select_k=9]"], "select_k=9 is more than the model's 8 experts"),
    (["--method", "premoe[score=max]"], "invalid parameter score"),
    (["--method", "premoe[min_prob=1.5]"], "invalid parameter min_prob"),
    (["--method", "premoe[route_tokens=0]"], "invalid parameter route_tokens"),
    (["--method", "premoe", "--mode", "sequential"], "drop --mode sequential"),
    (["--method", "premoe", "--stream"], "writes one checkpoint per calibration domain"),
    (["--method", "premoe", "--calib", "SINGLE"], "needs calibration data with at least 2 domains"),
])
def test_bad_compress_input_is_one_line(monkeypatch, capsys, saved_models, tmp_path, args, pattern):
    single = tmp_path / "single.txt"
    single.write_text(" ".join(SENTENCES) * 20)
    args = [str(single) if a == "SINGLE" else a for a in args]
    calib = [] if "--calib" in args else ["--calib", "builtin:demo"]
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], *args, "--experts", 4, *calib,
                           "--n-samples", 4, "--seq-len", 16, "--out", tmp_path / "out")
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bad_route_input_is_one_line(monkeypatch, capsys, saved_models, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "random",
                           "--experts", 4, "--out", tmp_path / "plain", "-q")
    assert code == 0, err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        ([tmp_path / "missing", "--prompt", "hi"], "does not exist"),
        ([empty, "--prompt", "hi"], "is a file"),
        ([saved_models["mixtral"], "--prompt", "hi"], "has no compression.json"),
        ([tmp_path / "plain", "--prompt", "hi"], "no domain checkpoints to choose from"),
        ([tmp_path / "plain"], "give the prompt once"),
        ([tmp_path / "plain", "--prompt", "a", "--prompt-file", empty], "give the prompt once"),
    ]
    for args, pattern in cases:
        code, _, err = run_cli(monkeypatch, capsys, "route", *args)
        assert_user_error(code, err, pattern)


def test_bad_prompts_for_a_premoe_output(monkeypatch, capsys, saved_models, two_domains, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["qwen3_moe"], "--method", "premoe",
                           "--experts", 4, "--calib", two_domains, "--n-samples", 4, "--seq-len", 16, "--out", out,
                           "-q")
    assert code == 0, err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    for args, pattern in [(["--prompt", ""], "the prompt is empty"), (["--prompt-file", empty], "the prompt is empty"),
                          (["--prompt-file", tmp_path / "nope.txt"], "no such file"),
                          (["--prompt-file", binary], "is not UTF-8 text")]:
        code, _, err = run_cli(monkeypatch, capsys, "route", out, *args)
        assert_user_error(code, err, pattern)
    (out / "domains" / "code" / "config.json").unlink()
    code, _, err = run_cli(monkeypatch, capsys, "route", out, "--prompt", "hi")
    assert_user_error(code, err, "checkpoint 'code'")


# ---------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------

def test_evaluate_assigned_with_one_model_is_evaluate_lm():
    from moe_compress.evaluation.metrics import evaluate_assigned, evaluate_lm

    model, reference = tiny_model("mixtral", seed=1), tiny_model("mixtral")
    windows = {"a": ids(3, 10), "b": ids(2, 10, seed=3)}
    plain = evaluate_lm(model, windows, reference=reference, batch_size=2).to_dict()
    one = evaluate_assigned(windows, {"x": {"a": ["m"] * 3, "b": ["m"] * 2}}, lambda name: model,
                            reference=reference, batch_size=2)["x"].to_dict()
    for key in ("ppl", "kld", "top1", "ppl_ratio"):
        assert one[key] == pytest.approx(plain[key], rel=1e-6)
        assert one["domains"]["b"][key] == pytest.approx(plain["domains"]["b"][key], rel=1e-6)


def test_bench_rows_routed_oracle_all_domain(monkeypatch, capsys, saved_models, two_domains, tmp_path):
    out = tmp_path / "b"
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", saved_models["mixtral"], "--methods",
                                "premoe[route_tokens=8]", "--experts", 4, "--calib", two_domains,
                                "--n-samples", 8, "--seq-len", 16, "--data", two_domains, "--eval-seq-len", 16,
                                "--max-windows", 2, "--batch-size", 2, "--device", "cpu", "--out", out, "--quiet")
    assert code == 0, err
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert list(rows) == ["premoe[route_tokens=8]", "premoe[route_tokens=8]:oracle",
                          "premoe[route_tokens=8]:all-domain"]
    routed = rows["premoe[route_tokens=8]"]
    assert routed["checkpoints"] == "3" and routed["route_tokens"] == "8"
    went = json.loads(routed["routed_to"])
    hits = sum(went[d].get(d, 0) for d in went)
    assert float(routed["route_accuracy"]) == pytest.approx(hits / 4, abs=1e-4)
    if hits == 4:  # every window on its own domain's checkpoint: routed is the oracle
        assert routed["kld"] == rows["premoe[route_tokens=8]:oracle"]["kld"]
    for r in rows.values():
        assert float(r["params_ratio"]) < 1 and r["experts"] == "4"
    assert "## Routed checkpoints" in (out / "results.md").read_text()


def test_bench_refuses_variants_that_need_different_statistics():
    """One statistics pass serves every variant: the score may differ (both are collected), k may not."""
    from moe_compress.benchmark import observer_options, parse_variants
    from moe_compress.errors import UserError

    def methods(spec):
        return [(v, get_method(v.name, **v.params)) for v in parse_variants(spec)]

    assert observer_options(methods("premoe,premoe[score=logit],reap")) == {"tcess_k": 1, "tcess_min_prob": 0.0}
    with pytest.raises(UserError, match=r"premoe and premoe\[select_k=2\] need different statistics"):
        observer_options(methods("premoe,premoe[select_k=2]"))
