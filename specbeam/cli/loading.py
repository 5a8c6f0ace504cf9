"""What `generate` and `eval` share: their model options, loading local models and tokenizers, encoding prompts."""
import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from specbeam import Engine
from specbeam.config import DRAFT_WEIGHTS, SpecConfig

from specbeam.cli.errors import CliError


def add_common_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    parser.add_argument("--model", type=Path, required=model_required,
                        help="local transformers model directory (the target)")
    parser.add_argument("--draft", default=None, help='local draft model directory, or "ngram" (default: none)')
    add_draft_weights(parser)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory (default: the model's, else a sibling 'tokenizer' directory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: the checkpoint's dtype on a GPU, float32 on the CPU")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def add_draft_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft-weights", default=None, choices=[w for w in DRAFT_WEIGHTS if w],
                        help="read the draft's linear weights rounded to bfloat16 or quantized to int8 (the output "
                             "stays the target's; on the CPU a float32 draft streams fewer bytes)")


def model_dtype(name: str, device: str) -> torch.dtype | str:
    if name == "auto":
        return "auto" if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise CliError(f"the {what} directory {path} does not exist (only local models are loaded)")
    return path


def load_model(path: Path, args: argparse.Namespace) -> PreTrainedModel:
    existing_dir(path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=model_dtype(args.dtype, args.device), local_files_only=True)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load a causal LM from {path}: {error}") from error
    return model.to(args.device).eval()


def tokenizer_dir(model_dir: Path, explicit: Path | None) -> Path:
    """`--tokenizer` if given; else the model's directory, or `<model>/../tokenizer` when only that has one."""
    if explicit is not None:
        return explicit
    existing_dir(model_dir, "model")
    sibling = model_dir.parent / "tokenizer"
    if not (model_dir / "tokenizer_config.json").exists() and sibling.is_dir():
        return sibling
    return model_dir


def load_tokenizer(args: argparse.Namespace) -> PreTrainedTokenizerBase:
    path = existing_dir(tokenizer_dir(args.model, args.tokenizer), "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load a tokenizer from {path}: {error}") from error


def load_engine(args: argparse.Namespace) -> tuple[PreTrainedModel, Engine]:
    """The `--model` and a specbeam engine over it with the `--draft`."""
    target = load_model(args.model, args)
    draft = args.draft if args.draft in (None, "ngram") else load_model(Path(args.draft), args)
    return target, Engine(target, draft_model=draft, spec=SpecConfig(draft_weights=args.draft_weights))


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, device, chat: bool = False) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask [1, prompt_len]; with `chat`, the prompt as one user turn of the
    tokenizer's chat template, ready for the assistant's answer."""
    if chat:
        if tokenizer.chat_template is None:
            raise CliError(
                f"tokenizer {tokenizer.name_or_path} has no chat template: drop --chat to use the prompt raw")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)
    return {name: encoded[name].to(device) for name in ("input_ids", "attention_mask")}
