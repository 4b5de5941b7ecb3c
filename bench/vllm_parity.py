"""vLLM parity: do moe-compress outputs serve in vLLM exactly as they run in transformers?

For every registered architecture: a tiny model built from config with dimensions vLLM's CPU kernels accept
(head size 64; DeepSeek MLA with kv_lora_rank 512 + qk_rope_head_dim 64 = 576, the size vLLM's CPU MLA decode
supports), its pruned output (`reap`, 8 -> 4 experts) and its merged output (`submoe`, 8 -> 4), all float32; and
the testbed presets (tools.testbed.arch, the shapes the next trained testbeds have) as untrained bfloat16
checkpoints with their bfloat16 compressed outputs (half the experts). Each is loaded in transformers (this
environment) and in vLLM (a separate environment, see `make vllm-check`); both greedy-decode the same prompts
(token ids, EOS ignored) and the first step's top-5 logprobs are compared.

    .venv/bin/python bench/vllm_parity.py --vllm-python .vllm-venv/bin/python --out runs/vllm-parity

Prints one table (architecture x {original, pruned, merged} x {loads, tokens match, max logprob diff}) and
writes it to OUT/parity.md, with the raw numbers in OUT/parity.json. An architecture vLLM cannot serve on CPU is
listed with vLLM's exact error. Exit code 1 if compression changed what vLLM does: a compressed model fails
where its original loads, or gives other tokens than transformers where its original gives the same. A family
whose uncompressed original already differs between vLLM and transformers is reported as such, with a control
model of the family without any MoE layer (DENSE_CONTROLS) that tells whether the difference lies outside the
experts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: tools.testbed (testbed presets; not installed)
PROMPTS = ["The history of the old city", "def fibonacci(n):\n    ", "In this paper we prove that"]
VARIANTS = {"original": None, "pruned": "reap", "merged": "submoe"}
MAX_TOKENS, TOP_K = 8, 5

# Dimensions vLLM serves on CPU, on top of moe_compress.models.tiny.TINY_CONFIGS. A wider init than the default
# makes the random models' next-token choices decisive, so that a greedy tie cannot flip a token.
SERVABLE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64, initializer_range=0.1)
SERVABLE_ARCH = {
    "deepseek_v2": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
                        n_group=1, topk_group=1),  # as DeepSeek-V2-Lite: vLLM's CPU router needs the group keys
    "deepseek_v3": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64),
    "phimoe": dict(attention_bias=True, lm_head_bias=True),  # as Phi-3.5-MoE: vLLM's PhiMoE always has these biases
    "gpt_oss": dict(rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 4096,
                                     "rope_theta": 150000.0}, max_position_embeddings=131072),  # as gpt-oss-20b
}
# Families whose vLLM CPU output was seen to differ from transformers' already for the uncompressed model: the
# harness adds a control with no MoE layer at all (``first_k_dense_replace`` = all layers).
DENSE_CONTROLS = ("deepseek_v2", "deepseek_v3")
# The name the hub checkpoint (and vLLM's registry) uses where transformers' class name differs.
HUB_ARCHITECTURES = {"phimoe": "PhiMoEForCausalLM"}


def build_original(arch: str, folder: Path, tokenizer) -> None:
    """Save the tiny servable model of ``arch`` (float32) with the testbed tokenizer, as a hub checkpoint."""
    from moe_compress.export.writer import save_model
    from moe_compress.models.tiny import tiny_model

    model = tiny_model(arch, vocab_size=len(tokenizer), **{**SERVABLE, **SERVABLE_ARCH.get(arch, {})})
    save_model(model, folder)
    tokenizer.save_pretrained(folder)
    if arch in HUB_ARCHITECTURES:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["architectures"] = [HUB_ARCHITECTURES[arch]]
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_dense_control(arch: str, folder: Path, tokenizer) -> None:
    """``arch``'s servable tiny model with every layer dense (no MoE layer): isolates attention, for the
    families whose originals already differ between vLLM and transformers."""
    from transformers import AutoModelForCausalLM

    from moe_compress.export.writer import save_model
    from moe_compress.models.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **{**SERVABLE, **SERVABLE_ARCH.get(arch, {})})
    cfg.first_k_dense_replace = cfg.num_hidden_layers
    save_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), folder)
    tokenizer.save_pretrained(folder)


def build_testbed_preset(arch: str, folder: Path, tokenizer) -> None:
    """An untrained (random) model with the testbed preset of ``arch`` (tools.testbed.arch): the shape the
    next trained testbed of that family has, at bfloat16 as the testbeds are saved."""
    from transformers import AutoModelForCausalLM

    from moe_compress.export.writer import save_model
    from tools.testbed.arch import build_config

    torch.manual_seed(0)
    cfg = build_config(arch, len(tokenizer), tokenizer.eos_token_id or 0, tokenizer.pad_token_id or 0, 512,
                       {"initializer_range": 0.1})
    save_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(torch.bfloat16).eval(), folder)
    tokenizer.save_pretrained(folder)


def compress_variant(source: Path, method: str, folder: Path) -> None:
    """``method`` at half the experts; written in the source's dtype (the default)."""
    from moe_compress.execute import compress
    from moe_compress.models.loading import load_config
    from moe_compress.models.registry import get_adapter
    from moe_compress.recipe import build_recipe

    experts = get_adapter(load_config(str(source))).n_experts() // 2
    compress(build_recipe({"model": str(source), "method": method, "experts": experts, "output": str(folder),
                           "device": "cpu", "calibration": {"data": "builtin:demo", "n_samples": 8, "seq_len": 128}}))


