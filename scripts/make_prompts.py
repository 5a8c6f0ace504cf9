"""Write specbeam/assets/prompts.jsonl: code prefixes from the stdlib files that `train_pair.py` held out.

    python scripts/make_prompts.py    # deterministic for a given Python standard library

Each prompt is the CONTEXT_LINES lines before a chosen line of a held-out file (so it ends at a line break);
its `answer` is that line. Chosen lines are unindented code of moderate length, neither comments nor inside
strings, picked with a fixed seed, one file after another until COUNT prompts. Unindented, because the
byte-level BPE merges a line break with the indentation after it: in training, a bare line break only ever
preceded an unindented line.
"""
import io
import json
import random
import sysconfig
import tokenize
from itertools import chain, zip_longest
from pathlib import Path

from train_pair import CorpusConfig, read_source, stdlib_files

COUNT = 20
CONTEXT_LINES = 12
SEED = 0
STDLIB = Path(sysconfig.get_paths()["stdlib"])  # the root `stdlib_files` searches
OUT = Path(__file__).resolve().parents[1] / "specbeam/assets/prompts.jsonl"


def is_answer_line(line: str) -> bool:
    """A line worth predicting: unindented code of 8 to 60 characters, not a comment."""
    text = line.rstrip()
    return 8 <= len(text) <= 60 and not text[0].isspace() and not text.startswith("#")


def string_rows(source: str) -> set[int]:
    """0-based indices of the lines that continue a multi-line string (docstrings): text, not code."""
    rows = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.STRING:
            rows.update(range(token.start[0], token.end[0]))  # rows are 1-based: the continuation lines
    return rows


def file_prompts(path: Path, rng: random.Random, context_lines: int = CONTEXT_LINES) -> list[dict]:
    """Every answer line of one file with its prompt (the context_lines lines before it), in a random order."""
    source = read_source(path)
    lines, in_string = source.splitlines(keepends=True), string_rows(source)
    indices = [i for i in range(context_lines, len(lines)) if is_answer_line(lines[i]) and i not in in_string]
    return [{"prompt": "".join(lines[i - context_lines: i]), "answer": lines[i].rstrip("\n"),
             "source": f"{path.relative_to(STDLIB).as_posix()}:{i + 1}"} for i in rng.sample(indices, len(indices))]


def main() -> None:
    _, heldout = stdlib_files(CorpusConfig())
    rng = random.Random(SEED)
    per_file = [file_prompts(path, rng) for path in heldout]
    # round robin over the files: each one's first prompt, then each one's second, ...
    prompts = [p for p in chain.from_iterable(zip_longest(*per_file)) if p is not None][:COUNT]
    OUT.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    print(f"wrote {len(prompts)} prompts from the {len(heldout)} held-out files to {OUT}")


if __name__ == "__main__":
    main()
