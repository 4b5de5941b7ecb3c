"""The vLLM parity harness (bench/vllm_parity.py): its pieces on every architecture here, the full harness
(slow) where its separate vLLM environment exists (`make vllm-check` builds it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_compress.models.registry import ARCHS
from tools.testbed.arch import PRESETS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import vllm_parity  # noqa: E402

VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"


def test_mla_dimensions_are_the_ones_vllm_serves():
    """vLLM's MLA needs kv_lora_rank + qk_rope_head_dim = 576; the harness's DeepSeek models and the DeepSeek
    testbed preset (the next trained testbed) use it."""
    for kw in (vllm_parity.SERVABLE_ARCH["deepseek_v2"], vllm_parity.SERVABLE_ARCH["deepseek_v3"],
               PRESETS["deepseek_v3"]):
        assert kw["kv_lora_rank"] + kw["qk_rope_head_dim"] == 576


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_servable_tiny_models_build_and_decode(arch, tmp_path, tokenizer):
    """Every registered architecture has a servable tiny model; the transformers side of the harness decodes it
    with a full re-forward that equals transformers' own greedy generate."""
    vllm_parity.build_original(arch, tmp_path / arch, tokenizer)
    cfg = json.loads((tmp_path / arch / "config.json").read_text())
    assert cfg["architectures"] == [vllm_parity.HUB_ARCHITECTURES.get(arch, cfg["architectures"][0])]
    prompts = [[3, 5, 7, 11], [2, 4]]
    got = vllm_parity.hf_greedy(tmp_path / arch, prompts)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.float32).eval()
    for p, toks in zip(prompts, got["tokens"]):
        ref = model.generate(torch.tensor([p]), max_new_tokens=vllm_parity.MAX_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=vllm_parity.MAX_TOKENS)
        assert ref[0, len(p):].tolist() == toks
    assert all(len(lp) == vllm_parity.TOP_K for lp in got["first_logprobs"])


def test_compare_flags_mismatches_and_failures():
    hf = {"tokens": [[1, 2], [3, 4]], "first_logprobs": [{"1": -0.5, "9": -2.0}, {"3": -0.1, "8": -3.0}]}
    same = {"loads": True, "error": None, "tokens": [[1, 2], [3, 4]],
            "first_logprobs": [{"1": -0.5001, "9": -2.0}, {"3": -0.1, "8": -3.0}]}
    c = vllm_parity.compare(hf, same)
    assert c["all_match"] and c["tokens_match"] == "2/2" and c["max_logprob_diff"] == pytest.approx(1e-4)
    other = {**same, "tokens": [[1, 2], [3, 5]]}
    assert vllm_parity.compare(hf, other)["tokens_match"] == "1/2"
    nan = {**same, "first_logprobs": [{"1": float("nan")}, {"3": -0.1}]}
    assert vllm_parity.compare(hf, nan)["error"] == "vLLM returned NaN logprobs"
    assert vllm_parity.compare(hf, {"loads": False, "error": "ValueError: x"}) == {"loads": False,
                                                                                  "error": "ValueError: x"}


def test_harness_refuses_a_missing_vllm_environment(tmp_path, capsys):
    assert vllm_parity.main(["--vllm-python", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "make vllm-check" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="no .vllm-venv here: `make vllm-check` builds vLLM's own "
                    "environment and runs the harness")
def test_vllm_serves_compressed_outputs_like_transformers(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "vllm_parity.py"), "--vllm-python", str(VLLM_PYTHON),
                           "--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "p" / "parity.json").read_text())["rows"]
    assert {r["arch"] for r in rows} >= set(ARCHS)
    assert {r["arch"] for r in rows} >= {f"{a}-dense-control" for a in vllm_parity.DENSE_CONTROLS}
    # compression never changes what vLLM does: where the original matches transformers, so do its outputs
    matching = [r for r in rows if r["original_matches"]]
    assert matching and all(r["result"]["all_match"] for r in matching)
