"""One rank of the data-parallel lm-eval test (tests/test_lm_eval_tasks.py): run under
``torchrun --nproc_per_node 2``; writes ``rank<r>.json`` (what this rank scored, rank 0's results) into argv[1]."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm_eval  # noqa: E402
from byte_tokenizer import ByteTokenizer
from conftest import build_tiny_model  # noqa: E402

from dllm_sparse.eval.scoring.scorer import Scorer
from dllm_sparse.eval.tasks.lm_eval_model import DllmSparseLM  # noqa: E402
from dllm_sparse.eval.tasks.lm_eval_tasks import task_manager  # noqa: E402
from dllm_sparse.sparsity.config import SparsityConfig  # noqa: E402
from dllm_sparse.sparsity.rules import TopP  # noqa: E402

LIMIT = 6


class CountingLM(DllmSparseLM):
    """Counts the distinct loglikelihood requests this rank was given (lm-eval pads a share with copies)."""

    requests = 0

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        CountingLM.requests += len({id(r) for r in requests})
        return super().loglikelihood(requests, disable_tqdm)


def run(data_parallel: bool) -> tuple[CountingLM, dict | None]:
    scorer = Scorer(build_tiny_model("llama", vocab_size=260, seed=3), ByteTokenizer(), "ar", name="tiny-llama",
                    batch_size=4)
    lm = CountingLM.from_scorer(scorer, sparsity=SparsityConfig("input", TopP(0.9)), data_parallel=data_parallel)
    out = lm_eval.simple_evaluate(model=lm, tasks=["dllm_sparse_mc"], task_manager=task_manager(), limit=LIMIT,
                                  bootstrap_iters=0)
    return lm, out


if __name__ == "__main__":
    lm, out = run(data_parallel=True)
    report = {"rank": lm.rank, "world_size": lm.world_size, "requests": CountingLM.requests,
              "results": None if out is None else out["results"]["dllm_sparse_mc"],
              "measured": None if out is None else out["config"]["measured_sparsity"]}
    with open(os.path.join(sys.argv[1], f"rank{lm.rank}.json"), "w") as f:
        json.dump(report, f)
