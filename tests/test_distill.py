"""The distillation stage (methods/hybrid/distill.py, ``refit[distill_steps=N]``).

- the kept iterate is chosen on held-out rows: its held-out KL is never above the start, and on a pruned tiny
  model a few steps lower it;
- ``params="moe"`` trains the MoE blocks only: every other tensor is bit-identical afterwards, and the dtype
  of the model is kept;
- ``schedule="cosine"``: a linear warm-up over the first 5% of the steps, then a half cosine towards zero; the
  optimizer takes exactly those step sizes;
- through the pipeline: compression.json records the stage, and the written checkpoint loads and computes the
  distilled model's logits; the same seed gives the same tensors.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_compress.divergence import token_kl
from moe_compress.execute import compress
from moe_compress.methods.hybrid.distill import distill, float_tensors, step_size_factor, trainable_parameters
from moe_compress.models.registry import get_adapter
from moe_compress.models.surgery import keep_set, write_block
from moe_compress.models.tiny import tiny_model
from moe_compress.recipe import Recipe


def rows(n=20, length=24, vocab=96, seed=3):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def pruned_pair(arch="mixtral", keep=4):
    """(teacher, student, adapter): a tiny model and a copy keeping ``keep`` experts of every layer (the first
    ones of each DeepSeek routing group)."""
    teacher = tiny_model(arch)
    student = copy.deepcopy(teacher)
    adapter = get_adapter(student)
    for i, block in adapter.moe_blocks(student).items():
        layer = adapter.layer(student, i, block)
        groups = max(layer.rule.n_group, 1)
        per = layer.n_experts // groups
        kept = [g * per + j for g in range(groups) for j in range(keep // groups)]
        write_block(adapter, block, keep_set(layer, kept))
    adapter.set_n_experts(keep)
    return teacher, student, adapter


def test_token_kl_is_zero_on_itself_and_positive_otherwise():
    a, b = torch.randn(5, 11).log_softmax(-1), torch.randn(5, 11).log_softmax(-1)
    assert torch.allclose(token_kl(a, a), torch.zeros(5), atol=1e-6)
    assert bool((token_kl(a, b) > 0).all())


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_distillation_lowers_heldout_kl_and_never_raises_it(arch):
    teacher, student, adapter = pruned_pair(arch)
    rec = distill(student, teacher, adapter, rows(), None, steps=30, lr=3e-3, batch_rows=4, every=5, holdout=0.2)
    start, kept = rec["heldout_kl"]
    assert start > 0
    assert kept <= start
    assert kept < 0.9 * start, rec  # the stage does something on a pruned model
    assert rec["heldout_rows"] == 4 and rec["train_rows"] == 16


def test_no_useful_step_keeps_the_start():
    """With a step size that only makes things worse, the start is the kept iterate (tensors unchanged)."""
    teacher, student, adapter = pruned_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rec = distill(student, teacher, adapter, rows(), None, steps=5, lr=10.0, batch_rows=4, every=1)
    assert rec["kept_step"] == 0 and rec["heldout_kl"][0] == rec["heldout_kl"][1]
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_moe_params_only_and_dtypes_kept():
    teacher, student, adapter = pruned_pair("deepseek_v3")
    student.to(torch.bfloat16)
    teacher.to(torch.bfloat16)
    kept_fp32 = [t for name, t in float_tensors(student).items() if name.endswith("e_score_correction_bias")]
    assert kept_fp32  # as transformers keeps DeepSeek-V3's correction bias: fp32 inside a bf16 model
    for t in kept_fp32:
        t.data = t.data.float()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trained = set(trainable_parameters(student, adapter, "moe"))
    assert trained and all(".mlp." in k for k in trained)
    dtypes = {name: t.dtype for name, t in float_tensors(student).items()}
    distill(student, teacher, adapter, rows(), None, steps=10, lr=3e-3, batch_rows=4, every=2)
    assert all(p.dtype == torch.bfloat16 for p in student.parameters() if p.dtype != torch.float32)
    assert {name: t.dtype for name, t in float_tensors(student).items()} == dtypes
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= trained


def test_all_params_excludes_embeddings_and_head():
    _, student, adapter = pruned_pair()
    names = set(trainable_parameters(student, adapter, "all"))
    assert not any("embed_tokens" in n or n.startswith("lm_head") for n in names)
    assert any("self_attn" in n for n in names)


def test_cosine_schedule_warms_up_then_decays_towards_zero():
    steps = 400
    f = [step_size_factor(i, steps, "cosine") for i in range(steps)]
    assert f[:20] == pytest.approx([(i + 1) / 20 for i in range(20)])  # warm-up: 5% of the steps
    assert f[20] == 1.0 and f[210] == pytest.approx(0.5)  # half-way through the decay
    assert all(a >= b for a, b in zip(f[20:], f[21:]))
    assert 0 < f[-1] < 1e-4
    assert [step_size_factor(i, 3, "constant") for i in range(3)] == [1.0, 1.0, 1.0]
    assert step_size_factor(0, 1, "cosine") == 1.0


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_optimizer_takes_the_scheduled_step_sizes(schedule, monkeypatch):
    teacher, student, adapter = pruned_pair()
    seen, step = [], torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    rec = distill(student, teacher, adapter, rows(), None, steps=40, lr=2e-3, batch_rows=4, every=10,
                  schedule=schedule)
    assert rec["schedule"] == schedule
    assert seen == pytest.approx([2e-3 * step_size_factor(i, 40, schedule) for i in range(40)])
    assert rec["heldout_kl"][1] <= rec["heldout_kl"][0]


def test_pipeline_records_the_stage_and_the_checkpoint_computes_it(saved_models, text_file, tmp_path):
    out = tmp_path / "out"
    recipe = Recipe(model=str(saved_models["mixtral"]), method="refit", experts=6, output=str(out),
                    params={"distill_steps": 6, "distill_every": 2, "distill_batch": 4, "distill_lr": 1e-3,
                            "distill_schedule": "cosine"},
                    calibration={"data": str(text_file), "n_samples": 12, "seq_len": 32})
    res = compress(recipe)
    manifest = json.loads((out / "compression.json").read_text())
    rec = manifest["refine"]
    assert rec["steps"] == 6 and rec["schedule"] == "cosine" and rec["heldout_kl"][1] <= rec["heldout_kl"][0]
    assert "refine" in manifest["timings_s"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = rows(2, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, res.model.eval()(x).logits, atol=1e-5)
    again = compress(recipe.model_copy(update={"output": str(tmp_path / "again")}))
    for (k, a), (_, b) in zip(res.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
