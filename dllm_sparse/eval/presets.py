"""Named evaluation presets: per-task settings that reproduce a published evaluation configuration.

``llada-official``: the configuration of the official LLaDA evaluation (``ML-GSAI/LLaDA``, ``eval_llada.py`` and
the commands of its ``eval_llada.sh``), as read from a copy of those files; check them against your checkout
of the repository before quoting a number.

Likelihood tasks (``loglikelihood``; every command uses ``mc_num=128``, ``is_check_greedy=False``, batch 8):

| task | fewshot | cfg (guided ELBO w) | source |
| --- | ---: | ---: | --- |
| gpqa_main_n_shot | 5 | 0.5 | eval_llada.sh |
| truthfulqa_mc2 | 0 | 2.0 | eval_llada.sh |
| arc_challenge | 0 | 0.5 | eval_llada.sh |
| hellaswag | 0 | 0.5 | eval_llada.sh |
| winogrande | 5 | 0.0 | eval_llada.sh |
| piqa | 0 | 0.5 | eval_llada.sh |
| mmlu, cmmlu, ceval-valid | 5 | 0.0 | eval_llada.sh (``mc_num=1``, batch 1: one-token answers, exact ELBO) |

The preset sets the per-task cfg, ``mc_num`` 128, ``mc_batch`` 8 and the greedy check; ``mc_num`` and
``mc_batch`` are one value per run, so run the MMLU-style tasks on their own with ``mc_num=1, mc_batch=1``.

Tasks not in the table (e.g. ``arc_easy``, the built-in tasks) get cfg 0: the official scripts give no figure
for them, and none is invented here. The greedy check is off (``is_check_greedy=False``; none of the paper's
metrics needs it). Generation tasks (bbh, gsm8k, minerva_math, humaneval) use ``gen_length=1024, steps=1024,
block_length=1024``, temperature 0, low-confidence remasking (``eval_llada.py`` defaults and
``eval_llada.sh``). The official ``batch_size`` (8) is the ELBO's mini-batch b (``mc_batch`` here); with
guidance each of its rows runs twice.
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
    default_cfg: float = 0.0
    mc_num: int = 128
    mc_batch: int = 8
    greedy_check: str = "off"
    gen_length: int = 1024
    steps: int = 1024
    block_length: int = 1024

    def cfg_for(self, task: str) -> float:
        return float(self.cfg_scale.get(_base_task(task), self.default_cfg))


def _base_task(task: str) -> str:
    """``"arc_challenge:acc_norm"`` -> ``"arc_challenge"``; MMLU / CMMLU subtasks -> their suite."""
    name = str(task).split(":")[0]
    for suite in ("mmlu", "cmmlu"):
        if name.startswith(suite + "_"):
            return suite
    return name


LLADA_OFFICIAL = EvalPreset(
    name="llada-official",
    cfg_scale={"gpqa_main_n_shot": 0.5, "truthfulqa_mc2": 2.0, "arc_challenge": 0.5, "hellaswag": 0.5,
               "winogrande": 0.0, "piqa": 0.5, "mmlu": 0.0, "cmmlu": 0.0, "ceval-valid": 0.0},
    num_fewshot={"gpqa_main_n_shot": 5, "truthfulqa_mc2": 0, "arc_challenge": 0, "hellaswag": 0, "winogrande": 5,
                 "piqa": 0, "mmlu": 5, "cmmlu": 5, "ceval-valid": 5},
)

PRESETS: dict[str, EvalPreset] = {LLADA_OFFICIAL.name: LLADA_OFFICIAL}


def get_preset(name: str) -> EvalPreset:
    key = str(name).strip().lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown evaluation preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]