def hf_greedy(folder: Path, prompts: list[list[int]]) -> dict:
    """Greedy tokens (full re-forward each step, float32) and the first step's top-K logprobs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens, first = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = []
            for step in range(MAX_TOKENS):
                logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
                if step == 0:
                    top = torch.topk(logp, TOP_K)
                    first.append({str(int(t)): float(v) for v, t in zip(top.values, top.indices)})
                nxt = int(torch.argmax(logp))
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            tokens.append(out)
    return {"tokens": tokens, "first_logprobs": first}


def run_vllm(vllm_python: str, models: list[dict], prompts: list[list[int]], scratch: Path) -> dict:
    """Results of bench/vllm_worker.py for ``models``; a new worker after each failure (see the worker)."""
    results: dict = {}
    left = list(models)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    while left:
        job, res = scratch / "job.json", scratch / "result.json"
        job.write_text(json.dumps({"models": left, "prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": TOP_K}))
        res.unlink(missing_ok=True)
        log = scratch / f"vllm-{left[0]['name'].replace('/', '-')}.log"
        with open(log, "w") as fh:
            proc = subprocess.run([vllm_python, str(HERE / "vllm_worker.py"), str(job), str(res)], stdout=fh,
                                  stderr=subprocess.STDOUT, env=env, cwd=scratch)
        got = json.loads(res.read_text()) if res.is_file() else {}
        if not got:  # the worker itself died before recording anything
            tail = log.read_text().strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            got = {left[0]["name"]: {"loads": False, "error": f"worker died: {tail[0][:300]}"}}
        results.update(got)
        left = [m for m in left if m["name"] not in results]
    return results


def compare(hf: dict, vl: dict) -> dict:
    """loads, tokens match (prompts equal / all), max |logprob diff| over the first step's top-K tokens of both."""
    if not vl.get("loads") or vl.get("error"):
        return {"loads": bool(vl.get("loads")), "error": vl.get("error")}
    if any(v != v for lp in vl["first_logprobs"] for v in lp.values()):
        return {"loads": True, "error": "vLLM returned NaN logprobs"}
    same = sum(a == b for a, b in zip(hf["tokens"], vl["tokens"]))
    diffs, top_same = [], True
    for a, b in zip(hf["first_logprobs"], vl["first_logprobs"]):
        top_same &= set(a) == set(b)
        diffs += [abs(a[t] - b[t]) for t in set(a) & set(b)]
    return {"loads": True, "error": None, "tokens_match": f"{same}/{len(hf['tokens'])}",
            "all_match": same == len(hf["tokens"]), "top5_same": top_same,
            "max_logprob_diff": max(diffs) if diffs else None}


