"""Adapt a LLaMA-family causal LM into a masked-diffusion LM (LoRA by default), on whatever hardware is there.

    # the shipped smollm2-135m-mdm adapter (CPU, 1 thread, time-budgeted; resumes from its last checkpoint):
    python experiments/adapt_ar_to_diffusion.py --base smollm2-135m --minutes 30 \\
        --export dllm_sparse/data/smollm2-135m-mdm

    # other data: a JSONL with instruction/response (the distillation corpus format) or "text" rows,
    # or a `datasets` dataset
    python experiments/adapt_ar_to_diffusion.py --data my.jsonl ...
    python experiments/adapt_ar_to_diffusion.py --hf-dataset wikitext --hf-config wikitext-2-raw-v1 --text-field text

    # train the shipped adapter further (a fresh schedule starting from its weights):
    python experiments/adapt_ar_to_diffusion.py --init-adapter dllm_sparse/data/smollm2-135m-mdm --minutes 95 ...

    # the same loop on one or several GPUs (accelerate picks the devices; rows of a batch are split over processes):
    accelerate launch experiments/adapt_ar_to_diffusion.py --max-steps 2000 --batch-size 32 ...

Steps: convert the base model to the native LLaDA architecture (bidirectional attention, Dream logit shift), add a
mask token, wrap the block linears in peft LoRA and make the mask token's embedding row trainable (peft
``trainable_token_indices``; ``--full`` trains all weights instead), then minimise the LLaDA SFT masked-diffusion
loss (:func:`dllm_sparse.models.adapt.masked_diffusion_loss`) with ``accelerate.Accelerator`` (bf16 autocast by
default) until the budget is used. The learning rate follows the *time* budget (linear warm-up, cosine decay to
10 %; ``--max-steps`` makes it follow steps), so a resumed run continues the same schedule. Every
``--ckpt-minutes`` the trainable tensors, optimizer and log are saved atomically to ``--run-dir`` (a resume under
other settings is refused); ``--export`` writes a peft adapter (``adapter_config.json``,
``adapter_model.safetensors``) with ``dllm_sparse_adapter.json`` (+ its ``.sha256``), ``train_log.json`` and
``loss_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from dllm_sparse.atomic import atomic_write_text
from dllm_sparse.hardware import slow_bf16_reason

# torch and the model tools (dllm_sparse.models.*) are imported inside the functions that use them, after the
# arguments are parsed: --help then answers at once instead of loading torch and transformers first (seconds).

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO / "dllm_sparse" / "data" / "mdm_corpus"
_NO_STEP_LIMIT = 10**9


# ---- data -------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open() if line.strip()]


def encode_rows(records: list[dict], tok, max_answer: int) -> list[tuple[list[int], list[int], bool]]:
    """Records -> (prompt ids, answer ids, finished). Instruction rows get the chat template; "text" rows are
    all answer (no prompt)."""
    eos = tok.eos_token_id
    rows = []
    for r in records:
        if "instruction" in r:
            prompt = tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                             add_generation_prompt=True)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(r["response"], add_special_tokens=False)["input_ids"]
            finished = bool(r.get("finished", True))
        else:
            p, a, finished = [], tok(r["text"], add_special_tokens=False)["input_ids"], True
        if finished:
            a = a + [eos]
        if len(a) > max_answer:
            a, finished = a[:max_answer], False
        if a:
            rows.append((p, a, finished))
    return rows


def load_data(args, tok) -> tuple[list, list, str]:
    if args.hf_dataset:
        import datasets

        ds = datasets.load_dataset(args.hf_dataset, args.hf_config, split=args.hf_split)
        recs = [{"text": x[args.text_field]} for x in ds if x[args.text_field].strip()]
        rng = random.Random(args.seed)
        rng.shuffle(recs)
        held = recs[: args.heldout]
        return encode_rows(recs[args.heldout:], tok, args.max_answer), encode_rows(held, tok, args.max_answer), \
            f"datasets:{args.hf_dataset}/{args.hf_config}/{args.hf_split}"
    if args.data:
        recs = _read_jsonl(Path(args.data))
        random.Random(args.seed).shuffle(recs)
        held = recs[: args.heldout]
        return encode_rows(recs[args.heldout:], tok, args.max_answer), encode_rows(held, tok, args.max_answer), \
            str(args.data)
    train = _read_jsonl(args.corpus / "train.jsonl")
    held = _read_jsonl(args.corpus / "heldout.jsonl")[: args.heldout]
    return encode_rows(train, tok, args.max_answer), encode_rows(held, tok, args.max_answer), str(args.corpus)


def batch_for_step(rows: list, step: int, batch_size: int, seed: int) -> list:
    """Deterministic epoch shuffles: the batch of a step does not depend on where a run was resumed."""
    n = len(rows)
    start = step * batch_size
    out = []
    for i in range(start, start + batch_size):
        epoch, pos = divmod(i, n)
        perm = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(perm)
        out.append(rows[perm[pos]])
    return out


# ---- model ------------------------------------------------------------------------------------------------------


def build(args):
    """(trainable model, tokenizer, mask id, [LoRA/full params, mask-row param]) for this run's settings."""
    from dllm_sparse.models.adapt import add_lora, add_mask_token, convert_causal_lm, mask_row_parameter
    from dllm_sparse.models.loading import load_model

    base = load_model(args.base, dtype="fp32")
    model = convert_causal_lm(base.model, logit_shift=True)
    tok = base.tokenizer
    mask_id = add_mask_token(model, tok)
    del base
    if args.full:
        model.requires_grad_(True)
        return model, tok, mask_id, [list(model.parameters()), []]
    if args.init_adapter:
        trainable = init_from_adapter(model, args.init_adapter, args.r, mask_id)
    else:
        trainable = add_lora(model, r=args.r, alpha=args.alpha)
    row = mask_row_parameter(trainable)
    lora = [p for p in trainable.parameters() if p.requires_grad and p is not row]
    return trainable, tok, mask_id, [lora, [row]]


