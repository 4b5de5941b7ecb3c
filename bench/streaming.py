"""Streaming compression of a checkpoint bigger than the allowed GPU memory (issue 10, part B).

1. Small case: a tiny Mixtral model compressed by the in-memory pipeline and by the streaming path on the same
   device; max |logit difference| of the two outputs (acceptance: <= 1e-6).
2. Large case: a random-weight Mixtral-shaped checkpoint (hub names, one shard per layer) of about
   ``--ratio`` x ``--max-gpu-memory`` is compressed streaming within ``--max-gpu-memory``; reports the peak GPU
   memory (torch.cuda.max_memory_allocated / max_memory_reserved), the batch size the memory plan chose, the
   estimate, and the wall time.

Needs torch, transformers, tokenizers, safetensors, pydantic and PyYAML (no typer/rich):

    PYTHONPATH=src python3 bench/streaming.py --device cuda --max-gpu-memory 3GiB --ratio 2.5
    .venv/bin/python bench/streaming.py --device cpu --tiny        # a quick run of the script itself

Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_compress.models.lazy import write_random_checkpoint  # noqa: E402
from moe_compress.models.tiny import tiny_config, tiny_model  # noqa: E402
from moe_compress.recipe import build_recipe  # noqa: E402
from moe_compress.sizes import fmt_bytes  # noqa: E402
from moe_compress.streaming import compress_streaming, parse_size  # noqa: E402


def make_tokenizer(vocab_size: int, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def calibration_texts(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["expert", "router", "token", "layer", "model", "the", "a", "of", "and", "compress", "memory",
             "def", "return", "x", "=", "(", ")", "1", "2", "gpu", "stream", "shard", "prune", "merge"]
    return [" ".join(rng.choice(words) for _ in range(400)) for _ in range(n_docs)]


def write_calibration(folder: Path, texts: list[str]) -> Path:
    path = folder / "calib.jsonl"
    with open(path, "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return path


def small_case(root: Path, device: str, tok, calib: Path) -> dict:
    """In-memory pipeline vs streaming on a tiny model, same device: max |logit difference|."""
    from transformers import AutoModelForCausalLM

    from moe_compress.execute import compress
    from moe_compress.export.writer import save_model

    folder = root / "tiny"
    save_model(tiny_model("mixtral", vocab_size=len(tok), num_hidden_layers=4), folder)
    tok.save_pretrained(folder)
    out = {}
    for method, mode in (("reap", "sequential"), ("submoe", "oneshot")):
        base = {"model": str(folder), "method": method, "experts": 4, "device": device, "mode": mode,
                "calibration": {"data": str(calib), "n_samples": 8, "seq_len": 64, "batch_size": 4}}
        compress(build_recipe({**base, "output": str(root / f"mem-{method}")}))
        compress_streaming(build_recipe({**base, "output": str(root / f"str-{method}")}), max_gpu_memory="2GiB")
        ids = torch.randint(0, len(tok), (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
        logits = []
        for name in ("mem", "str"):
            m = AutoModelForCausalLM.from_pretrained(root / f"{name}-{method}").to(device).eval()
            with torch.no_grad():
                logits.append(m(ids).logits.float())
        out[f"{method}_{mode}_max_abs_logit_diff"] = float((logits[0] - logits[1]).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-gpu-memory", default="3GiB")
    ap.add_argument("--ratio", type=float, default=2.5, help="checkpoint size / max GPU memory")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--keep", type=int, default=6)
    ap.add_argument("--method", default="reap")
    ap.add_argument("--mode", default="oneshot")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (checks the script on CPU)")
    ap.add_argument("--resume-check", action="store_true",
                    help="also run again, interrupted after half the layers and resumed: same bytes?")
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.intermediate, args.seq_len = 128, 256, 128
        args.max_gpu_memory = "24MiB" if args.max_gpu_memory == "3GiB" else args.max_gpu_memory
    root = Path(args.workdir or tempfile.mkdtemp(prefix="stream-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    texts = calibration_texts(300)
    tok = make_tokenizer(512, texts)
    calib = write_calibration(root, texts)
    result: dict = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()

    t0 = time.perf_counter()
    result["small_case"] = small_case(root, args.device, tok, calib)
    result["small_case_s"] = round(time.perf_counter() - t0, 2)

    cap = parse_size(args.max_gpu_memory)
    dtype = getattr(torch, args.dtype)
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_local_experts=args.experts,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=args.hidden // 16, vocab_size=len(tok),
                 max_position_embeddings=4096)
    el = dtype.itemsize
    head_dim = args.hidden // 16
    layer_bytes = (args.experts * 3 * args.hidden * args.intermediate + 2 * args.hidden ** 2
                   + 2 * args.hidden * 4 * head_dim + args.experts * args.hidden + 2 * args.hidden) * el
    n_layers = math.ceil(args.ratio * cap / layer_bytes)
    cfg = tiny_config("mixtral", num_hidden_layers=n_layers, **shape)
    ckpt = root / "big"
    t0 = time.perf_counter()
    write_random_checkpoint(cfg, ckpt, dtype=dtype)
    tok.save_pretrained(ckpt)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    result.update(write_checkpoint_s=round(time.perf_counter() - t0, 1), checkpoint_bytes=ckpt_bytes,
                  layers=n_layers, layer_bytes=layer_bytes, max_gpu_memory=cap,
                  checkpoint_over_cap=round(ckpt_bytes / cap, 2))
    recipe = build_recipe({"model": str(ckpt), "method": args.method, "experts": args.keep, "device": args.device,
                           "dtype": args.dtype, "mode": args.mode, "output": str(root / "big-out"),
                           "calibration": {"data": str(calib), "n_samples": args.n_samples,
                                           "seq_len": args.seq_len, "batch_size": args.batch_size}})
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = compress_streaming(recipe, max_gpu_memory=cap, log=lambda m: print(m, file=sys.stderr))
    wall = time.perf_counter() - t0
    result.update(wall_s=round(wall, 2), timings_s={k: round(v, 2) for k, v in res.timings.items()},
                  batch_size=res.memory.batch_size, estimated_peak=res.memory.estimate(),
                  peak_materialised=res.peak_materialised,
                  read_gb_per_s=round(ckpt_bytes / wall / 1e9, 3))
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        result.update(max_memory_allocated=peak, max_memory_reserved=torch.cuda.max_memory_reserved(),
                      within_cap=peak <= cap)
    if args.resume_check:
        class Stop(Exception):
            pass

        def stop(stage, done, total):
            if stage == "layers" and done == n_layers // 2:
                raise Stop

        again = recipe.model_copy(update={"output": str(root / "big-resumed")})
        try:
            compress_streaming(again, max_gpu_memory=cap, progress=stop)
        except Stop:
            pass
        t0 = time.perf_counter()
        res2 = compress_streaming(again, max_gpu_memory=cap)
        names = sorted(p.name for p in (root / "big-out").glob("*.safetensors")) + ["model.safetensors.index.json",
                                                                                    "config.json"]
        same = all((root / "big-out" / n).read_bytes() == (root / "big-resumed" / n).read_bytes() for n in names)
        result.update(resume_from_layer=res2.resumed_from, resumed_part_s=round(time.perf_counter() - t0, 2),
                      resumed_identical=same)
        if args.device.startswith("cuda"):
            result["max_memory_allocated_all_runs"] = torch.cuda.max_memory_allocated()
    out_bytes = sum(f.stat().st_size for f in (root / "big-out").glob("*.safetensors"))
    result["output_bytes"] = out_bytes
    print(f"checkpoint {fmt_bytes(ckpt_bytes)} ({n_layers} layers) with cap {fmt_bytes(cap)}: "
          f"{wall:.1f} s, batch {res.memory.batch_size}", file=sys.stderr)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
