"""Text sampled from a testbed model: the package's own calibration and evaluation samples.

The shared corpus the testbeds were trained on is third-party data and may not be copied into the package, so
``builtin:demo`` (calibration) and ``builtin:demo-eval`` (evaluation) are text that ``builtin:mixtral-8e`` writes
itself, continuing short domain prompts written for this project. Such data-free calibration keeps the model's
own input distribution; perplexity on it is lower than on real text (the model scores its own samples), while
KL divergence and top-1 agreement against the original stay meaningful. Real numbers need real held-out text
(``../shared/data/eval`` in a checkout, or your own data).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS: dict[str, list[str]] = {
    "code": [
        "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Parse the command line and run.\"\"\"\n",
        "class Cache:\n    \"\"\"A small least-recently-used cache.\"\"\"\n\n    def __init__(self, size=128):\n",
        "def read_config(path):\n    with open(path, encoding=\"utf-8\") as f:\n",
        "    def __repr__(self):\n        return f\"{type(self).__name__}(",
    ],
    "fiction": [
        "It was late in the autumn when Mr. Harding came back to the village, and",
        "She did not answer at once. The fire had burned low, and for a long while",
        "CHAPTER IV.\n\nThe morning after the ball, Elizabeth",
        "\"You will not go,\" said her mother, laying down her work; \"",
    ],
    "legal": [
        "The court held that the contract was void because",
        "Under the statute, a person who knowingly",
        "The doctrine of precedent requires lower courts to",
        "In criminal law, the burden of proof lies with the prosecution, which",
    ],
    "math": [
        "\\begin{lemma}\n\\label{lemma-finite}\nLet $R$ be a ring and let $M$ be a finite $R$-module.",
        "\\begin{proof}\nLet $x \\in X$ be a point. By Lemma",
        "Let $f : X \\to Y$ be a morphism of schemes. We say that $f$ is",
        "\\section{Flat modules}\n\\label{section-flat}\n\n\\noindent\n",
    ],
    "medical": [
        "What are the symptoms of diabetes? The most common symptoms",
        "How is high blood pressure treated? Treatment usually starts with",
        "Hepatitis is an inflammation of the liver. It is",
        "What causes asthma? Asthma is a chronic disease of the airways in which",
    ],
    "wiki": [
        "The river rises in the mountains north of the city and",
        "He was born in 1874 in a small town in the south of the country. After",
        "The museum was founded in 1901 and holds a collection of",
        "The island has a population of about 4,000 people, most of whom",
    ],
}
"""Domain -> prompts (written for this project). Each sampled document starts with its prompt."""


@torch.no_grad()
def sample_documents(model, tokenizer, docs_per_prompt: int, max_new_tokens: int, seed: int,
                     temperature: float = 0.9, top_p: float = 0.95) -> list[dict]:
    """``docs_per_prompt`` sampled continuations of every prompt in `PROMPTS`, as ``{"text", "domain"}`` records.

    Deterministic under ``seed`` on a given torch build (CPU sampling); generation stops at ``max_new_tokens``
    or the end-of-text token.
    """
    records = []
    generator_seed = seed
    for domain, prompts in PROMPTS.items():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.repeat(docs_per_prompt, 1)
            torch.manual_seed(generator_seed)
            generator_seed += 1
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.eos_token_id)
            for row in out:
                text = tokenizer.decode(row, skip_special_tokens=True)
                records.append({"text": text, "domain": domain, "source": "sampled from builtin:mixtral-8e"})
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