def table(rows: list[dict]) -> str:
    lines = ["| architecture | variant | loads in vLLM | greedy tokens match | max top-5 logprob diff | vLLM's error |",
             "|---|---|---|---|---:|---|"]
    for r in rows:
        c = r["result"]
        if c["loads"] and not c["error"]:
            top = "" if c["top5_same"] else " (top-5 sets differ)"
            diff = "no common token" if c["max_logprob_diff"] is None else f"{c['max_logprob_diff']:.2e}"
            lines.append(f"| {r['arch']} | {r['variant']} | yes | {c['tokens_match']} | {diff}{top} | |")
        else:
            lines.append(f"| {r['arch']} | {r['variant']} | {'yes' if c['loads'] else 'no'} | - | - | "
                         f"`{(c['error'] or '').replace('|', '/')}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=".vllm-venv/bin/python", help="python of the vLLM environment")
    ap.add_argument("--out", default="runs/vllm-parity")
    ap.add_argument("--archs", default=None, help="comma-separated model types (default: every registered one)")
    ap.add_argument("--testbeds", default="deepseek_v3,mixtral,qwen2_moe,olmoe",
                    help="testbed presets to check as untrained bf16 models ('' for none)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from moe_compress.models.loading import load_tokenizer
    from moe_compress.models.registry import ARCHS
    from tools.testbed.arch import PRESETS

    a.vllm_python = str(Path(a.vllm_python).absolute())  # not resolve(): a venv's python is a symlink
    if not Path(a.vllm_python).is_file():
        print(f"no vLLM python at {a.vllm_python}: run `make vllm-check` (it builds .vllm-venv)", file=sys.stderr)
        return 2
    archs = a.archs.split(",") if a.archs else sorted(ARCHS)
    testbeds = [t for t in a.testbeds.split(",") if t]
    unknown = [x for x in archs if x not in ARCHS] + [t for t in testbeds if t not in PRESETS]
    if unknown:
        print(f"unknown architecture or testbed preset: {', '.join(unknown)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    if out.exists():
        if not a.overwrite:
            print(f"{out} exists; pass --overwrite", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    (out / "models").mkdir(parents=True)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer("builtin:mixtral-8e")
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    models, hf = [], {}
    for arch in archs + [f"testbed-{t}" for t in testbeds]:
        for variant, method in VARIANTS.items():
            folder = out / "models" / arch / variant
            if method is None and arch.startswith("testbed-"):
                build_testbed_preset(arch.removeprefix("testbed-"), folder, tokenizer)
            elif method is None:
                build_original(arch, folder, tokenizer)
            else:
                compress_variant(out / "models" / arch / "original", method, folder)
            name = f"{arch}/{variant}"
            hf[name] = hf_greedy(folder, prompts)
            models.append({"name": name, "path": str(folder.resolve())})
        print(f"built {arch}: original, pruned, merged; transformers reference done", flush=True)
    for arch in [x for x in archs if x in DENSE_CONTROLS]:
        name = f"{arch}-dense-control/original"
        folder = out / "models" / name
        build_dense_control(arch, folder, tokenizer)
        hf[name] = hf_greedy(folder, prompts)
        models.append({"name": name, "path": str(folder.resolve())})
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        vl = run_vllm(a.vllm_python, models, prompts, Path(scratch))
        for log in Path(scratch).glob("*.log"):
            shutil.copy(log, out / log.name)
    rows = [{"arch": m["name"].split("/")[0], "variant": m["name"].split("/")[1],
             "result": compare(hf[m["name"]], vl.get(m["name"], {"loads": False, "error": "not run"}))}
            for m in models]
    orig = {r["arch"]: r["result"] for r in rows if r["variant"] == "original"}
    served = lambda c: c["loads"] and not c["error"]  # noqa: E731
    for r in rows:  # what compression changed: judged against the same architecture's original
        o = orig[r["arch"]]
        r["original_matches"] = served(o) and o["all_match"]
    regressions = [r for r in rows if r["variant"] != "original" and served(orig[r["arch"]])
                   and (not served(r["result"]) or (r["original_matches"] and not r["result"]["all_match"]))]
    differs = sorted(a for a, o in orig.items() if served(o) and not o["all_match"])
    import transformers

    vllm_version = subprocess.run([a.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1:] or ["?"]
    md = table(rows)
    head = (f"vLLM {vllm_version[0]} (CPU) vs transformers {transformers.__version__}, torch {torch.__version__}, "
            f"float32 compute; {len(PROMPTS)} prompts x {MAX_TOKENS} greedy tokens; pruned = reap, merged = submoe, "
            f"both to half the experts; tiny models fp32, testbed presets (untrained) bf16 on disk; "
            f"{time.perf_counter() - t0:.0f} s ({t1 - t0:.0f} s building and transformers)")
    (out / "parity.md").write_text(head + "\n\n" + md + "\n")
    (out / "parity.json").write_text(json.dumps({"header": head, "rows": rows, "hf": hf, "vllm": vl}, indent=1))
    print(head)
    print(md)
    if differs:
        print(f"vLLM differs from transformers for the uncompressed original too: {', '.join(differs)}")
    if regressions:
        print(f"FAILED: {len(regressions)} compressed model(s) load or decode differently from their original "
              "where the original matches", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
