"""vLLM side of the parity harness (bench/vllm_parity.py). Runs inside the separate vLLM environment, never the
project's: it imports nothing of moe_compress.

    VLLM_PYTHON bench/vllm_worker.py JOB.json RESULT.json

JOB: {"models": [{"name", "path"}], "prompts": [[token ids]], "max_tokens": N, "logprobs": K}. For each model in
order: load it in vLLM (float32, eager, token ids in and out, no tokenizer), greedy-decode every prompt (EOS
ignored) and keep the first step's top-K logprobs. RESULT: {name: {"loads", "error", "tokens", "first_logprobs"}}.
A model that fails records vLLM's exception as "Type: message" and ends the worker (a failed engine start
leaves vLLM's process groups half set up, so later models in the same process would fail for that reason);
the driver starts a new worker for the models left.
"""

from __future__ import annotations

import gc
import json
import sys


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def main() -> int:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(open(sys.argv[1]).read())
    results: dict[str, dict] = {}
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=job["logprobs"],
                            ignore_eos=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    for m in job["models"]:
        try:
            llm = LLM(model=m["path"], skip_tokenizer_init=True, dtype="float32", max_model_len=256,
                      enforce_eager=True, seed=0)
        except Exception as e:  # noqa: BLE001 - recorded, with vLLM's own words, for the table
            results[m["name"]] = {"loads": False, "error": _error_line(e)}
            break
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
            results[m["name"]] = {
                "loads": True, "error": None,
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "first_logprobs": [{str(t): float(lp.logprob) for t, lp in o.outputs[0].logprobs[0].items()}
                                   for o in outs]}
        except Exception as e:  # noqa: BLE001
            results[m["name"]] = {"loads": True, "error": _error_line(e)}
            break
        finally:
            del llm
            gc.collect()
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh)
    return 0


if __name__ == "__main__":  # vLLM starts worker processes with spawn: the guard is required
    sys.exit(main())
