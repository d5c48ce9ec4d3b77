"""Named evaluation presets: per-task settings that reproduce a published evaluation configuration.

``llada-official``: the configuration of the official LLaDA evaluation (``ML-GSAI/LLaDA``: ``eval_llada.py`` and
the lm-eval commands of ``eval_llada_lm_eval.sh``, read at its commit ``b7e6c35``); check them against your
checkout of the repository before quoting a number.

Likelihood tasks (``loglikelihood``; every command passes ``is_check_greedy=False``; ``batch_size`` there is the
ELBO's mini-batch b, ``mc_batch`` here):

| task | fewshot | cfg (guided ELBO w) | mc_num | mc_batch | source |
| --- | ---: | ---: | ---: | ---: | --- |
| gpqa_main_n_shot | 5 | 0.5 | 128 | 8 | eval_llada_lm_eval.sh |
| truthfulqa_mc2 | 0 | 2.0 | 128 | 8 | eval_llada_lm_eval.sh |
| arc_challenge | 0 | 0.5 | 128 | 8 | eval_llada_lm_eval.sh |
| hellaswag | 0 | 0.5 | 128 | 8 | eval_llada_lm_eval.sh |
| winogrande | 5 | 0.0 | 128 | 8 | eval_llada_lm_eval.sh |
| piqa | 0 | 0.5 | 128 | 8 | eval_llada_lm_eval.sh |
| mmlu, cmmlu, ceval-valid | 5 | 0.0 | 1 | 1 | eval_llada_lm_eval.sh (one-token answers: one row is the exact ELBO) |

Tasks not in the table (e.g. ``arc_easy``, the built-in tasks) get cfg 0 and mc_num 128 / mc_batch 8: the
official scripts give no figure for them, and none is invented here. The greedy check is off
(``is_check_greedy=False``; none of the paper's metrics needs it). The ELBO is computed as the official code
computes it (``precision="official"`` of :class:`~dllm_sparse.eval.scoring.scorer.Scorer`: guidance and
cross-entropy in the model's dtype, its batch layout).

Generation tasks (``generate_until``: bbh, gsm8k, minerva_math, humaneval, mbpp, each a command of
``eval_llada_lm_eval.sh``): ``gen_length=1024, steps=1024, block_length=1024`` (the commands), temperature 0,
low-confidence remasking and the guidance ``cfg`` of the command (``eval_llada.py``'s ``generate_until`` passes
``cfg_scale=self.cfg``; the generation commands leave it at its default 0), with the official sampler's
confidence (``GenerationConfig(confidence="official")``: softmax in the model's dtype, ``torch.topk`` order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EvalPreset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class EvalPreset:
    """Per-task evaluation settings (see the module docstring for the sources)."""

    name: str
    cfg_scale: dict[str, float] = field(default_factory=dict)  # guided-ELBO w per task; others get default_cfg
    num_fewshot: dict[str, int] = field(default_factory=dict)
    mc: dict[str, tuple[int, int]] = field(default_factory=dict)  # (mc_num, mc_batch) where a task differs
    default_cfg: float = 0.0
    mc_num: int = 128
    mc_batch: int = 8
    greedy_check: str = "off"
    precision: str = "float32"  # the ELBO's arithmetic (Scorer precision)
    generation_tasks: tuple[str, ...] = ()
    confidence: str = "float64"  # the sampler's (GenerationConfig.confidence)
    gen_length: int = 1024
    steps: int = 1024
    block_length: int = 1024

    def cfg_for(self, task: str) -> float:
        return float(self.cfg_scale.get(_base_task(task), self.default_cfg))

    def mc_for(self, task: str) -> tuple[int, int]:
        """(mc_num, mc_batch) of ``task``: its entry of :attr:`mc`, else the preset's."""
        return self.mc_override(task) or (self.mc_num, self.mc_batch)

    def mc_override(self, task: str) -> tuple[int, int] | None:
        """``task``'s own (mc_num, mc_batch) where it differs from the preset's, else None."""
        return self.mc.get(_base_task(task))


def _base_task(task: str) -> str:
    """``"arc_challenge:acc_norm"`` -> ``"arc_challenge"``; MMLU / CMMLU / C-Eval subtasks -> their suite."""
    name = str(task).split(":")[0]
    for suite in ("mmlu", "cmmlu", "ceval-valid"):
        if name.startswith(suite + "_"):
            return suite
    return name


LLADA_OFFICIAL = EvalPreset(
    name="llada-official",
    cfg_scale={"gpqa_main_n_shot": 0.5, "truthfulqa_mc2": 2.0, "arc_challenge": 0.5, "hellaswag": 0.5,
               "winogrande": 0.0, "piqa": 0.5, "mmlu": 0.0, "cmmlu": 0.0, "ceval-valid": 0.0},
    num_fewshot={"gpqa_main_n_shot": 5, "truthfulqa_mc2": 0, "arc_challenge": 0, "hellaswag": 0, "winogrande": 5,
                 "piqa": 0, "mmlu": 5, "cmmlu": 5, "ceval-valid": 5},
    mc={"mmlu": (1, 1), "cmmlu": (1, 1), "ceval-valid": (1, 1)},
    precision="official",
    generation_tasks=("bbh", "gsm8k", "minerva_math", "humaneval", "mbpp"),
    confidence="official",
)

PRESETS: dict[str, EvalPreset] = {LLADA_OFFICIAL.name: LLADA_OFFICIAL}


def get_preset(name: str) -> EvalPreset:
    key = str(name).strip().lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown evaluation preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]
