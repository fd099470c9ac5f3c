"""HellaSwag's official validation set (10,042 four-way sentence completions), for eval.py's multiple-choice score.

    python data/hellaswag.py                       # -> data/hellaswag/hellaswag_val.jsonl (about 11 MB)
    python eval.py --hellaswag data/hellaswag/hellaswag_val.jsonl

Downloads the file the HellaSwag authors publish (github.com/rowanz/hellaswag, data/hellaswag_val.jsonl), checks
that every line is a record with ctx, endings and label and that there are 10,042 of them, then moves it into
place. Needs internet; idempotent (a valid file already in place is kept).
"""
from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs.py, for the download's progress bar

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
NUM_EXAMPLES = 10_042  # validation split size reported by the HellaSwag paper (Zellers et al., 2019)
OUT = Path(__file__).resolve().parent / "hellaswag" / "hellaswag_val.jsonl"


def check(path: Path) -> int:
    """Number of valid records; raises ValueError naming the first bad line."""
    count = 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        record = json.loads(line)
        if not (isinstance(record.get("ctx"), str) and len(record.get("endings", [])) == 4
                and record.get("label") in (0, 1, 2, 3)):
            raise ValueError(f"{path}:{n}: not a HellaSwag record (ctx, 4 endings, label 0-3)")
        count += 1
    return count


def fetch(out: Path = OUT) -> Path:
    if out.is_file():
        try:
            if check(out) == NUM_EXAMPLES:
                return out
        except ValueError:
            pass
    from runs import progress  # imports torch: only when there is something to download

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with urllib.request.urlopen(URL, timeout=60) as response, open(tmp, "wb") as f, \
            progress(desc=out.name, total=int(response.headers.get("Content-Length") or 0) or None, unit="B",
                     unit_scale=True) as bar:
        while chunk := response.read(1 << 16):
            f.write(chunk)
            bar.update(len(chunk))
    count = check(tmp)
    if count != NUM_EXAMPLES:
        raise ValueError(f"{URL}: {count} records, expected {NUM_EXAMPLES}")
    os.replace(tmp, out)
    return out


def main() -> None:
    try:
        path = fetch()
    except (OSError, ValueError) as e:  # URLError is an OSError
        print(f"hellaswag.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{path}: {NUM_EXAMPLES} examples")


if __name__ == "__main__":
    main()
