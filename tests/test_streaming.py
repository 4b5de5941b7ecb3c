"""Streaming compression (`moe_compress.streaming`): same result as the in-memory pipeline, bounded memory,
resumable after an interruption, refuses to resume a different recipe, and the same result on 2 processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clitools import run_cli
from helpers import run_gloo_ranks
from transformers import AutoModelForCausalLM

from moe_compress.errors import UserError
from moe_compress.execute import compress
from moe_compress.recipe import build_recipe
from moe_compress.streaming import compress_streaming, parse_size, plan_memory

SRC = Path(__file__).resolve().parents[1] / "src"


def recipe(model, out, method="reap", experts=4, mode="oneshot", calib=None, n_samples=5, batch_size=2, **kw):
    data = {"model": str(model), "method": method, "experts": experts, "output": str(out), "mode": mode,
            "device": "cpu", **kw}
    if calib is not None:
        data["calibration"] = {"data": str(calib), "n_samples": n_samples, "seq_len": 20, "batch_size": batch_size}
    return build_recipe(data)


def weight_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json", "config.json")}


def hub_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    return keys


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


def comparable(manifest: dict) -> dict:
    """The manifest less what differs by design: timings, the streaming record, and the written bytes (one
    shard per layer when streaming: other safetensors headers)."""
    m = {k: v for k, v in manifest.items() if k not in ("timings_s", "recipe", "recipe_sha256", "streaming")}
    m = json.loads(json.dumps(m))
    for k in ("written", "fraction"):
        del m["export"]["bytes"][k]
    return m


@pytest.mark.parametrize("arch,method,mode", [("mixtral", "reap", "oneshot"),
                                              ("deepseek_v3", "hcsmoe", "sequential"),
                                              ("gpt_oss", "frequency", "sequential"),
                                              ("qwen3_moe", "random", "oneshot")])
def test_streaming_equals_in_memory(arch, method, mode, saved_models, text_file, tmp_path):
    model = saved_models[arch]
    compress(recipe(model, tmp_path / "mem", method, mode=mode, calib=text_file))
    compress_streaming(recipe(model, tmp_path / "str", method, mode=mode, calib=text_file))
    mem, st = tmp_path / "mem", tmp_path / "str"
    assert hub_keys(mem) == hub_keys(st)
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    assert (logits(mem, ids) - logits(st, ids)).abs().max() <= 1e-6
    a, b = (json.loads((d / "compression.json").read_text()) for d in (mem, st))
    assert comparable(a) == comparable(b)
    from moe_compress.models.loading import load_config
    from moe_compress.models.registry import get_adapter

    assert get_adapter(load_config(str(st))).n_experts() == 4
    assert (st / "tokenizer.json").is_file() and (st / "README.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_parse_size():
    assert parse_size("20GiB") == 20 * 2 ** 30 and parse_size("1.5G") == int(1.5 * 2 ** 30)
    assert parse_size("20GB") == 20 * 10 ** 9 and parse_size("512MiB") == 2 ** 29 and parse_size(1000) == 1000
    for bad in ("twenty", "20XB", "0GiB"):
        with pytest.raises(UserError):
            parse_size(bad)


@pytest.fixture
def big_checkpoint(tmp_path, tokenizer):
    """A random-weight Mixtral-shaped checkpoint of 12 layers (1.6 MB per layer, fp32)."""
    from moe_compress.models.lazy import write_random_checkpoint
    from moe_compress.models.tiny import tiny_config

    cfg = tiny_config("mixtral", num_hidden_layers=12, hidden_size=64, intermediate_size=256,
                      vocab_size=len(tokenizer))
    folder = write_random_checkpoint(cfg, tmp_path / "big", dtype=torch.float32)
    tokenizer.save_pretrained(folder)
    return folder


def test_checkpoint_larger_than_the_memory_cap_compresses_within_it(big_checkpoint, text_file, tmp_path):
    from moe_compress.models.lazy import LazyCheckpoint

    lazy = LazyCheckpoint(big_checkpoint)
    ckpt = lazy.checkpoint_bytes()
    layer = max(sum(p.numel() * p.element_size() for p in l.parameters()) for l in lazy.layers)
    cap = 3 * layer  # one layer + the new experts + activations of a few sequences
    assert ckpt > 3 * cap
    r = recipe(big_checkpoint, tmp_path / "out", "frequency", experts=4, calib=text_file, n_samples=6, batch_size=6)
    res = compress_streaming(r, max_gpu_memory=cap)
    assert res.peak_materialised <= cap and res.memory.estimate() <= cap
    assert res.memory.batch_size < 6  # the cap forced a smaller calibration batch
    assert res.peak_materialised < ckpt / 8  # never more than one layer (+ embeddings) at once
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert out.config.num_local_experts == 4 and len(out.model.layers) == 12
    manifest = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert manifest["streaming"]["max_gpu_memory"] == cap and len(manifest["layers"]) == 12
    with pytest.raises(UserError, match="too small"):
        compress_streaming(recipe(big_checkpoint, tmp_path / "x", "frequency", calib=text_file),
                           max_gpu_memory=layer // 2)
    assert not (tmp_path / "x").exists()


def test_memory_plan_shrinks_the_batch_with_the_cap(big_checkpoint, text_file, tokenizer):
    from moe_compress.methods.base import get_method
    from moe_compress.models.lazy import LazyCheckpoint
    from moe_compress.pipeline import calibration_set

    lazy = LazyCheckpoint(big_checkpoint)
    r = recipe(big_checkpoint, "/tmp/unused", "reap", calib=text_file, n_samples=8, batch_size=8)
    calib = calibration_set(r, tokenizer)
    method = get_method("reap")
    free = plan_memory(lazy, method, calib, 8, None, "cuda")
    sizes = [plan_memory(lazy, method, calib, 8, int(free.estimate(n) / 0.9) + 1, "cuda").batch_size
             for n in (1, 3, 8)]
    assert sizes == [1, 3, 8]


class Interrupt(Exception):
    pass


def stop_after(layer: int):
    def progress(stage, done, total):
        if stage == "layers" and done == layer + 1:
            raise Interrupt
    return progress


@pytest.mark.parametrize("method,mode", [("submoe", "sequential"), ("random", "oneshot")])
def test_interrupted_run_resumes_to_identical_output(method, mode, saved_models, text_file, tmp_path):
    model = saved_models["deepseek_v3"]  # 3 layers, the first dense
    ref = tmp_path / "ref"
    compress_streaming(recipe(model, ref, method, mode=mode, calib=text_file))
    out = tmp_path / "out"
    r = recipe(model, out, method, mode=mode, calib=text_file)
    with pytest.raises(Interrupt):
        compress_streaming(r, progress=stop_after(1))
    partial = tmp_path / ".out.partial"
    assert not out.exists() and json.loads((partial / "progress.json").read_text())["done"] == 1
    messages = []
    res = compress_streaming(r, log=messages.append)
    assert res.resumed_from == 2 and any("resuming" in m for m in messages)
    assert weight_files(ref) == weight_files(out)  # byte-identical shards, index and config
    a, b = (json.loads((d / "compression.json").read_text()) for d in (ref, out))
    assert comparable(a) == comparable(b)
    assert not partial.exists()


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {src!r})
from moe_compress.recipe import build_recipe
from moe_compress.streaming import compress_streaming
def progress(stage, done, total):
    if stage == "layers" and done == 1:
        os.kill(os.getpid(), signal.SIGKILL)
compress_streaming(build_recipe({recipe!r}), progress=progress)
"""


