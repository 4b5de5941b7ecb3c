"""The one layer runner in all its configurations writes the same checkpoint, and the recipe's ``execution`` field
chooses the configuration.

Pins (bundled testbed builtin:mixtral-8e, one pruning and one merging method): in memory vs streamed -> the same
tensors (name, dtype, shape, bytes) and config.json; streamed vs streamed with a resume after layer 2 vs 2 gloo
processes -> byte-identical shards, index and config. bench/runner_pins.py records the same fingerprints (and
bench rows) for a before/after comparison of a refactor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import assert_user_error, run_cli
from helpers import run_gloo_ranks
from safetensors import safe_open

from moe_compress.errors import UserError
from moe_compress.execute import compress
from moe_compress.pipeline import resolve_execution
from moe_compress.recipe import Execution, build_recipe
from moe_compress.streaming import compress_streaming

SRC = Path(__file__).resolve().parents[1] / "src"
CASES = [("reap", "oneshot", 6), ("hcsmoe", "sequential", 4)]


def recipe(out: Path, method: str, mode: str, experts: int, **kw):
    return build_recipe({"model": "builtin:mixtral-8e", "method": method, "experts": experts, "mode": mode,
                         "device": "cpu", "output": str(out),
                         "calibration": {"data": "builtin:demo", "n_samples": 6, "seq_len": 32, "batch_size": 2},
                         **kw})


def tensors(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, bytes) of every tensor, whatever the shard layout."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k).contiguous()
                out[k] = (str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def weight_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json", "config.json")}


def layers_record(folder: Path) -> dict:
    m = json.loads((folder / "compression.json").read_text())
    return {k: m[k] for k in ("method", "experts", "calibration", "mode", "seed", "layers")}


class Interrupt(Exception):
    pass


def stop_after(layer: int):
    def progress(stage, done, total):
        if stage == "layers" and done == layer + 1:
            raise Interrupt
    return progress


@pytest.fixture(scope="module")
def streamed(tmp_path_factory) -> dict[str, Path]:
    """{method: the streamed (one-process) output} of every case, the reference of the pins."""
    root = tmp_path_factory.mktemp("streamed")
    out = {}
    for method, mode, experts in CASES:
        r = recipe(root / method, method, mode, experts, execution={"mode": "stream"})
        res = compress(r)  # the library dispatches on the recipe
        assert res.model is None and res.streamed is not None and res.streamed.world == 1
        out[method] = root / method
    return out


@pytest.mark.parametrize("method,mode,experts", CASES)
def test_in_memory_streamed_and_resumed_write_the_same_checkpoint(method, mode, experts, streamed, tmp_path):
    ref = streamed[method]
    mem = tmp_path / "mem"
    res = compress(recipe(mem, method, mode, experts))  # execution auto, one process: in memory
    assert res.streamed is None and res.model is not None
    assert tensors(mem) == tensors(ref)
    assert (mem / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    assert layers_record(mem) == layers_record(ref)
    r = recipe(tmp_path / "resumed", method, mode, experts, execution={"mode": "stream"})
    with pytest.raises(Interrupt):
        compress(r, progress=stop_after(2))
    assert json.loads((tmp_path / ".resumed.partial" / "progress.json").read_text())["done"] == 2
    assert compress(r).streamed.resumed_from == 3
    assert weight_files(tmp_path / "resumed") == weight_files(ref)
    assert layers_record(tmp_path / "resumed") == layers_record(ref)
    manifests = [json.loads((d / "compression.json").read_text()) for d in (mem, ref)]
    assert [m["recipe"]["execution"] for m in manifests] == [{"mode": "memory", "max_gpu_memory": None},
                                                             {"mode": "stream", "max_gpu_memory": None}]


_RANK_BODY = """
from moe_compress.execute import compress
from moe_compress.recipe import build_recipe
res = compress(build_recipe(recipe))
assert res.streamed is not None and res.streamed.world == 2
"""


@pytest.mark.parametrize("method,mode,experts", CASES)
def test_two_gloo_processes_write_the_same_bytes(method, mode, experts, streamed, tmp_path):
    """torchrun's environment, 2 CPU processes (3 calibration batches: 2 on rank 0, 1 on rank 1); the recipe says
    nothing about execution: the library streams because it was launched by torchrun."""
    r = recipe(tmp_path / "two", method, mode, experts)
    run_gloo_ranks(_RANK_BODY, json.loads(r.model_dump_json()))
    assert weight_files(tmp_path / "two") == weight_files(streamed[method])
    manifest = json.loads((tmp_path / "two" / "compression.json").read_text())
    assert manifest["streaming"]["world_size"] == 2 and manifest["recipe"]["execution"]["mode"] == "stream"


# -- the execution field --------------------------------------------------------------------------------------------
def test_execution_is_validated():
    base = {"model": "m", "method": "random", "experts": 4, "output": "o"}
    assert build_recipe(base).execution == Execution()
    for bad, message in ((dict(mode="gpu"), "execution.mode"), (dict(stream=True), "execution.stream: unknown key"),
                         (dict(max_gpu_memory="twenty"), "cannot read memory size"),
                         (dict(mode="memory", max_gpu_memory="1GiB"), "use mode stream")):
        with pytest.raises(UserError, match=message):
            build_recipe({**base, "execution": bad})


def test_auto_resolves_from_the_cap_and_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Execution().resolved().mode == "memory" and Execution().resolved(2).mode == "stream"
    assert Execution(max_gpu_memory="2GiB").resolved().mode == "stream"
    assert Execution(mode="memory").resolved(2).mode == "memory"
    base = build_recipe({"model": "m", "method": "random", "experts": 4, "output": "o"})
    assert resolve_execution(base).mode == "memory"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_execution(base).mode == "stream"
    with pytest.raises(UserError, match="launched by torchrun"):
        resolve_execution(base.model_copy(update={"execution": Execution(mode="memory")}))


def test_compression_json_recipe_reruns_streamed(monkeypatch, capsys, saved_models, text_file, tmp_path):
    """--stream lands in compression.json's recipe; re-running that recipe streams again, with the same bytes."""
    import yaml

    args = ("compress", saved_models["olmoe"], "--method", "reap", "--experts", 6, "--calib", text_file,
            "--n-samples", 4, "--seq-len", 16, "--device", "cpu", "-q")
    code, out, err = run_cli(monkeypatch, capsys, *args, "--stream", "--out", tmp_path / "a")
    assert code == 0 and "streamed on 1 process(es)" in out, err
    manifest = json.loads((tmp_path / "a" / "compression.json").read_text())
    assert manifest["recipe"]["execution"] == {"mode": "stream", "max_gpu_memory": None}
    (tmp_path / "again.yaml").write_text(yaml.safe_dump({**manifest["recipe"], "output": str(tmp_path / "b")}))
    code, out, err = run_cli(monkeypatch, capsys, "compress", "--recipe", tmp_path / "again.yaml", "-q")
    assert code == 0 and "streamed on 1 process(es)" in out, err
    assert weight_files(tmp_path / "a") == weight_files(tmp_path / "b")


