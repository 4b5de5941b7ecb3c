"""Zero-shot tasks: lm-evaluation-harness on a model in memory, with offline task files, and a direct scorer.

Task names resolve in this order:

1. ``<tasks_dir>/<name>.jsonl``: a local task in llm-foundry's format, run by lm-eval from a task definition
   built here (``dataset_path: json``, nothing downloaded). The format is read from the file's keys:

   - multiple choice ``{query, choices, gold}`` (arc_easy, arc_challenge, piqa, copa, openbook_qa): the choices
     are scored as continuations ``" " + choice`` of the query; metrics ``acc``, ``acc_norm`` (log-likelihood
     divided by the choice's length in characters, lm-eval's definition) and ``acc_bytes`` (by UTF-8 bytes);
   - partial scoring ``{context_options, continuation, gold}`` (winogrande): the shared continuation
     ``" " + continuation`` is scored after each context; metric ``acc``;
   - cloze ``{context, continuation}`` (lambada_openai): ``" " + continuation`` after the context; metrics
     ``perplexity`` and ``acc`` (the continuation is the greedy one).

2. Any task lm-eval knows by name (its own, hub-hosted definitions: datasets are downloaded, so online only).

``tasks_dir`` defaults to ``$MOE_COMPRESS_TASKS_DIR`` or else ``../shared/data/tasks`` (relative to the current
folder) when that folder exists. lm-eval is an optional dependency (``pip install 'moe-compress[eval]'``),
imported only when a task is run through it.

`score_choices` is an independent log-likelihood scorer for the two choice formats (same tokenisation rule as
lm-eval's HFLM: whitespace ending the context moves to the continuation; the continuation's tokens are those of
``context + continuation`` after the context's own tokens), used to check the bridge and usable without lm-eval.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_compress.errors import UserError
from moe_compress.models.loading import CausalLM

TASKS_DIR_ENV = "MOE_COMPRESS_TASKS_DIR"
_LOCAL_PREFIX = "moe_compress_"  # lm-eval name of a local task, distinct from lm-eval's own definitions

_FORMATS = {
    "multiple_choice": {"query", "choices", "gold"},
    "partial": {"context_options", "continuation", "gold"},
    "cloze": {"context", "continuation"},
}


# ------------------------------------------------------------------------------------------------- task files


def default_tasks_dir() -> Path | None:
    """``$MOE_COMPRESS_TASKS_DIR`` (which must exist), else ``../shared/data/tasks`` if it exists, else None."""
    env = os.environ.get(TASKS_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise UserError(f"${TASKS_DIR_ENV} is {env}, which is not a folder of task files")
        return path
    path = Path("..") / "shared" / "data" / "tasks"
    return path.resolve() if path.is_dir() else None


def _resolve_tasks_dir(tasks_dir: str | Path | None) -> Path | None:
    if tasks_dir is None:
        return default_tasks_dir()
    path = Path(tasks_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"task folder not found: {tasks_dir}")
    return path


def local_task_files(tasks_dir: str | Path | None = None) -> dict[str, Path]:
    """``{task name: file}`` of the ``*.jsonl`` files in the task folder (empty when there is none)."""
    folder = _resolve_tasks_dir(tasks_dir)
    return {p.stem: p for p in sorted(folder.glob("*.jsonl"))} if folder else {}


def read_task_file(path: str | Path, limit: int | None = None) -> tuple[str, list[dict]]:
    """``(format, items)`` of an llm-foundry task file; format is a key of ``_FORMATS``.

    Raises:
        UserError: unreadable file, bad JSON, or items not of one known format.
    """
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as e:
        raise UserError(f"cannot read task file {path}: {e.strerror}") from e
    items = []
    for i, line in enumerate(lines[:limit] if limit is not None else lines, 1):
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from e
    if not items:
        raise UserError(f"task file {path} has no items")
    keys = set(items[0])
    fmt = next((f for f, need in _FORMATS.items() if need <= keys), None)
    if fmt is None:
        expected = "; ".join("{" + ", ".join(sorted(k)) + "}" for k in _FORMATS.values())
        raise UserError(f"{path}: items have keys {sorted(keys)}, expected one of {expected}")
    for i, item in enumerate(items, 1):
        if not _FORMATS[fmt] <= set(item):
            raise UserError(f"{path}:{i}: missing keys {sorted(_FORMATS[fmt] - set(item))} ({fmt} format)")
    return fmt, items


def local_task_config(name: str, path: str | Path) -> dict[str, Any]:
    """The lm-eval task definition (the dict form of a task YAML) of a local llm-foundry task file."""
    fmt, _ = read_task_file(path, limit=1)
    config: dict[str, Any] = {
        "task": _LOCAL_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
        "test_split": "test",
        "target_delimiter": " ",
        "metadata": {"version": 1.0},
    }
    if fmt == "multiple_choice":
        config |= {"output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
                   "doc_to_target": "gold", "metric_list": _metrics("acc", "acc_norm", "acc_bytes")}
    elif fmt == "partial":  # doc_to_text returning an int (the gold index) marks the contexts as the choices
        config |= {"output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_choice": "context_options",
                   "doc_to_target": "continuation", "metric_list": _metrics("acc")}
    else:  # loglikelihood requests take the target as is: the delimiter goes into the template
        config |= {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "{{' ' + continuation}}",
                   "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                   {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    return config


def _metrics(*names: str) -> list[dict[str, Any]]:
    return [{"metric": n, "aggregation": "mean", "higher_is_better": True} for n in names]


# ------------------------------------------------------------------------------------------------- lm-eval


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"lm-eval is not installed (missing module {e.name}): pip install 'moe-compress[eval]'") from e
    return lm_eval, HFLM, TaskManager


def max_length(model: CausalLM) -> int:
    """Longest input scored: the model's ``max_position_embeddings`` (2048 when the config has none)."""
    return getattr(model.config, "max_position_embeddings", None) or 2048


