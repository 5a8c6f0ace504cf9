"""Write specbeam/assets/prompts.jsonl: code prefixes from the stdlib files that `train_pair.py` held out.

    python scripts/make_prompts.py    # deterministic for a given Python standard library

Each prompt is the CONTEXT_LINES lines before a chosen line of a held-out file (so it ends at a line break);
its `answer` is that line. Chosen lines are plain code, neither blank nor comment, of moderate length, picked
with a fixed seed, one file after another until COUNT prompts.
"""
import json
import random
import sysconfig
from pathlib import Path

from train_pair import CorpusConfig, read_source, stdlib_files

COUNT = 20
CONTEXT_LINES = 12
SEED = 0
STDLIB = Path(sysconfig.get_paths()["stdlib"])  # the root `stdlib_files` searches
OUT = Path(__file__).resolve().parents[1] / "specbeam/assets/prompts.jsonl"


def is_answer_line(line: str) -> bool:
    """A line worth predicting: code of 8 to 60 characters, not a comment."""
    text = line.strip()
    return 8 <= len(text) <= 60 and not text.startswith("#")


def pick_prompt(path: Path, rng: random.Random) -> dict:
    lines = read_source(path).splitlines(keepends=True)
    candidates = [i for i in range(CONTEXT_LINES, len(lines)) if is_answer_line(lines[i])]
    i = rng.choice(candidates)
    return {"prompt": "".join(lines[i - CONTEXT_LINES: i]), "answer": lines[i].rstrip("\n"),
            "source": f"{path.relative_to(STDLIB).as_posix()}:{i + 1}"}


def main() -> None:
    _, heldout = stdlib_files(CorpusConfig())
    rng = random.Random(SEED)
    prompts = [pick_prompt(heldout[n % len(heldout)], rng) for n in range(COUNT)]
    OUT.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    print(f"wrote {len(prompts)} prompts from {len(heldout)} held-out files to {OUT}")


if __name__ == "__main__":
    main()