def test_killed_run_resumes_to_identical_output(saved_models, text_file, tmp_path):
    model = saved_models["mixtral"]
    compress_streaming(recipe(model, tmp_path / "ref", "reap", mode="sequential", calib=text_file))
    r = recipe(model, tmp_path / "out", "reap", mode="sequential", calib=text_file)
    script = _KILL_SCRIPT.format(src=str(SRC), recipe=json.loads(r.model_dump_json()))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["done"] == 0
    res = compress_streaming(r)
    assert res.resumed_from == 1
    assert weight_files(tmp_path / "ref") == weight_files(tmp_path / "out")


def test_changed_recipe_refuses_to_resume(saved_models, text_file, tmp_path):
    model = saved_models["olmoe"]
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        compress_streaming(recipe(model, out, "reap", calib=text_file), progress=stop_after(0))
    with pytest.raises(UserError, match="different recipe"):
        compress_streaming(recipe(model, out, "reap", experts=6, calib=text_file))
    with pytest.raises(UserError, match="different recipe"):  # another calibration batch size
        compress_streaming(recipe(model, out, "reap", calib=text_file, batch_size=3))
    assert (tmp_path / ".out.partial" / "progress.json").is_file()
    res = compress_streaming(recipe(model, out, "reap", experts=6, calib=text_file, overwrite=True))
    assert res.resumed_from is None
    assert json.loads((out / "compression.json").read_text())["experts"]["kept"] == 6


