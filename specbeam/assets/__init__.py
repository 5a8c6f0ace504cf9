"""The shipped target/draft pair: two Llamas trained on the Python standard library's sources, and a middle
stage for a cascade of drafts.

`pair/` holds `target/`, `draft/`, `mid/` (safetensors in bfloat16), `tokenizer/` and `metrics.json`; see
`scripts/train_pair.py` for how they were made and how to retrain them.
"""
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

PAIR_DIR = Path(__file__).parent / "pair"


def load_pair(
    path: Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """(target, draft, tokenizer) from a directory written by `scripts/train_pair.py`, models in eval mode."""
    target, draft = (
        AutoModelForCausalLM.from_pretrained(path / name, dtype=dtype, local_files_only=True).eval()
        for name in ("target", "draft")
    )
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    return target, draft, tokenizer


def load_default_pair(
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """The pair shipped inside the package, loaded offline; weights are stored in bfloat16 and cast to dtype."""
    return load_pair(PAIR_DIR, dtype)


def load_default_cascade(
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, list[PreTrainedModel], PreTrainedTokenizerBase]:
    """(target, [draft, mid], tokenizer): the shipped target and its two drafts, smallest first, for
    `Engine(target, draft_model=drafts)`."""
    target, draft, tokenizer = load_default_pair(dtype)
    mid = AutoModelForCausalLM.from_pretrained(PAIR_DIR / "mid", dtype=dtype, local_files_only=True).eval()
    return target, [draft, mid], tokenizer
