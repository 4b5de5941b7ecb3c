"""Shared by the tests of the issue-18 pruning methods: the compress command on a saved tiny model, then the
reloaded checkpoint against the router-masked original."""

from __future__ import annotations

import json

from clitools import run_cli
from helpers import ids
from test_pruning import check_reduced_checkpoint, n_keep_for

from moe_compress.models.registry import get_adapter
from moe_compress.models.tiny import tiny_model


def layer_stats(model, x, names=(), attention_mask=None) -> dict[int, dict]:
    """{MoE layer: statistics} from the calibration runner (routed ones plus the plug-ins ``names``)."""
    from moe_compress.calibration.runner import run_layers

    stats = {}

    def on_layer(run):
        if run.observer is not None:
            stats[run.index] = run.observer.results()

    run_layers(model, get_adapter(model), x, attention_mask, on_layer=on_layer, stats=tuple(names))
    return stats


def cli_prune_and_check(monkeypatch, capsys, saved_models, text_file, tmp_path, arch, method, *extra,
                        calib=True, check=True) -> dict:
    """Run `compress` with ``method``; check the manifest and (``check``) that the reloaded model equals the
    original with every router masked to the kept experts. Returns the manifest's layers."""
    n_keep = n_keep_for(arch)
    out = tmp_path / "out"
    data = ("--calib", text_file, "--n-samples", 4, "--seq-len", 16) if calib else ()
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models[arch], "--method", method, "--experts",
                           n_keep, *data, *extra, "--out", out, "-q")
    assert code == 0, err
    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["experts"] == {"original": 8, "kept": n_keep}
    layers = manifest["layers"]
    model = tiny_model(arch)
    assert set(map(int, layers)) == set(get_adapter(model).moe_blocks(model))
    for info in layers.values():
        assert len(info["kept"]) == n_keep and [s[0][0] for s in info["sources"]] == info["kept"]
    if check:
        kept = {int(i): info["kept"] for i, info in layers.items()}
        check_reduced_checkpoint(saved_models[arch], out, kept, n_keep, ids(2, 12, vocab=90, seed=7))
    return layers
