"""Fingerprints of compression outputs in every execution configuration, to prove a refactor changed nothing.

For each case (model x method x mode) it compresses in memory, streamed, streamed with a resume (interrupted
after layer 1, re-run), and streamed on 2 gloo processes (torchrun's environment), then prints one JSON line per
output: sha256 of every weight file (shards, index, config), a layout-independent sha256 of the tensors (name,
dtype, shape, bytes; in memory and streamed write different shard layouts), and sha256 of compression.json less
its timings and recipe (the recipe may gain fields). ``--bench`` adds one `moe-compress bench` run (rows less
their timing columns).

    PYTHONPATH=src python bench/runner_pins.py --out /tmp/pins > before.jsonl
    # ... change the code ...
    PYTHONPATH=src python bench/runner_pins.py --out /tmp/pins2 > after.jsonl && diff before.jsonl after.jsonl

Uses only the bundled testbed ``builtin:mixtral-8e`` / ``builtin:demo`` and tiny models saved from
`moe_compress.models.tiny` (with the tests' tokenizer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [  # (model, method, mode, experts, calibration)
    ("builtin:mixtral-8e", "reap", "oneshot", 6, "builtin:demo"),
    ("builtin:mixtral-8e", "hcsmoe", "sequential", 4, "builtin:demo"),
    ("tiny:deepseek_v3", "submoe", "sequential", 4, "TEXT"),
    ("tiny:gpt_oss", "frequency", "oneshot", 4, "TEXT"),
]


class Interrupt(Exception):
    pass


def fingerprint(folder: Path) -> dict:
    from safetensors import safe_open

    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(folder.iterdir())
             if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json", "config.json",
                                                         "generation_config.json")}
    import torch

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    h = hashlib.sha256()
    for k in sorted(tensors):  # by name across shards: independent of the shard layout
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("transformers_version", None)
    m = json.loads((folder / "compression.json").read_text())
    recipe = m.get("recipe")
    for k in ("timings_s", "recipe", "recipe_sha256"):
        m.pop(k, None)
    layout = {k: v for k, v in m.items() if k not in ("streaming", "export")}
    return {"files": files, "tensors": h.hexdigest()[:16], "config": hashlib.sha256(
        json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16],
        "manifest": hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16],
        "manifest_layers": hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16],
        "recipe_keys": sorted(recipe or {})}


_RANK = """
import sys, json
sys.path.insert(0, {src!r})
import torch
torch.set_num_threads(1)
from moe_compress.recipe import build_recipe
from moe_compress.streaming import compress_streaming
res = compress_streaming(build_recipe(json.loads({recipe!r})))
assert res.world == 2
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(data: dict) -> None:
    src = os.environ.get("PYTHONPATH", str(ROOT / "src")).split(os.pathsep)[0]
    script = _RANK.format(src=str(Path(src).resolve()), recipe=json.dumps(data))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(err)


def tiny_models(root: Path) -> tuple[dict[str, Path], Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_tokenizer, write_calibration_file

    from moe_compress.export.writer import save_model
    from moe_compress.models.tiny import tiny_model

    tok = make_tokenizer()
    out = {}
    for arch in ("deepseek_v3", "gpt_oss"):
        d = root / "models" / arch
        if not d.exists():
            save_model(tiny_model(arch, vocab_size=len(tok)), d)
            tok.save_pretrained(d)
        out[arch] = d
    root.mkdir(parents=True, exist_ok=True)
    return out, write_calibration_file(root / "calib.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--only", default=None, help="comma list of configurations: memory,stream,resume,gloo")
    ap.add_argument("--inputs", default="/tmp/runner-pins-inputs", help="where the tiny models and calibration file "
                    "go (a fixed path: compression.json records the paths of model and data)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from moe_compress.execute import compress
    from moe_compress.recipe import build_recipe
    from moe_compress.streaming import compress_streaming

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    tiny, text = tiny_models(Path(args.inputs))
    only = set((args.only or "memory,stream,resume,gloo").split(","))
    for model, method, mode, experts, calib in CASES:
        src = str(tiny[model.split(":")[1]]) if model.startswith("tiny:") else model
        cal = str(text) if calib == "TEXT" else calib
        tag = f"{model}-{method}-{mode}".replace(":", "_")

        def data(kind: str) -> dict:
            return {"model": src, "method": method, "experts": experts, "mode": mode, "device": "cpu",
                    "output": str(root / f"{tag}-{kind}"), "overwrite": True,
                    "calibration": {"data": cal, "n_samples": 6, "seq_len": 48, "batch_size": 2}}

        for kind in ("memory", "stream", "resume", "gloo"):
            if kind not in only:
                continue
            r = build_recipe(data(kind))
            if kind == "memory":
                compress(r)
            elif kind == "stream":
                compress_streaming(r)
            elif kind == "resume":
                def stop(stage: str, done: int, total: int) -> None:
                    if stage == "layers" and done == 2:
                        raise Interrupt
                try:
                    compress_streaming(r, progress=stop)
                except Interrupt:
                    pass
                res = compress_streaming(r)
                assert res.resumed_from == 2, res.resumed_from
            else:
                two_processes(json.loads(r.model_dump_json()))
            print(json.dumps({"case": tag, "run": kind, **fingerprint(Path(r.output))}), flush=True)
    if args.bench:
        out = root / "bench"
        cmd = [sys.executable, "-m", "moe_compress.cli", "bench", "builtin:mixtral-8e", "--methods",
               "frequency,reap,hcsmoe,submoe[rank_ratio=0.5]", "--experts", "6,4", "--calib", "builtin:demo",
               "--n-samples", "6", "--seq-len", "48", "--data", "builtin:demo-eval", "--eval-seq-len", "48",
               "--max-windows", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out), "--overwrite",
               "-q"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads((out / "results.json").read_text())["rows"]
        for row in rows:
            row = {k: v for k, v in row.items() if not k.startswith("time_")}
            print(json.dumps({"case": "bench", "row": row}, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
