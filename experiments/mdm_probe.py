"""Quality of the masked-diffusion twin against its AR parent: held-out perplexity and a capability probe.

    python experiments/mdm_probe.py --out dllm_sparse/data/smollm2-135m-mdm/eval.json

1. Perplexity on the held-out distillation answers (``dllm_sparse/data/mdm_corpus/heldout.jsonl``), prompt given:
   exact for the AR model, the Monte-Carlo ELBO bound (``docs/generation.md`` "Likelihood": stratified mask counts,
   random positions, CE x L / masked count, prompt never masked) for the diffusion model, both from
   :class:`dllm_sparse.eval.scoring.scorer.Scorer` (per-item common random masks). Both are
   exp(-sum log-likelihood / sum answer tokens); the ELBO one is an upper bound on the diffusion model's true
   perplexity.
2. Capability probe (``dllm_sparse/data/capability_probe.jsonl``): 20 short factual questions; a hit is an answer
   containing one of the keywords (case-insensitive). AR: greedy, 64 new tokens. Diffusion: LLaDA low-confidence
   sampler, gen_length 64, steps 64, block_length 32, temperature 0 (``dllm_sparse.samplers``).

Both models run under the same autocast: bf16 where the CPU has fast bf16 matmuls, else float32
(``--bf16`` / ``--no-bf16`` force one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from dllm_sparse.atomic import atomic_write_text

# torch, the models, the samplers and the scorer are imported in main(), after the arguments are parsed: --help
# then answers at once instead of loading torch and transformers first (seconds).

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dllm_sparse" / "data"


def encode_heldout(tok, path: Path, limit: int) -> list[tuple[list[int], list[int]]]:
    rows = []
    for line in path.open():
        r = json.loads(line)
        prompt = tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                         add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(r["response"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if r["finished"] else [])
        rows.append((p, a))
        if len(rows) == limit:
            break
    return rows


def hit(text: str, keywords: list[str]) -> bool:
    return any(k.lower() in text.lower() for k in keywords)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows every option's default."""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--ar", default="smollm2-135m", help="the AR model")
    ap.add_argument("--diffusion", default="smollm2-135m-mdm", help="the masked-diffusion model")
    ap.add_argument("--heldout", type=int, default=64, help="held-out answers for the perplexities")
    ap.add_argument("--mc-num", type=int, default=8, help="ELBO Monte-Carlo samples per answer")
    ap.add_argument("--mc-batch", type=int, default=8, help="ELBO mini-batch (rows per forward pass)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the ELBO masks")
    ap.add_argument("--skip-ppl", action="store_true", help="skip the held-out perplexities")
    ap.add_argument("--skip-probe", action="store_true", help="skip the capability probe")
    ap.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                    help="bf16 autocast (None: only where bf16 matmuls are fast, see dllm_sparse.hardware)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", default=argparse.SUPPRESS, help="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, help="write the results (JSON) here")
    args = ap.parse_args(argv)
    if args.bf16 is None:
        from dllm_sparse.hardware import slow_bf16_reason

        why = slow_bf16_reason("cpu")
        args.bf16 = why is None
        if why:
            print(f"float32: {why} (--bf16 forces it)", flush=True)
    import torch

    torch.set_num_threads(args.threads)

    from dllm_sparse import load_model
    from dllm_sparse import samplers as smp  # one import statement: ruff's isort sorts it the same in any run
    from dllm_sparse.eval.scoring.scorer import Scorer

    GenerationConfig, generate = smp.GenerationConfig, smp.generate

    ar, dm = load_model(args.ar, dtype="fp32"), load_model(args.diffusion, dtype="fp32")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    res: dict = {"ar": args.ar, "diffusion": args.diffusion, "bf16_autocast": args.bf16, "threads": args.threads}

    if not args.skip_ppl:
        rows = encode_heldout(ar.tokenizer, DATA / "mdm_corpus" / "heldout.jsonl", args.heldout)
        n_tok = sum(len(a) for _, a in rows)
        t0 = time.time()
        with autocast():  # exact AR log-likelihood and the Monte-Carlo ELBO: dllm_sparse.eval.scoring.scorer
            scorer = "dllm_sparse.eval.scoring.scorer.Scorer"
            ll_ar = [ll for ll, _ in Scorer.from_loaded(ar, batch_size=8).loglikelihood_tokens(rows)]
            t1 = time.time()
            dm_scorer = Scorer.from_loaded(dm, batch_size=args.mc_batch, mc_num=args.mc_num, mc_batch=args.mc_batch,
                                           seed=args.seed)
            ll_dm = [ll for ll, _ in dm_scorer.loglikelihood_tokens(rows)]
        res["perplexity"] = {
            "scorer": scorer, "heldout_answers": len(rows), "answer_tokens": n_tok,
            "mc_num": args.mc_num, "mc_batch": args.mc_batch,
            "ar_exact": round(float(torch.tensor(-sum(ll_ar) / n_tok).exp()), 3),
            "diffusion_elbo": round(float(torch.tensor(-sum(ll_dm) / n_tok).exp()), 3),
            "seconds": {"ar": round(t1 - t0, 1), "diffusion": round(time.time() - t1, 1)},
        }
        res["perplexity"]["ratio"] = round(res["perplexity"]["diffusion_elbo"] / res["perplexity"]["ar_exact"], 3)
        print(json.dumps(res["perplexity"]), flush=True)

    if not args.skip_probe:
        probe = [json.loads(line) for line in (DATA / "capability_probe.jsonl").open()]
        prompts = [q["prompt"] for q in probe]
        with autocast():
            t0 = time.time()
            out_ar = generate(ar, prompts=prompts, apply_chat_template=True,
                              config=GenerationConfig(max_new_tokens=64, temperature=0.0))
            t1 = time.time()
            out_dm = generate(dm, prompts=prompts, apply_chat_template=True,
                              config=GenerationConfig(gen_length=64, steps=64, block_length=32, temperature=0.0))
            t2 = time.time()
        items = []
        for q, ta, td in zip(probe, out_ar.texts, out_dm.texts, strict=True):
            items.append({"prompt": q["prompt"], "keywords": q["keywords"], "ar": ta, "ar_hit": hit(ta, q["keywords"]),
                          "diffusion": td, "diffusion_hit": hit(td, q["keywords"])})
        res["probe"] = {
            "n": len(items),
            "ar_fraction": sum(i["ar_hit"] for i in items) / len(items),
            "diffusion_fraction": sum(i["diffusion_hit"] for i in items) / len(items),
            "ar_settings": "greedy, 64 new tokens, chat template",
            "diffusion_settings": "LLaDA low-confidence, gen_length 64, steps 64, block_length 32, temperature 0",
            "seconds": {"ar": round(t1 - t0, 1), "diffusion": round(t2 - t1, 1)},
            "items": items,
        }
        print(json.dumps({k: v for k, v in res["probe"].items() if k != "items"}), flush=True)
        for i in items:
            print(f"- {i['prompt']}\n  AR [{i['ar_hit']:d}]: {i['ar'][:100]!r}\n  MDM[{i['diffusion_hit']:d}]: "
                  f"{i['diffusion'][:100]!r}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(res, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