_RANK_BODY = """
from moe_compress.recipe import build_recipe
from moe_compress.streaming import compress_streaming
res = compress_streaming(build_recipe(recipe))
assert res.world == 2
"""


@pytest.mark.parametrize("method,mode", [("reap", "sequential"), ("hcsmoe", "oneshot")])
def test_two_processes_equal_one(method, mode, saved_models, text_file, tmp_path):
    """torch.distributed with gloo, 2 CPU processes: 3 calibration batches (2 on rank 0, 1 on rank 1)."""
    model = saved_models["qwen3_moe"]
    one = tmp_path / "one"
    compress_streaming(recipe(model, one, method, mode=mode, calib=text_file))
    two = tmp_path / "two"
    r = recipe(model, two, method, mode=mode, calib=text_file)
    run_gloo_ranks(_RANK_BODY, json.loads(r.model_dump_json()))
    assert hub_keys(one) == hub_keys(two)
    a, b = (json.loads((d / "compression.json").read_text()) for d in (one, two))
    assert comparable(a)["layers"].keys() == comparable(b)["layers"].keys()
    for i, la in a["layers"].items():
        assert [[e for e, _ in s] for s in la["sources"]] == [[e for e, _ in s] for s in b["layers"][i]["sources"]]
    assert b["streaming"]["world_size"] == 2
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    assert (logits(one, ids) - logits(two, ids)).abs().max() <= 1e-5




def test_cli_max_gpu_memory(monkeypatch, capsys, saved_models, text_file, tmp_path):
    args = ("compress", saved_models["mixtral"], "--method", "frequency", "--experts", 6, "--calib", text_file,
            "--n-samples", 4, "--seq-len", 16, "--device", "cpu", "-q")
    code, out, err = run_cli(monkeypatch, capsys, *args, "--max-gpu-memory", "1GiB", "--out", tmp_path / "a")
    assert code == 0, err
    assert "streamed" in out and json.loads((tmp_path / "a" / "compression.json").read_text())["streaming"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--max-gpu-memory", "4KiB", "--out", tmp_path / "b")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "too small" in lines[0], err
    assert not (tmp_path / "b").exists()


_RSS_SCRIPT = """
import json, sys
sys.path.insert(0, {src!r})
import torch
torch.set_num_threads(2)
from moe_compress.recipe import build_recipe
from moe_compress.streaming import compress_streaming

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

r = build_recipe({recipe!r})
import transformers, safetensors.torch  # imported before the measurement
from moe_compress.methods.base import get_method
import moe_compress.calibration.data
get_method(r.method)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status("VmRSS")
res = compress_streaming(r, max_gpu_memory={cap})
print(json.dumps({{"growth": status("VmHWM") - before, "layer": res.memory.layer, "peak": res.peak_materialised}}))
"""


@pytest.mark.slow
def test_streaming_resident_set_stays_bounded(tmp_path, tokenizer, text_file):
    """A fresh process compresses a 16-layer checkpoint of 50 MB layers: peak RSS growth stays within three layers
    (the layer, its compressed copy, the copy being written) + 192 MB for activations and one-time allocations,
    less than half the checkpoint."""
    from moe_compress.models.lazy import write_random_checkpoint
    from moe_compress.models.tiny import tiny_config

    cfg = tiny_config("mixtral", num_hidden_layers=16, hidden_size=512, intermediate_size=1024,
                      vocab_size=len(tokenizer))
    ckpt = write_random_checkpoint(cfg, tmp_path / "ckpt", dtype=torch.float32)
    tokenizer.save_pretrained(ckpt)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    r = recipe(ckpt, tmp_path / "out", "reap", experts=4, calib=text_file, n_samples=4, batch_size=4)
    script = _RSS_SCRIPT.format(src=str(SRC), recipe=json.loads(r.model_dump_json()), cap=2 ** 30)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    budget = 3 * m["layer"] + 192 * 2 ** 20
    assert m["growth"] <= budget, (m, budget)
    assert size > 2 * budget, (size, budget)
