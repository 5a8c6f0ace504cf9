"""Checks of everything a caller hands to `generate`, run before any work starts. Each error names the
argument and says what is allowed."""
import torch
from transformers import GenerationConfig


class UnsupportedOptionError(ValueError):
    """A transformers option specbeam does not implement. `specbeam.patch` hands such calls to the original
    `generate`; `Engine.generate` raises."""

    def __init__(self, option: str, why: str = "is not supported by specbeam"):
        super().__init__(f"{option} {why}")
        self.option = option


def check_input_ids(input_ids, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one prompt of at least one token, got {tuple(input_ids.shape)}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_attention_mask(attention_mask, input_ids: torch.Tensor) -> None:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, but input_ids has {tuple(input_ids.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("attention_mask leaves a prompt empty: every row needs at least one 1")
    # left padding: once a row's mask turns 1 it stays 1
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise UnsupportedOptionError("attention_mask with right padding or holes", "is not supported: pad on the left")


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_generation_config(config: GenerationConfig) -> None:
    """Values transformers lets through to crash later, or accepts silently."""
    _check_positive_int("num_beams", config.num_beams)
    _check_positive_int("num_return_sequences", config.num_return_sequences)
    _check_positive_int("max_new_tokens", config.max_new_tokens, minimum=0)
    _check_positive_int("max_length", config.max_length)
    _check_positive_int("min_new_tokens", config.min_new_tokens, minimum=0)
    _check_positive_int("top_k", config.top_k, minimum=0)
    if config.num_beams > 1 and config.num_return_sequences > config.num_beams:
        raise ValueError(
            f"num_return_sequences ({config.num_return_sequences}) must be <= num_beams ({config.num_beams})"
        )
    if config.num_beams == 1 and not config.do_sample and config.num_return_sequences > 1:
        raise ValueError("num_return_sequences > 1 needs sampling (do_sample=True) or beam search (num_beams > 1)")
    if config.do_sample:
        if config.temperature is not None and not config.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {config.temperature}")
        if config.top_p is not None and not 0 < config.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
        if config.min_p is not None and not 0 <= config.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {config.min_p}")
        if config.typical_p is not None and not 0 < config.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {config.typical_p}")
    if config.repetition_penalty is not None and not config.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {config.repetition_penalty}")
    if config.length_penalty is not None and not isinstance(config.length_penalty, (int, float)):
        raise TypeError(f"length_penalty must be a number, got {type(config.length_penalty).__name__}")
    if config.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {config.early_stopping!r}")
    _check_positive_int("no_repeat_ngram_size", config.no_repeat_ngram_size, minimum=0)


def check_token_ids(name: str, ids, vocab_size: int) -> None:
    """eos / pad ids given by the caller must be inside the vocabulary."""
    if ids is None:
        return
    for token in ids if isinstance(ids, (list, tuple)) else [ids]:
        if not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"{name} holds {token!r}, which is not a token id in [0, {vocab_size})")


def check_finite(logits: torch.Tensor, step: int) -> None:  # [rows, vocab]
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(f"the model produced non-finite logits (nan or inf) at decoding step {step}")