def run_lm_eval(
    model: CausalLM | str,
    tasks: Sequence[str],
    *,
    tokenizer=None,
    tasks_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` (local task files first, see the module docstring).

    Args:
        model: a causal LM in memory (used where it is), or a MODEL spec (folder, ``builtin:NAME``, hub id)
            loaded with `moe_compress.models.loading` on ``device`` (default: cuda if available, else cpu).
        tasks: task names.
        tokenizer: the model's tokenizer (required with a model in memory; default with a MODEL spec: its own).
        tasks_dir: folder of local ``<name>.jsonl`` task files (default: `default_tasks_dir`).
        limit: at most this many items per task (the first ones).
        num_fewshot: lm-eval's few-shot count (None: the task's default, 0 for local tasks).
        batch_size: requests per forward pass.
        bootstrap_iters: lm-eval's bootstrap iterations for standard errors (0: none).
        log_samples: also return lm-eval's per-item records under ``"samples"``.

    Returns:
        ``{"tasks": {name: {metric: value, metric + "_stderr": value, "n": items}}, "sources": {name: file path
        or "lm-eval"}, "lm_eval_version": str[, "samples": {name: [per-item dicts]}]}``; metric names are
        lm-eval's (``acc``, ``acc_norm``, ...), with ``",filter"`` kept only for filters other than ``none``.

    Raises:
        UserError: lm-eval not installed, an unknown task name, a bad task file or folder.

    Note: like any lm-eval run, this seeds Python's, NumPy's and torch's global random generators.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if isinstance(model, str):
        from moe_compress.models.loading import load_model, load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        model = load_model(model, dtype="auto", device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tokenizer is None:
        raise UserError("run_lm_eval needs the model's tokenizer")

    local = local_task_files(tasks_dir)
    specs: list[str | dict] = []
    sources: dict[str, str] = {}
    lm_names: dict[str, str] = {}  # lm-eval task name -> requested name
    hub = [t for t in tasks if t not in local]
    manager = TaskManager(include_defaults=bool(hub))  # indexing lm-eval's own tasks takes seconds: only if used
    for name in tasks:
        if name in local:
            specs.append(local_task_config(name, local[name]))
            sources[name], lm_names[_LOCAL_PREFIX + name] = str(local[name]), name
        elif name in manager.all_tasks:
            specs.append(name)
            sources[name], lm_names[name] = "lm-eval", name
        else:
            where = f"local tasks in {_resolve_tasks_dir(tasks_dir)}: {', '.join(local)}" if local else \
                f"no local task folder (set ${TASKS_DIR_ENV} or pass a task folder)"
            raise UserError(f"unknown task {name!r} ({where}; other names must be lm-eval tasks)")

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length(model),
              softmax_dtype=torch.float32)
    out = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    result: dict[str, Any] = {"tasks": {}, "sources": sources, "lm_eval_version": _version()}
    for lm_name, metrics in out["results"].items():
        if lm_name not in lm_names:  # a group's aggregate row: its subtasks are reported under their own names
            continue
        row = {_metric_key(k): v for k, v in metrics.items() if "," in k and v != "N/A"}
        row["n"] = out["n-samples"][lm_name]["effective"]
        result["tasks"][lm_names[lm_name]] = row
    if log_samples:
        result["samples"] = {lm_names[k]: v for k, v in out["samples"].items() if k in lm_names}
    return result


def _metric_key(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt == "none" else key


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


# ------------------------------------------------------------------------------------------------- direct scorer


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it (lm-eval's rule for causal models)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihoods(model: CausalLM, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                   max_len: int | None = None) -> list[float]:
    """``log p(continuation | context)`` for each ``(context, continuation)`` request.

    Each request is one sequence ``(context_ids + continuation_ids)[-(max_len + 1):][:-1]`` (right-padded in a
    batch; causal attention keeps padding out of the scored positions); the continuation's token log-probs are
    taken from an fp32 log-softmax and summed in fp64.
    """
    max_len = max_len or max_length(model)
    encoded = []
    for context, continuation in requests:
        if not context or not continuation:
            raise UserError(f"empty context or continuation in request {(context, continuation)!r}")
        ctx, cont = _encode_pair(tokenizer, context, continuation)
        encoded.append(((ctx + cont)[-(max_len + 1):][:-1], cont))
    device = model.get_input_embeddings().weight.device
    out = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(len(inp) for inp, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [b, T], right-padded with id 0
        for i, (inp, _) in enumerate(batch):
            ids[i, :len(inp)] = torch.tensor(inp)
        logits = model(input_ids=ids.to(device), use_cache=False).logits  # [b, T, V]
        for i, (inp, cont) in enumerate(batch):
            pos = slice(len(inp) - len(cont), len(inp))
            lp = torch.log_softmax(logits[i, pos].float(), dim=-1)  # [len(cont), V]
            target = torch.tensor(cont, device=lp.device)[:, None]
            out.append(float(lp.gather(-1, target).double().sum()))
        del logits
    return out


@dataclass(frozen=True)
class ChoiceScores:
    """Accuracy of choosing the most likely option; ``loglikelihoods[i][j]`` of item ``i``'s option ``j``."""

    acc: float
    acc_norm: float
    acc_bytes: float
    n: int
    loglikelihoods: list[list[float]]

    def to_dict(self) -> dict[str, float | int]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "acc_bytes": self.acc_bytes, "n": self.n}


def score_choices(model: CausalLM, tokenizer, items: Sequence[dict], *, batch_size: int = 8) -> ChoiceScores:
    """Direct log-likelihood scoring of multiple-choice or partial-scoring items (see the module docstring).

    ``acc``: argmax of the summed log-probs; ``acc_norm``: of log-prob / length in characters of the option text
    (the choice, or for partial items the context option, as lm-eval does); ``acc_bytes``: / UTF-8 bytes.
    Ties go to the first option (as ``numpy.argmax``).
    """
    requests, options, golds = [], [], []
    for item in items:
        if "choices" in item:
            opts = list(item["choices"])
            requests += [(item["query"], " " + c) for c in opts]
        else:
            opts = list(item["context_options"])
            requests += [(c, " " + item["continuation"]) for c in opts]
        options.append(opts)
        golds.append(int(item["gold"]))
    flat = loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
    lls, hits, start = [], {"acc": 0, "acc_norm": 0, "acc_bytes": 0}, 0
    for opts, gold in zip(options, golds):
        ll, start = flat[start:start + len(opts)], start + len(opts)
        lls.append(ll)
        for key, norm in (("acc", lambda o: 1.0), ("acc_norm", len), ("acc_bytes", lambda o: len(o.encode()))):
            scores = [v / norm(o) for v, o in zip(ll, opts)]
            hits[key] += int(scores.index(max(scores)) == gold)
    n = len(items)
    return ChoiceScores(acc=hits["acc"] / n, acc_norm=hits["acc_norm"] / n, acc_bytes=hits["acc_bytes"] / n, n=n,
                        loglikelihoods=lls)


def score_task_file(model: CausalLM, tokenizer, path: str | Path, *, limit: int | None = None,
                    batch_size: int = 8) -> ChoiceScores:
    """`score_choices` on the first ``limit`` items of a multiple-choice or partial-scoring task file."""
    fmt, items = read_task_file(path, limit=limit)
    if fmt == "cloze":
        raise UserError(f"{path} is a cloze task ({{context, continuation}}): the direct scorer takes choice tasks")
    return score_choices(model, tokenizer, items, batch_size=batch_size)
