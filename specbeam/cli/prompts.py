"""Prompt files for `eval`: JSON lines `{"prompt": ..., "answer": optional}`."""
import json
from dataclasses import dataclass
from pathlib import Path

from specbeam.cli.errors import CliError


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    answer: str | None = None  # the expected first line of the completion

    def matches(self, completion: str) -> bool:
        """Exact match: the completion's first line, stripped, is the answer, stripped."""
        return completion.split("\n", 1)[0].strip() == self.answer.strip()


def read_prompts(path: Path) -> list[PromptCase]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise CliError(f"cannot read the prompts file: {error}") from error
    cases = [parse_line(line, f"{path}:{number}") for number, line in enumerate(lines, 1) if line.strip()]
    if not cases:
        raise CliError(f"{path} holds no prompts")
    return cases


def parse_line(line: str, where: str) -> PromptCase:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CliError(f"{where}: not JSON ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise CliError(f'{where}: each line must be an object with a string "prompt"')
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise CliError(f'{where}: "answer" must be a string when given')
    return PromptCase(record["prompt"], answer)
