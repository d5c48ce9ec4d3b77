"""Make a self-distillation corpus for adapting SmolLM2-135M-Instruct into a masked-diffusion LM.

No hub access is needed: instructions come from topics x task templates written here (seeded shuffle), and the
answers are sampled from the AR model itself with ``model.generate`` (chat template applied, left-padded
batches). Distilling the model's own answers keeps the adaptation about *the objective* (causal next-token ->
bidirectional masked denoising), not about new knowledge.

Output (appended batch by batch, so a killed run resumes where it stopped)::

    dllm_sparse/data/mdm_corpus/train.jsonl, heldout.jsonl   {"id", "instruction", "response", "finished"}
    dllm_sparse/data/mdm_corpus/corpus.json                  sizes, seed, sampling settings, wall time

    python experiments/make_distill_corpus.py --n 1000 --heldout 64 --batch-size 16 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from dllm_sparse.atomic import atomic_write_text

# torch and the model are imported in main(), after the arguments are parsed: --help then answers at once instead
# of loading torch and transformers first (seconds).

OUT_DIR = Path(__file__).resolve().parents[1] / "dllm_sparse" / "data" / "mdm_corpus"

TOPICS = [
    "photosynthesis", "the water cycle", "volcanoes", "earthquakes", "the solar system", "the moon", "black holes",
    "gravity", "electricity", "magnets", "sound waves", "rainbows", "clouds", "the ocean", "coral reefs",
    "rainforests", "deserts", "honey bees", "dolphins", "elephants", "penguins", "dinosaurs", "the human heart",
    "sleep", "healthy eating", "exercise", "drinking water", "vitamins", "the immune system", "the brain",
    "computers", "the internet", "smartphones", "programming", "robots", "artificial intelligence", "email",
    "passwords", "recycling", "solar energy", "wind power", "climate change", "trees", "gardening", "cooking pasta",
    "baking bread", "coffee", "tea", "chocolate", "soccer", "chess", "music", "the piano", "painting", "reading books",
    "libraries", "museums", "trains", "airplanes", "bicycles", "cars", "bridges", "money", "saving money",
    "time management", "friendship", "teamwork", "learning a language", "mathematics", "fractions",
    "the number zero", "maps", "the ancient Egyptians", "the Roman Empire", "writing letters", "public speaking",
    "job interviews", "weather forecasts", "snow", "mountains", "rivers", "birds", "cats", "dogs", "history",
]

TEMPLATES = [
    "Explain {t} in two sentences.",
    "What is {t}?",
    "Give me three facts about {t}.",
    "Why is {t} important?",
    "Describe {t} to a ten-year-old.",
    "Write a short poem about {t}.",
    "List two advantages and one disadvantage of {t}.",
    "Write one paragraph introducing {t}.",
    "What are common misconceptions about {t}?",
    "Give a simple tip related to {t}.",
    "Summarize what most people should know about {t}.",
    "Write a short story that involves {t}.",
    "How would you teach someone about {t}?",
    "Ask three interesting questions about {t}.",
    "Compare {t} with something from everyday life.",
    "What is a fun fact about {t}?",
    # Short-answer tasks, so that some answers end inside the budget and the model also learns to stop.
    "In one sentence, what is {t}?",
    "Answer briefly: what is {t} related to?",
    "Name one word that describes {t}.",
]


def instructions(seed: int) -> list[str]:
    """Every topic x template pair, in a seeded random order (the same list for the same seed)."""
    pairs = [tpl.format(t=topic) for topic in TOPICS for tpl in TEMPLATES]
    random.Random(seed).shuffle(pairs)
    return pairs


def _count(path: Path) -> int:
    return sum(1 for _ in path.open()) if path.is_file() else 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="AR teacher (a load_model name or path)")
    ap.add_argument("--n", type=int, default=1000, help="training examples")
    ap.add_argument("--heldout", type=int, default=64, help="held-out examples (distinct instructions)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts generated per batch (default: 16)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="answer tokens generated at most (default: 96)")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0, help="seed of the instruction order and the sampling (default: 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: the package corpus)")
    args = ap.parse_args(argv)
    import torch

    from dllm_sparse import load_model

    torch.set_num_threads(args.threads)

    lm = load_model(args.model, dtype="fp32")
    tok, model = lm.tokenizer, lm.model
    tok.padding_side = "left"
    pool = instructions(args.seed)
    if args.n + args.heldout > len(pool):
        raise SystemExit(f"only {len(pool)} distinct instructions; lower --n/--heldout or add topics/templates")
    # Held-out first in the shuffled order, so growing --n never moves an instruction across the split.
    splits = {"heldout": pool[: args.heldout], "train": pool[args.heldout : args.heldout + args.n]}
    args.out.mkdir(parents=True, exist_ok=True)
    eos = tok.eos_token_id
    t0 = time.time()
    for split, items in splits.items():
        path = args.out / f"{split}.jsonl"
        done = _count(path)
        for start in range(done, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            # Seed per batch: a resumed run draws the same answers as an uninterrupted one.
            torch.manual_seed(args.seed * 100003 + start + (0 if split == "train" else 50021))
            sample = args.temperature > 0
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=sample,
                                     temperature=args.temperature if sample else None, top_p=None, top_k=None,
                                     pad_token_id=eos, eos_token_id=eos)
            new = out[:, enc["input_ids"].shape[1]:]
            with path.open("a") as f:
                for i, (q, ids) in enumerate(zip(batch, new.tolist(), strict=True)):
                    finished = eos in ids
                    ids = ids[: ids.index(eos)] if finished else ids
                    rec = {"id": f"{split}-{start + i}", "instruction": q,
                           "response": tok.decode(ids, skip_special_tokens=True).strip(), "finished": finished}
                    f.write(json.dumps(rec) + "\n")
            print(f"{split} {start + len(batch)}/{len(items)}  {time.time() - t0:.0f}s", flush=True)
    meta = {
        "teacher": args.model, "seed": args.seed, "temperature": args.temperature, "top_p": None, "top_k": None,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "chat_template": True,
        "n_topics": len(TOPICS), "n_templates": len(TEMPLATES),
        "sizes": {s: _count(args.out / f"{s}.jsonl") for s in splits},
        "bytes": {s: (args.out / f"{s}.jsonl").stat().st_size for s in splits if (args.out / f"{s}.jsonl").is_file()},
        "wall_s_last_run": round(time.time() - t0, 1), "threads": args.threads,
        "command": "python experiments/make_distill_corpus.py " + " ".join(argv if argv is not None else
                                                                           __import__("sys").argv[1:]),
    }
    atomic_write_text(args.out / "corpus.json", json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