@pytest.mark.parametrize("extra,pattern", [
    (("--max-gpu-memory", "twenty"), "cannot read memory size 'twenty'"),
    (("--max-gpu-memory", "1GiB", "--set", "execution.mode=memory"), "use mode stream (or auto)"),
    (("--set", "execution.mode=fast"), "execution.mode: Input should be"),
])
def test_cli_execution_errors_are_one_line(monkeypatch, capsys, saved_models, tmp_path, extra, pattern):
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "random",
                           "--experts", 6, "--out", tmp_path / "o", *extra)
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "o").exists()


def test_streaming_cap_argument_overrides_the_recipe(saved_models, text_file, tmp_path):
    r = build_recipe({"model": str(saved_models["mixtral"]), "method": "frequency", "experts": 6, "device": "cpu",
                      "output": str(tmp_path / "o"), "execution": {"max_gpu_memory": "1GiB"},
                      "calibration": {"data": str(text_file), "n_samples": 4, "seq_len": 16}})
    res = compress_streaming(r, max_gpu_memory="2GiB")
    assert res.memory.cap == 2 ** 31
    manifest = json.loads((tmp_path / "o" / "compression.json").read_text())
    assert manifest["recipe"]["execution"] == {"mode": "stream", "max_gpu_memory": "2GiB"}