def init_from_adapter(model, adapter_dir: Path, r: int, mask_id: int):
    """The peft model of an exported adapter, trainable (train a shipped twin further)."""
    from peft import PeftModel

    from dllm_sparse.models.adapt import read_adapter_meta

    meta = read_adapter_meta(adapter_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    rank = peft_model.peft_config["default"].r
    if rank != r or meta.get("mask_token_id") != mask_id:
        raise SystemExit(f"--init-adapter {adapter_dir} has rank {rank} and mask id {meta.get('mask_token_id')}; "
                         f"this run has --r {r} and mask id {mask_id}: pass --r {rank} (or another adapter)")
    return peft_model


def lr_at(elapsed: float, budget: float, step: int, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    # Time-based by default (the budget is wall clock); with --max-steps the schedule follows steps, which makes
    # a run independent of machine speed.
    frac = min(1.0, step / args.max_steps if args.max_steps < _NO_STEP_LIMIT else elapsed / budget)
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def heldout_loss(trainable, rows, mask_id, args, accelerator) -> float:
    """Masked-diffusion loss on the held-out rows with fixed masks (seed 0): comparable across checkpoints."""
    import torch

    from dllm_sparse.models.adapt import collate_sft, masked_diffusion_loss

    trainable.eval()
    g = torch.Generator().manual_seed(0)
    losses = []
    for i in range(0, len(rows), args.batch_size):
        batch = collate_sft(rows[i:i + args.batch_size], eos_id=args.eos_id)
        with torch.no_grad(), accelerator.autocast():
            loss, _ = masked_diffusion_loss(trainable, batch, mask_id, generator=g)
        losses.append(float(loss) * len(batch.input_ids))
    trainable.train()
    return sum(losses) / len(rows)


# ---- checkpoints ------------------------------------------------------------------------------------------------

# Settings that may change between resumes of one run: the budget (train further) and checkpoint cadence.
_RESUMABLE = {"minutes", "max_steps", "ckpt_minutes", "export", "run_dir", "save_adapter_every"}


def resume_settings(args, source: str, train_rows: list) -> dict:
    """Everything that changes the trained numbers: a checkpoint is resumed only under the same settings."""
    import hashlib

    data = hashlib.sha256(json.dumps(train_rows).encode()).hexdigest()[:16]
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _RESUMABLE}
    return dict(out, source=source, train_rows_sha=data)


def check_resume(saved: dict | None, now: dict, ckpt: Path) -> None:
    if saved is None:
        raise SystemExit(f"{ckpt} predates resume keys; move it away or pass another --run-dir")
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(f"{ckpt} was trained with other settings ({lines}); pass those settings to resume it, "
                         "or another --run-dir to start a new run")


def _check_plain(value, where: str) -> None:
    """Raise unless ``value`` is built of the types ``torch.load(weights_only=True)`` reads back (so a resume
    never meets an object it refuses, and the save fails at once instead)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint {where} is a {type(value).__name__}; store it as a plain type (str, number, "
                    "list, dict) so the checkpoint loads with torch.load(weights_only=True)")


def save_ckpt(path: Path, trainable, opt, state: dict) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    params = {n: p.detach().clone() for n, p in trainable.named_parameters() if p.requires_grad}
    _check_plain(state, "state")
    torch.save({"params": params, "opt": opt.state_dict(), "state": state}, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save keeps the previous checkpoint


def load_ckpt(path: Path, trainable, opt) -> dict:
    import torch

    # weights_only: a checkpoint holds tensors and plain types only (save_ckpt), so nothing in it can run code.
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError (an object weights_only refuses), a torn file, ...
        raise SystemExit(f"{path} cannot be read as a checkpoint of this script with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it was written by an "
                         "older version or is damaged: move it away or pass another --run-dir") from None
    named = dict(trainable.named_parameters())
    with torch.no_grad():
        for n, v in ck["params"].items():
            named[n].copy_(v)
    opt.load_state_dict(ck["opt"])
    return ck["state"]


def plot(log: list[dict], heldout: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="train (per step)")
    k = 20
    if len(losses) >= k:
        smooth = [sum(losses[i - k + 1:i + 1]) / k for i in range(k - 1, len(losses))]
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"train ({k}-step mean)")
    if heldout:
        ax.plot([r["step"] for r in heldout], [r["loss"] for r in heldout], "o-", label="held-out (fixed masks)")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss (nats / answer token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m", help="causal LM: load_model name or path")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="dir with train.jsonl / heldout.jsonl")
    ap.add_argument("--data", help="a JSONL file (instruction/response/finished rows or text rows) instead")
    ap.add_argument("--hf-dataset", help="a `datasets` dataset name (local cache / files) instead")
    ap.add_argument("--hf-config", help="configuration name of --hf-dataset")
    ap.add_argument("--hf-split", default="train", help="split of --hf-dataset (default: train)")
    ap.add_argument("--text-field", default="text", help="text column of --hf-dataset / text rows (default: text)")
    ap.add_argument("--heldout", type=int, default=32, help="held-out rows for the loss curve")
    ap.add_argument("--max-answer", type=int, default=97, help="answer tokens kept per row (default: 97)")
    ap.add_argument("--run-dir", type=Path, default=None, help="checkpoints + log (default: cache/runs/<name>)")
    ap.add_argument("--export", type=Path, help="write the adapter + log + plot here at the end")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock training budget, all resumes (default: 30; none when --max-steps is given, so "
                         "the run takes exactly that many steps however slow the machine is)")
    ap.add_argument("--max-steps", type=int, default=_NO_STEP_LIMIT,
                    help="stop after this many steps (and schedule the learning rate by steps)")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0, help="minutes between checkpoints (default: 5)")
    ap.add_argument("--save-adapter-every", type=int, default=0,
                    help="also save the adapter every N steps to <run-dir>/adapters/step-<N> (the training "
                         "trajectory of experiments/advantage_study.py; default: 0 = never)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per step (default: 8)")
    ap.add_argument("--lr", type=float, default=5e-4, help="learning rate (default: 5e-4)")
    ap.add_argument("--mask-lr", type=float, default=1e-3, help="learning rate of the mask-row delta")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up steps (default: 10)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (default: 16)")
    ap.add_argument("--alpha", type=int, default=32, help="LoRA alpha (default: 32)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--init-adapter", type=Path, default=None,
                    help="start from this exported adapter (same --r) instead of zero LoRA: trains a shipped twin "
                         "further with a fresh schedule")
    ap.add_argument("--eps", type=float, default=1e-3, help="t ~ U(eps, 1)")
    ap.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                    help="bf16 autocast (default: on where bf16 matmuls are fast: a GPU, or a CPU with AVX512-BF16 / "
                         "AMX; float32 otherwise, where bf16 runs on a slow reference GEMM)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data order, masks and init (default: 0)")
    args = ap.parse_args(argv)
    for name in ("batch_size", "max_steps", "threads", "r", "warmup"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.minutes is None and args.max_steps == _NO_STEP_LIMIT:
        args.minutes = 30.0
    for name in ("minutes", "lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def _start_state(args, ckpt: Path, trainable, opt, source: str, train_rows: list, accelerator) -> dict:
    """The training state: resumed from ``ckpt`` (refused when its settings differ), or fresh (optionally
    from ``--init-adapter``)."""
    from dllm_sparse.models.adapt import adapter_hash

    state = {"step": 0, "elapsed": 0.0, "tokens": 0, "answer_tokens": 0, "masked_tokens": 0, "log": [],
             "heldout": []}
    settings = resume_settings(args, source, train_rows)
    if ckpt.is_file():
        state = load_ckpt(ckpt, trainable, opt)
        check_resume(state.get("settings"), settings, ckpt)
        accelerator.print(f"resumed at step {state['step']} ({state['elapsed']:.0f}s trained)")
    elif args.init_adapter:
        state["init_adapter"] = {"dir": str(args.init_adapter), "hash": adapter_hash(args.init_adapter),
                                 "tokens": _tokens_seen(args.init_adapter)}
        accelerator.print(f"initialised the LoRA factors and the mask row from {args.init_adapter}")
    state["settings"] = settings
    return state


def _train_step(args, model, opt, params, rows: list, tok, mask_id: int, step: int, lr: float, rank: int,
                accelerator, t0: float) -> tuple[float, float, float, list]:
    """One optimiser step on this process's share of the step's batch. Returns the loss (mean over processes),
    the gradient norm, the step time (the slowest process's) and the token counts (summed over processes)."""
    import torch

    from dllm_sparse.models.adapt import SFTBatch, collate_sft, masked_diffusion_loss

    batch: SFTBatch = collate_sft(rows, eos_id=tok.eos_token_id)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7_919 * rank)
    opt.param_groups[0]["lr"] = lr
    if len(opt.param_groups) > 1:
        opt.param_groups[1]["lr"] = args.mask_lr * lr / args.lr
    with accelerator.autocast():
        loss, info = masked_diffusion_loss(model, batch, mask_id, eps=args.eps, generator=g)
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    gnorm = accelerator.clip_grad_norm_(params, 1.0)
    opt.step()
    loss = float(accelerator.reduce(loss.detach(), "mean"))
    # The slowest process's step time drives the schedule and the stop, so all processes stop together.
    dt = float(accelerator.reduce(torch.tensor(time.time() - t0, device=accelerator.device), "max"))
    counts = accelerator.reduce(torch.tensor([info["tokens"], info["answer_tokens"], info["masked_tokens"]],
                                             device=accelerator.device), "sum").tolist()
    return loss, gnorm, dt, counts


def _record_step(state: dict, loss: float, lr: float, gnorm, dt: float, counts: list, accelerator) -> None:
    """Count the step's time and tokens into ``state`` and its log (printed every 10 steps)."""
    state["step"] += 1
    state["elapsed"] += dt
    state["tokens"] += int(counts[0])
    state["answer_tokens"] += int(counts[1])
    state["masked_tokens"] += int(counts[2])
    state["log"].append({"step": state["step"], "loss": round(loss, 4), "lr": lr,
                         "gnorm": round(float(gnorm), 3), "s": round(dt, 2), "elapsed": round(state["elapsed"], 1),
                         "tokens": state["tokens"]})
    if state["step"] % 10 == 0:
        recent = [r["loss"] for r in state["log"][-10:]]
        accelerator.print(f"step {state['step']} loss {sum(recent) / len(recent):.3f} lr {lr:.2e} {dt:.2f}s/step "
                          f"tokens {state['tokens']} elapsed {state['elapsed']:.0f}s")


def _train(args, accelerator, model, opt, state: dict, train_rows: list, held_rows: list, tok, mask_id: int,
           run_dir: Path, ckpt: Path) -> None:
    """The loop: steps until the time budget or --max-steps, step adapters, held-out loss and a checkpoint every
    --ckpt-minutes and at the end."""
    import torch

    unwrapped = accelerator.unwrap_model(model)
    world, rank = accelerator.num_processes, accelerator.process_index
    params = [p for g in opt.param_groups for p in g["params"]]
    budget = float("inf") if args.minutes is None else args.minutes * 60  # None: --max-steps alone decides
    if not state["heldout"]:
        state["heldout"].append({"step": 0, "loss": heldout_loss(unwrapped, held_rows, mask_id, args, accelerator)})
        accelerator.print(f"held-out loss at start {state['heldout'][-1]['loss']:.3f}")
    t_last_ckpt = time.time()
    while state["elapsed"] < budget and state["step"] < args.max_steps:
        t0 = time.time()
        step = state["step"]
        # Every process builds the same global batch and takes its share of rows, so a run is the same computation
        # on one process or several (the gradient is averaged over processes).
        rows = batch_for_step(train_rows, step, args.batch_size, args.seed)[rank::world]
        lr = lr_at(state["elapsed"], budget, step, args)
        loss, gnorm, dt, counts = _train_step(args, model, opt, params, rows, tok, mask_id, step, lr, rank,
                                              accelerator, t0)
        _record_step(state, loss, lr, gnorm, dt, counts, accelerator)
        done = state["elapsed"] >= budget or state["step"] >= args.max_steps
        if args.save_adapter_every and state["step"] % args.save_adapter_every == 0 and accelerator.is_main_process:
            save_step_adapter(args, unwrapped, mask_id, run_dir / "adapters" / f"step-{state['step']}", state)
        want_ckpt = torch.tensor(float(time.time() - t_last_ckpt > args.ckpt_minutes * 60), device=accelerator.device)
        if done or float(accelerator.reduce(want_ckpt, "max")):
            state["heldout"].append({"step": state["step"],
                                     "loss": heldout_loss(unwrapped, held_rows, mask_id, args, accelerator)})
            accelerator.print(f"held-out loss {state['heldout'][-1]['loss']:.3f} at step {state['step']}")
            if accelerator.is_main_process:
                save_ckpt(ckpt, unwrapped, opt, state)
            accelerator.wait_for_everyone()
            t_last_ckpt = time.time()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from dllm_sparse.models.loading import cache_dir

    if args.bf16 is None:
        why = slow_bf16_reason("cuda" if torch.cuda.is_available() else "cpu")
        args.bf16 = why is None
        if why:
            print(f"float32 training: {why} (--bf16 forces it)", flush=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = args.run_dir or cache_dir() / "runs" / "smollm2-135m-mdm"
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "ckpt.pt"

    from accelerate import Accelerator

    # cpu=True without a GPU: otherwise accelerate treats torchrun's CPU processes as independent runs.
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=not torch.cuda.is_available())
    world = accelerator.num_processes
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {world} processes: use a multiple")
    trainable, tok, mask_id, (main_params, row_params) = build(args)
    args.eos_id = tok.eos_token_id
    train_rows, held_rows, source = load_data(args, tok)
    accelerator.print(f"data {source}: {len(train_rows)} train rows, {len(held_rows)} held-out; mask id {mask_id}; "
                      f"{world} process(es) on {accelerator.device}")
    groups = [{"params": main_params, "lr": args.lr}] + ([{"params": row_params, "lr": args.mask_lr}] if row_params
                                                         else [])
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    state = _start_state(args, ckpt, trainable, opt, source, train_rows, accelerator)
    model, opt = accelerator.prepare(trainable, opt)
    _train(args, accelerator, model, opt, state, train_rows, held_rows, tok, mask_id, run_dir, ckpt)
    if args.export and accelerator.is_main_process:
        export(args, accelerator.unwrap_model(model), mask_id, state, source, len(train_rows), len(held_rows), world)


def _adapter_meta(args, trainable, mask_id) -> dict:
    from dllm_sparse.models.adapt import MASK_TOKEN, adapter_bytes

    return {"base": args.base, "conversion": "dllm_sparse.models.adapt.convert_causal_lm", "logit_shift": True,
            "mask_token": MASK_TOKEN, "mask_token_id": mask_id,
            "estimated_bytes": adapter_bytes(trainable.get_base_model().config, args.r)}


def _tokens_seen(adapter_dir: Path) -> int | None:
    """Training tokens an adapter has seen in all its stages (its metadata's ``tokens_total``, else its ``tokens``,
    else its train_log.json's), or None when it does not say."""
    from dllm_sparse.models.adapt import read_adapter_meta

    meta = read_adapter_meta(adapter_dir)
    if meta.get("tokens_total", meta.get("tokens")) is not None:
        return int(meta.get("tokens_total", meta.get("tokens")))
    try:
        log = json.loads((Path(adapter_dir) / "train_log.json").read_text())
    except (OSError, ValueError):
        return None
    return log.get("tokens_total", log.get("tokens"))


def _token_counts(state) -> dict:
    """``tokens``: this run's; ``tokens_total``: with the tokens of the adapter it started from (when known)."""
    before = (state.get("init_adapter") or {}).get("tokens")
    return {"tokens": state["tokens"], **({"tokens_total": before + state["tokens"]} if before is not None else {})}


def save_step_adapter(args, trainable, mask_id, out: Path, state) -> None:
    """An adapter of the run so far (the same files as --export writes, plus the step and tokens seen), written
    to a temporary folder and renamed, so a kill never leaves half an adapter."""
    if args.full:
        raise SystemExit("--save-adapter-every saves LoRA adapters; it does not apply to --full")
    import shutil

    from dllm_sparse.models.adapt import save_adapter

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(tmp, trainable, {**_adapter_meta(args, trainable, mask_id), "step": state["step"],
                                  **_token_counts(state), "elapsed_s": round(state["elapsed"], 1)})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def export(args, trainable, mask_id, state, source, n_train, n_held, world) -> None:
    out = args.export
    out.mkdir(parents=True, exist_ok=True)
    if args.full:
        raise SystemExit("--export writes a LoRA adapter; with --full save the model with save_pretrained instead")
    from dllm_sparse.models.adapt import save_adapter

    meta = save_adapter(out, trainable, {**_adapter_meta(args, trainable, mask_id), "step": state["step"],
                                         **_token_counts(state)})
    log = {
        "source": source, "train_rows": n_train, "heldout_rows": n_held,
        "steps": state["step"], "wall_s": round(state["elapsed"], 1), **_token_counts(state),
        "answer_tokens": state["answer_tokens"], "masked_tokens": state["masked_tokens"],
        "final_loss_mean_last50": round(sum(r["loss"] for r in state["log"][-50:]) / max(1, len(state["log"][-50:])),
                                        4),
        "heldout": state["heldout"],
        "init_adapter": state.get("init_adapter"),
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hardware": f"{world} process(es), {args.threads} thread(s) each, bf16 autocast={args.bf16}",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "loss": [[r["step"], r["loss"]] for r in state["log"]],
    }
    atomic_write_text(out / "train_log.json", json.dumps(log) + "\n")
    plot(state["log"], state["heldout"], out / "loss_curve.png")
    print(json.dumps({k: v for k, v in log.items() if k != "loss"}, indent=1))
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
