"""Local lm-evaluation-harness tasks from the held-out Shakespeare works (no network), for an exported model.

    python data/lm_eval_tasks.py          # -> data/lm_eval/: two task YAMLs and their JSONL data
    python export.py --out my-gpt
    lm_eval --model hf --model_args pretrained=my-gpt,trust_remote_code=True,dtype=float32 --device cpu \
        --tasks shakespeare_mc --include_path data/lm_eval
    lm_eval --model hf --model_args pretrained=my-gpt,trust_remote_code=True,dtype=float32,add_bos_token=False \
        --device cpu --tasks shakespeare_rolling --include_path data/lm_eval
    python eval.py --dtype fp32 --hellaswag data/lm_eval/shakespeare_mc.jsonl      # the same acc and acc_norm

- shakespeare_mc: HellaSwag's format (ctx, endings, label). The context is three consecutive verse lines of one
  speech; the right ending is the line that follows, the three others are lines from elsewhere in the same work.
  Only examples whose context and ending tokenize apart as they do together are kept, so eval.py (which encodes
  them separately) and lm-eval (which encodes them together and splits) score the same tokens.
- shakespeare_rolling: passages of exactly --rolling-tokens tokens, scored whole by loglikelihood_rolling
  (word and byte perplexity, bits per byte). Its add_bos_token=False is needed because lm-eval puts its own prefix
  token (<|endoftext|>, the tokenizer's BOS) before each document.

Reads data/shakespeare/shakespeare_val_*.bin (`python data/shakespeare.py` writes it); idempotent.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

import model as M  # noqa: E402

OUT_DIR = REPO_DIR / "data" / "lm_eval"
VAL_FILES = REPO_DIR / "data" / "shakespeare" / "shakespeare_val_*.bin"
CONTEXT_LINES = 3
VERSE = re.compile(r"[A-Z][A-Za-z ,;:'!?.-]{19,70}")  # one line of a speech: no speaker names, stage directions
# in brackets, digits or non-ASCII (lm-eval's acc_norm counts characters, eval.py's too; ASCII keeps them bytes)

MC_YAML = """task: shakespeare_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
ROLLING_YAML = """task: shakespeare_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def held_out_works(pattern: Path = VAL_FILES) -> list[str]:
    """The validation works as text: each shard document (after its <|endoftext|>) decoded."""
    tok = M.get_tokenizer()
    files = M.list_shards(str(pattern))
    if not files:
        raise M.DataError(f"no validation shards at {pattern}: run `python data/shakespeare.py` first")
    works = []
    for f in files:
        ids = M._load_data_shard(f).tolist()
        starts = [i for i, t in enumerate(ids) if t == M.EOT_ID] + [len(ids)]
        works += [tok.decode(ids[a + 1:b]) for a, b in zip(starts, starts[1:]) if b > a + 1]
    return works


def speeches(work: str) -> list[list[str]]:
    """Runs of consecutive verse lines (a blank line or a non-verse line ends a run)."""
    runs, current = [], []
    for line in work.splitlines():
        line = line.strip()
        if VERSE.fullmatch(line) and not line.isupper():
            current.append(line)
        else:
            if len(current) > CONTEXT_LINES:
                runs.append(current)
            current = []
    return runs


def splits_cleanly(tok: M.Tokenizer, ctx: str, ending: str) -> bool:
    return tok.encode(f"{ctx} {ending}") == tok.encode(ctx) + tok.encode(f" {ending}")


def choice_records(works: list[str], n: int, seed: int) -> list[dict]:
    tok, rng, records = M.get_tokenizer(), random.Random(seed), []
    pools = [(runs, sorted({line for run in runs for line in run})) for runs in map(speeches, works)]
    pools = [p for p in pools if p[0]]
    while len(records) < n:
        runs, lines = rng.choice(pools)
        run = rng.choice(runs)
        i = rng.randrange(CONTEXT_LINES, len(run))
        ctx, truth = " ".join(run[i - CONTEXT_LINES:i]), run[i]
        wrong = rng.sample([line for line in lines if line != truth], 3)
        endings = [truth, *wrong]
        rng.shuffle(endings)
        if all(splits_cleanly(tok, ctx, e) for e in endings):
            records.append(dict(ctx=ctx, endings=endings, label=endings.index(truth)))
    return records


def passages(works: list[str], n: int, tokens: int, seed: int) -> list[dict]:
    """n passages of exactly `tokens` tokens that start at a line and re-encode to the same ids."""
    tok, rng, out = M.get_tokenizer(), random.Random(seed), []
    encoded = [tok.encode(w) for w in works]
    newline = tok.encode("\n")[0]
    while len(out) < n:
        ids = rng.choice(encoded)
        if len(ids) <= tokens + 1:
            continue
        start = rng.randrange(len(ids) - tokens)
        while start < len(ids) - tokens and ids[start - 1] != newline:
            start += 1
        text = tok.decode(ids[start:start + tokens])
        if tok.encode(text) == ids[start:start + tokens] and text.strip():
            out.append(dict(text=text))
    return out


def write_tasks(out_dir: Path, works: list[str], *, choices: int = 200, rolling: int = 8, rolling_tokens: int = 1024,
                seed: int = 0) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    mc, text = out_dir / "shakespeare_mc.jsonl", out_dir / "shakespeare_text.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in choice_records(works, choices, seed)))
    text.write_text("".join(json.dumps(r) + "\n" for r in passages(works, rolling, rolling_tokens, seed)))
    (out_dir / "shakespeare_mc.yaml").write_text(MC_YAML.format(data=mc.resolve()))
    (out_dir / "shakespeare_rolling.yaml").write_text(ROLLING_YAML.format(data=text.resolve()))
    return dict(mc=mc, text=text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lm_eval_tasks.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(OUT_DIR))
    p.add_argument("--choices", type=int, default=200, help="multiple-choice examples")
    p.add_argument("--rolling", type=int, default=8, help="passages for the rolling log-likelihood task")
    p.add_argument("--rolling-tokens", type=int, default=1024,
                   help="tokens per passage: a multiple of the checkpoint's row length keeps lm-eval's windows equal "
                   "to eval.py's rows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        files = write_tasks(Path(args.out), held_out_works(), choices=args.choices, rolling=args.rolling,
                            rolling_tokens=args.rolling_tokens, seed=args.seed)
    except M.USER_ERRORS as e:
        print(f"lm_eval_tasks.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{files['mc']}: {args.choices} examples; {files['text']}: {args.rolling} passages of "
          f"{args.rolling_tokens} tokens; tasks shakespeare_mc, shakespeare_rolling in {args.out}")


if __name__ == "__main__":
    main()
