"""A synthetic chat task with checkable answers, for showing that finetune.py works in minutes on a CPU.

    python data/chat_tasks.py            # -> data/chat_tasks/train.json (4,000) and heldout.json (200)
    python finetune.py --data data/chat_tasks/train.json --val-data data/chat_tasks/heldout.json
    python eval.py --chat-eval data/chat_tasks/heldout.json      # exact-match accuracy, before and after

Four instructions over short phrases of common words: repeat the phrase, give its first word, give its last
word, count its words. Each needs the model to read the user's turn (copying and position lookups, which small
transformers learn quickly) and to stop after the answer. Held-out phrases never occur in the training file.
Deterministic for a given --seed.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import atomic_write  # noqa: E402
from runs import OneLineParser  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "chat_tasks"
WORDS = """king queen lord lady night day love heart crown sword blood tears honour death life world heaven
earth fire water stone gold silver rose moon sun star sea wind storm rain field house gate tower castle
court garden forest river mountain bird horse dog lion eagle wolf lamb friend enemy brother sister father
mother son daughter child soldier servant master prince duke fool knight poet letter book song word name
voice face hand eye head tongue soul spirit ghost dream hope fear joy grief anger peace war battle army
ship bread wine cup table chair bed door window candle letter ring gift coin purse cloak shoe hat glove
""".split()
NUMBER_WORDS = {3: "three", 4: "four", 5: "five", 6: "six"}
SYSTEM_PROMPTS = ["You answer briefly.", "You are a helpful assistant.", "Answer with the words asked for."]


def phrase(rng: random.Random) -> list[str]:
    return rng.sample(sorted(set(WORDS)), rng.randint(3, 6))


def conversation(rng: random.Random, words: list[str]) -> dict:
    """One user instruction about `words` and the exact reply."""
    text = " ".join(words)
    task = rng.choice(["repeat", "first", "last", "count"])
    user, reply = {
        "repeat": (f"Repeat after me: {text}", text),
        "first": (f"What is the first word of: {text}", words[0]),
        "last": (f"What is the last word of: {text}", words[-1]),
        "count": (f"How many words are in: {text}", NUMBER_WORDS[len(words)]),
    }[task]
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"task": task, "messages": messages}


def build(num_train: int, num_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    heldout_phrases: set[tuple[str, ...]] = set()
    while len(heldout_phrases) < num_heldout:
        heldout_phrases.add(tuple(phrase(rng)))
    heldout = [conversation(rng, list(p)) for p in sorted(heldout_phrases)]
    rng.shuffle(heldout)
    train = []
    while len(train) < num_train:
        words = phrase(rng)
        if tuple(words) not in heldout_phrases:
            train.append(conversation(rng, words))
    return train, heldout


def write(path: Path, conversations: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(json.dumps({"conversations": conversations}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="data/chat_tasks.py", description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(OUT_DIR))
    args = p.parse_args(argv)
    for flag, value in (("--train", args.train), ("--heldout", args.heldout)):
        if value < 1:
            p.error(f"{flag}={value} must be at least 1")
    train, heldout = build(args.train, args.heldout, args.seed)
    try:
        write(Path(args.out_dir) / "train.json", train)
        write(Path(args.out_dir) / "heldout.json", heldout)
    except OSError as e:
        p.exit(2, f"data/chat_tasks.py: error: {e.filename or args.out_dir}: cannot write ({e.strerror})\n")
    print(f"{args.out_dir}: train.json {len(train)}, heldout.json {len(heldout)} conversations")


if __name__ == "__main__":
    main()
