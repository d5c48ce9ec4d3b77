"""Generation for masked-diffusion and autoregressive LMs behind one interface (``dllm_sparse.samplers``).

    from dllm_sparse.samplers import generate, GenerationConfig, StepSparsity, MaskOverlapTracker
    from dllm_sparse import TopP, load_model

    lm = load_model("smollm2-135m")
    tracker = MaskOverlapTracker(layers=[0, 10, 20])
    sp = StepSparsity("input", TopP(0.9), mask_observers=[tracker])
    out = generate(lm, prompts=["Tell me a joke."], config=GenerationConfig(max_new_tokens=32),
                   sparsity=sp, callbacks=[tracker], apply_chat_template=True)
    print(out.texts[0], out.nfe, out.tokens_per_second, sp.per_step())

A recorded diffusion trajectory replays teacher-forced with :func:`replay` (same loop, same callbacks).

Spec: ``docs/generation.md``. The sampler loops are the only place with generation logic;
everything else (sparsity, statistics, mask tracking) attaches through callbacks and module hooks.
"""

from dllm_sparse.steps import CallbackList, GenerationCallback, Geometry, StepState

from .autoregressive import AutoregressiveGenerator
from .common import encode_prompts, left_pad
from .config import GenerationConfig, GenerationResult, StepInfo
from .diffusion import (
    MaskedDiffusionGenerator,
    fit_geometry,
    num_transfer_tokens,
    resolve_geometry,
    resolve_mask_id,
    validate_geometry,
)
from .generate import detect_kind, generate, make_generator
from .progress import ProgressBar
from .replay import ReplayResult, ReplayStep, prediction_agreement, replay, trajectory_of
from .step_sparsity import StepSparsity
from .tracking import MaskOverlapTracker, PackedMask, mask_overlap

__all__ = [
    "GenerationConfig", "GenerationResult", "StepInfo", "StepState", "Geometry", "GenerationCallback", "CallbackList",
    "MaskedDiffusionGenerator", "AutoregressiveGenerator", "generate", "make_generator", "detect_kind",
    "StepSparsity", "MaskOverlapTracker", "PackedMask", "mask_overlap",
    "validate_geometry", "resolve_geometry", "fit_geometry", "num_transfer_tokens", "resolve_mask_id",
    "encode_prompts", "left_pad",
    "replay", "ReplayResult", "ReplayStep", "trajectory_of", "prediction_agreement", "ProgressBar",
]
