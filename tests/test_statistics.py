"""Expert statistics: every statistic equals a brute-force computation on every architecture; the layer runner
reproduces the full model; caching; lazy (bounded-memory) loading; the analyze command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clitools import assert_user_error, run_cli
from conftest import ARCHS

from moe_compress.calibration.observers import ROUTED_STATS
from moe_compress.calibration.runner import run_layers
from moe_compress.models.registry import get_adapter
from moe_compress.models.tiny import tiny_model

ALL_STATS = ROUTED_STATS + ("output_similarity", "expert_output_mean", "router_similarity", "input_moment",
                            "input_moment_all", "frequency_by_domain")
REPO = Path(__file__).resolve().parents[1]


def calib_batch(n=6, length=24, vocab=96, seed=3, padded=True):
    """[n, length] ids and a right-padding mask with rows of different lengths (per-document batches)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    if padded:
        for r, keep in enumerate([length, length - 5, length - 11, length, 7, length - 2][:n]):
            mask[r, keep:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


# -- the brute-force reference --------------------------------------------------------------------------------

def full_forward_capture(model, ids, mask, batch_size):
    """Run the full model batch by batch with hooks. Returns ({layer: (X [T,H], idx [T,k], w [T,k], logits
    [T,E])}, last decoder layer outputs per batch); T counts every position (padding included), in batch order."""
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    got = {i: {"x": [], "idx": [], "w": [], "logits": []} for i in blocks}
    hooks = []
    for i, block in blocks.items():
        def ex_hook(mod, args, kwargs, out, i=i):
            vals = list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights") if k in kwargs]
            got[i]["x"].append(vals[0].detach().clone())
            got[i]["idx"].append(vals[1].detach().clone())
            got[i]["w"].append(vals[2].detach().float().clone())

        def router_hook(mod, args, out, i=i):
            got[i]["logits"].append(out[0].detach().float().reshape(-1, out[0].shape[-1]).clone())

        hooks.append(block.experts.register_forward_hook(ex_hook, with_kwargs=True))
        hooks.append(adapter.router(block).register_forward_hook(router_hook))
    finals = []
    last = adapter.decoder_layers(model)[-1]
    hooks.append(last.register_forward_hook(
        lambda m, a, out: finals.append((out[0] if isinstance(out, tuple) else out).detach().clone())))
    try:
        with torch.no_grad():
            for s in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[s:s + batch_size], attention_mask=mask[s:s + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: {k: torch.cat(v) for k, v in d.items()} for i, d in got.items()}, finals


def every_expert_on_every_token(block, x, n_experts):
    """[E, T, H]: the model's own experts module run with top-1 routing to e, weight 1, for every e."""
    t = x.shape[0]
    with torch.no_grad():
        return torch.stack([block.experts(x, torch.full((t, 1), e, dtype=torch.long), torch.ones(t, 1, dtype=x.dtype))
                            for e in range(n_experts)])


def brute_force_stats(model, ids, mask, batch_size, n_sub, row_domains=None):
    """Every statistic computed naively from the full model's hooks, all experts on all tokens."""
    adapter = get_adapter(model)
    cap, _ = full_forward_capture(model, ids, mask, batch_size)
    real = mask.reshape(-1).bool()
    dom = None if row_domains is None else row_domains.repeat_interleave(ids.shape[1])
    out = {}
    for i, block in adapter.moe_blocks(model).items():
        c = cap[i]
        x, idx, w, logits = c["x"].double(), c["idx"], c["w"].double(), c["logits"].double()
        n_exp = adapter.n_experts()
        y = every_expert_on_every_token(block, c["x"], n_exp).double()  # [E, T, H]
        t = x.shape[0]
        sel_dense = torch.zeros(t, n_exp, dtype=torch.float64).scatter(1, idx, 1.0) * real[:, None]
        w_dense = torch.zeros(t, n_exp, dtype=torch.float64).scatter(1, idx, w)
        renorm = w_dense / w.sum(1, keepdim=True)
        norms = y.norm(dim=-1).T  # [T, E]
        freq = sel_dense.sum(0)
        st = {
            "frequency": freq,
            "soft_count": (w_dense * sel_dense).sum(0),
            "ean": (norms * sel_dense).sum(0),
            "reap": (renorm * norms * sel_dense).sum(0) / freq,
            "max_activation": (y.abs().amax(-1).T * sel_dense).amax(0),
        }
        real_idx = real.nonzero().flatten()
        n = min(n_sub, real_idx.numel())
        sub = real_idx[(torch.arange(n) * real_idx.numel()) // n]
        ys = y[:, sub]
        st["output_similarity"] = torch.tensor([[F.cosine_similarity(ys[e], ys[f], dim=-1).mean().item()
                                                 for f in range(n_exp)] for e in range(n_exp)], dtype=torch.float64)
        st["expert_output_mean"] = ys.mean(1)
        lr = logits[real]
        st["router_similarity"] = torch.tensor([[F.cosine_similarity(lr[:, e], lr[:, f], dim=0).item()
                                                 for f in range(n_exp)] for e in range(n_exp)], dtype=torch.float64)
        st["input_moment"] = torch.stack([x[sel_dense[:, e] > 0].T @ x[sel_dense[:, e] > 0] for e in range(n_exp)])
        st["input_moment_all"] = x[real].T @ x[real]
        if dom is not None:
            st["frequency_by_domain"] = torch.stack([sel_dense[dom == d].sum(0) for d in range(int(dom.max()) + 1)])
        out[i] = st
    return out


def runner_stats(model, ids, mask, batch_size, names, options=None, row_domains=None, mode="oneshot",
                 on_layer=None):
    adapter = get_adapter(model)
    got = {}

    def collect(run):
        if run.observer is not None:
            got[run.index] = run.observer.results()
        return on_layer(run) if on_layer else False

    final = run_layers(model, adapter, ids, mask, on_layer=collect, batch_size=batch_size, stats=names,
                       observer_options=options, domains=row_domains, mode=mode)
    return got, final


# -- statistics equal the brute force -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_every_statistic_equals_brute_force(arch):
    model = tiny_model(arch)
    ids, mask = calib_batch()
    row_domains = torch.tensor([0, 1, 0, 2, 1, 1])
    n_sub = 37  # fewer than the real tokens: a real subsample, spread over both batches
    got, _ = runner_stats(model, ids, mask, 4, ALL_STATS, {"similarity_tokens": n_sub, "n_domains": 3},
                          row_domains)
    ref = brute_force_stats(model, ids, mask, 4, n_sub, row_domains)
    assert set(got) == set(ref)
    k = get_adapter(model).rule().top_k
    for i in ref:
        assert float(got[i]["frequency"].sum()) == int(mask.sum()) * k
        assert got[i]["frequency"].min() > 0  # every expert seen: the comparisons below mean something
        for name in ALL_STATS:
            a, b = got[i][name].double(), ref[i][name]
            scale = max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"layer {i} {name}: {m}")
        torch.testing.assert_close(got[i]["frequency_by_domain"].sum(0), got[i]["frequency"], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_subsample_covers_all_tokens_and_is_chunked(arch):
    """similarity_tokens >= tokens: every real token; a tiny chunk bound gives the same result."""
    model = tiny_model(arch)
    ids, mask = calib_batch()
    names = ("output_similarity", "expert_output_mean")
    big, _ = runner_stats(model, ids, mask, 4, names, {"similarity_tokens": 10 ** 6})
    small, _ = runner_stats(model, ids, mask, 4, names, {"similarity_tokens": 10 ** 6, "chunk_elements": 1,
                                                          "min_chunk_tokens": 1})  # one token per chunk
    ref = brute_force_stats(model, ids, mask, 4, 10 ** 6)
    for i in ref:
        for name in names:
            torch.testing.assert_close(big[i][name], ref[i][name], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(small[i][name], big[i][name], rtol=1e-6, atol=1e-6)
        assert torch.allclose(big[i]["output_similarity"].diagonal(), torch.ones(8, dtype=torch.float64))


# -- the runner reproduces the model --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_runner_outputs_equal_full_model(arch, padded):
    model = tiny_model(arch)
    ids, mask = calib_batch(padded=padded)
    _, finals = full_forward_capture(model, ids, mask, 4)
    got = run_layers(model, get_adapter(model), ids, mask, batch_size=4, stats=ROUTED_STATS)
    for a, b, m in zip(got, finals, mask.split(4)):
        real = m.bool()
        assert (a[real] - b[real]).abs().max().item() <= 1e-5


def test_sequential_differs_from_oneshot_only_after_a_change():
    model = tiny_model("qwen3_moe")
    ids, mask = calib_batch()
    base, base_final = runner_stats(model, ids, mask, 4, ROUTED_STATS)
    same, same_final = runner_stats(tiny_model("qwen3_moe"), ids, mask, 4, ROUTED_STATS, mode="sequential")
    for a, b in zip(base_final, same_final):
        assert torch.equal(a, b)
    for i in base:
        for name in ROUTED_STATS:
            assert torch.equal(base[i][name], same[i][name])

    def change_layer_1(run):  # silence expert 3 of layer 1 after its statistics were taken
        if run.index != 1:
            return False
        with torch.no_grad():
            run.observer.layer.experts.down[3].zero_()
        return True

    seq, seq_final = runner_stats(tiny_model("qwen3_moe"), ids, mask, 4, ROUTED_STATS, mode="sequential",
                                  on_layer=change_layer_1)
    one, one_final = runner_stats(tiny_model("qwen3_moe"), ids, mask, 4, ROUTED_STATS, mode="oneshot",
                                  on_layer=change_layer_1)
    for name in ROUTED_STATS:  # layers up to the change agree; the next one sees the changed outputs
        assert torch.equal(seq[0][name], one[0][name]) and torch.equal(seq[1][name], one[1][name])
    assert not torch.allclose(seq[2]["ean"], one[2]["ean"])
    assert all(torch.equal(a, b) for a, b in zip(one_final, base_final))
    assert not torch.allclose(seq_final[0], one_final[0])


# -- caching ------------------------------------------------------------------------------------------------------

def fake_calibration(n=6, length=24, padded=True, domains=("code", "prose", "code", "math", "prose", "prose")):
    from types import SimpleNamespace

    ids, mask = calib_batch(n, length, padded=padded)
    return SimpleNamespace(input_ids=ids, attention_mask=mask, domains=list(domains)[:n], spec="test-spec",
                           sha256="0" * 64, seed=0, n_tokens=int(mask.sum()))


def test_statistics_are_cached_and_reused(saved_models, tmp_path, monkeypatch):
    from moe_compress.calibration import collect as collect_mod
    from moe_compress.calibration.collect import collect_statistics
    from moe_compress.models.loading import load_model

    path = str(saved_models["olmoe"])
    model = load_model(path)
    adapter = get_adapter(model)
    calib = fake_calibration()
    names = ("router_similarity", "frequency_by_domain")
    first = collect_statistics(model, adapter, calib, names, model_id=path, cache_dir=tmp_path)
    assert first.meta["cached"] is False and first.meta["domains"] == ["code", "math", "prose"]
    assert len(list(tmp_path.iterdir())) == 1

    def no_run(*a, **k):
        raise AssertionError("the model ran although the statistics were cached")

    monkeypatch.setattr(collect_mod, "run_layers", no_run)
    again = collect_statistics(model, adapter, calib, names, model_id=path, cache_dir=tmp_path)
    assert again.meta["cached"] is True
    for i in first.layers:
        for k, v in first.layers[i].items():
            assert torch.equal(again.layers[i][k], v)
    # anything that changes the statistics misses the cache: options, names, tokens, weights
    with pytest.raises(AssertionError, match="the model ran"):
        collect_statistics(model, adapter, calib, names, model_id=path, cache_dir=tmp_path,
                           observer_options={"similarity_tokens": 5})
    with pytest.raises(AssertionError, match="the model ran"):
        collect_statistics(model, adapter, calib, ("output_similarity",), model_id=path, cache_dir=tmp_path)
    other = fake_calibration()
    other.input_ids = other.input_ids.clone()
    other.input_ids[0, 0] += 1
    with pytest.raises(AssertionError, match="the model ran"):
        collect_statistics(model, adapter, other, names, model_id=path, cache_dir=tmp_path)
    weights = next(saved_models["olmoe"].glob("*.safetensors"))
    import os
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    try:
        with pytest.raises(AssertionError, match="the model ran"):
            collect_statistics(model, adapter, calib, names, model_id=path, cache_dir=tmp_path)
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    # no model id: nothing cached (an in-memory model has no stable identity)
    monkeypatch.undo()
    collect_statistics(model, adapter, calib, names, cache_dir=tmp_path / "none")
    assert not (tmp_path / "none").exists()


# -- lazy, bounded-memory loading --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_lazy_checkpoint_reproduces_the_model(arch, saved_models):
    from moe_compress.models.lazy import LazyCheckpoint
    from moe_compress.models.loading import load_model

    model = load_model(str(saved_models[arch]))
    ids, mask = calib_batch()
    names = ("output_similarity", "router_similarity")
    ref, ref_final = runner_stats(model, ids, mask, 4, names)
    lazy = LazyCheckpoint(saved_models[arch], dtype=torch.float32)
    assert all(p.device.type == "meta" for p in lazy.layers.parameters())
    got = {}

    def keep(run):
        if run.observer is not None:
            got[run.index] = run.observer.results()

    final = run_layers(lazy.model, lazy.adapter, ids, mask, on_layer=keep, batch_size=4, stats=names,
                       layer_source=lazy)
    for a, b in zip(final, ref_final):
        assert torch.equal(a, b)
    for i in ref:
        for k in ref[i]:
            assert torch.equal(got[i][k], ref[i][k])
    assert all(p.device.type == "meta" for p in lazy.layers.parameters())  # every layer released
    outside = lazy.live_bytes
    assert lazy.peak_bytes == outside + max(lazy.layer_bytes.values())


@pytest.mark.parametrize("arch", ["mixtral", "phimoe", "deepseek_v3", "gpt_oss"])
def test_random_checkpoint_has_hub_names_transformers_reads(arch, tmp_path):
    """write_random_checkpoint's names are the ones transformers loads (no missing or unexpected keys)."""
    from transformers import AutoModelForCausalLM

    from moe_compress.models.lazy import LazyCheckpoint, write_random_checkpoint
    from moe_compress.models.tiny import tiny_config

    write_random_checkpoint(tiny_config(arch), tmp_path, dtype=torch.float32, seed=1)
    full, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    lazy = LazyCheckpoint(tmp_path)
    for i, layer in enumerate(lazy.layers):
        lazy.load(i, layer, "cpu")
        ref = get_adapter(full).decoder_layers(full)[i].state_dict()
        for k, v in layer.state_dict().items():
            assert torch.equal(v, ref[k]), k
        lazy.release(i, layer, "cpu")


def test_bounded_memory_by_counting_materialised_bytes(tmp_path):
    """A checkpoint many times larger than one layer: at most one decoder layer is materialised at once."""
    from types import SimpleNamespace

    from moe_compress.calibration.collect import collect_statistics
    from moe_compress.models.lazy import LazyCheckpoint, write_random_checkpoint
    from moe_compress.models.tiny import tiny_config

    cfg = tiny_config("mixtral", num_hidden_layers=12, hidden_size=64, intermediate_size=256)
    write_random_checkpoint(cfg, tmp_path, dtype=torch.float32)
    lazy = LazyCheckpoint(tmp_path)
    ids, mask = calib_batch()
    calib = SimpleNamespace(input_ids=ids, attention_mask=mask)
    stats = collect_statistics(lazy.model, lazy.adapter, calib, layer_source=lazy)
    assert len(stats.layers) == 12
    layer = max(lazy.layer_bytes.values())
    assert lazy.peak_bytes == lazy.live_bytes + layer
    assert lazy.checkpoint_bytes() > 8 * lazy.peak_bytes


@pytest.mark.slow
def test_bounded_memory_resident_set(tmp_path):
    """bench/memory.py in a fresh process: peak RSS growth stays within one layer + activations + slack while
    the checkpoint is 8 times larger."""
    res = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--layers", "8", "--hidden", "512",
                          "--intermediate", "1024", "--ckpt", str(tmp_path / "ckpt")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["checkpoint_mb"] > 2 * out["budget_mb"], out


# -- the analyze command ------------------------------------------------------------------------------------------





@pytest.fixture
def stub_calibration(monkeypatch):
    """`build_calibration` replaced by a fixed calibration set (the analyze plumbing, independent of the data
    module)."""
    import types

    mod = types.ModuleType("moe_compress.calibration.data")
    mod.build_calibration = lambda spec, tokenizer, **kw: fake_calibration()
    monkeypatch.setitem(sys.modules, "moe_compress.calibration.data", mod)
    monkeypatch.setenv("MOE_COMPRESS_CACHE", str(Path(__file__).parent / ".never-used"))


def test_analyze_writes_stats_plots_and_report(monkeypatch, capsys, saved_models, tmp_path, stub_calibration):
    from moe_compress.calibration.stats import Statistics

    out = tmp_path / "analysis"
    args = ("analyze", saved_models["deepseek_v3"], "--calib", "x.jsonl", "--out", out, "-q",
            "--cache-dir", tmp_path / "cache", "--similarity-tokens", 50)
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    for f in ("stats.safetensors", "stats.json", "usage.png", "output_similarity.png", "router_similarity.png",
              "usage_by_domain.png", "report.md"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    stats = Statistics.load(out)
    assert sorted(stats.layers) == [1, 2]  # deepseek: layer 0 is dense
    assert stats.layers[1]["output_similarity"].shape == (8, 8)
    assert stats.layers[1]["frequency_by_domain"].shape == (3, 8)
    report = (out / "report.md").read_text()
    assert "| layer | balance |" in report and "## Usage per domain" in report and "| math |" in report
    # statistics equal a direct (in-memory) collection
    from moe_compress.calibration.collect import collect_statistics
    from moe_compress.models.loading import load_model

    model = load_model(str(saved_models["deepseek_v3"]))
    direct = collect_statistics(model, get_adapter(model), fake_calibration(),
                                ("output_similarity", "frequency_by_domain"),
                                observer_options={"similarity_tokens": 50})
    for i in direct.layers:
        for k in ("frequency", "reap", "output_similarity", "frequency_by_domain"):
            torch.testing.assert_close(stats.layers[i][k], direct.layers[i][k], rtol=1e-6, atol=1e-6)
    # an existing folder is refused, and kept; --overwrite replaces it; the second run comes from the cache
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_user_error(code, err, "already exists")
    assert (out / "report.md").is_file()
    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0, err
    assert "from the cache" in " ".join(stdout.split())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_analyze_missing_arguments(monkeypatch, capsys, saved_models, tmp_path, stub_calibration):
    code, _, err = run_cli(monkeypatch, capsys, "analyze", saved_models["mixtral"], "--out", tmp_path / "o")
    assert_user_error(code, err, "--calib")
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "nope", "--calib", "x", "--out", tmp_path / "o")
    assert_user_error(code, err, "not found")
    code, _, err = run_cli(monkeypatch, capsys, "analyze", saved_models["mixtral"], "--calib", "x")
    assert_user_error(code, err, "--out")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["empty", "too_short", "unknown_spec"])
def test_analyze_bad_calibration_data(case, monkeypatch, capsys, saved_models, tmp_path):
    monkeypatch.setenv("MOE_COMPRESS_CACHE", str(tmp_path / "cache"))
    if case == "empty":
        spec = tmp_path / "empty.jsonl"
        spec.write_text("")
    elif case == "too_short":
        spec = tmp_path / "short.txt"
        spec.write_text("two words")
    else:
        spec = "nosuchscheme:whatever"
    code, _, err = run_cli(monkeypatch, capsys, "analyze", saved_models["mixtral"], "--calib", spec,
                           "--n-samples", 4, "--seq-len", 64, "--out", tmp_path / "o", "-q")
    assert_user_error(code, err, {"empty": "has no text", "too_short": "one row of seq_len",
                                  "unknown_spec": "unknown data spec form"}[case])
    assert not (tmp_path / "o").exists()


def test_analyze_end_to_end_with_domains(monkeypatch, capsys, saved_models, text_file, tmp_path):
    out = tmp_path / "a"
    code, stdout, err = run_cli(monkeypatch, capsys, "analyze", saved_models["qwen3_moe"], "--calib", text_file,
                                "--n-samples", 6, "--seq-len", 32, "--batch-size", 4, "--out", out, "-q",
                                "--no-cache")
    assert code == 0, err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["meta"]["domains"] == ["code", "prose"] and stats["meta"]["tokens"] == 6 * 32
    assert (out / "usage_by_domain.png").is_file()


def test_chunk_tokens_are_aligned_and_bounded():
    from moe_compress.calibration.similarity import chunk_bytes, chunk_tokens

    assert chunk_tokens(8, 4096, 14336, 2 ** 26) == 576          # 585 rounded down to a multiple of 64
    assert chunk_tokens(8, 4096, 14336) == 2304                   # default budget 2**28
    assert chunk_tokens(256, 7168, 2048) == 128                   # DeepSeek-V3: at least 128 tokens
    assert chunk_tokens(8, 4096, 14336, 1, min_tokens=1) == 1
    assert chunk_bytes(8, 64, 96, 10) < chunk_bytes(8, 64, 96, 1000)  # bounded by the subsample size


def test_gram_fp32_is_the_fp32_product():
    from moe_compress.calibration.similarity import gram_fp32

    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gram_fp32(x), x @ x.T, rtol=0, atol=0)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(gram_fp32(xb), xb.float() @ xb.float().T, rtol=0, atol=0)
