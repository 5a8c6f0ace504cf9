"""Turns the arguments of `generate` into a validated `Request`: transformers' own `GenerationConfig`,
logits processors and stopping criteria, and the prompts with their left padding stripped."""
import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from specbeam.config import BEAM, SamplingParams
from specbeam.processing import Processors
from specbeam.validation import (
    UnsupportedOptionError,
    check_attention_mask,
    check_generation_config,
    check_input_ids,
    check_token_ids,
)

# generate() arguments specbeam does not implement; any value other than these defaults is refused
UNSUPPORTED_ARGUMENTS = {
    "prefix_allowed_tokens_fn": None,
    "synced_gpus": None,
    "negative_prompt_ids": None,
    "negative_prompt_attention_mask": None,
    "custom_generate": None,
    "assistant_tokenizer": None,
}
# GenerationConfig fields that select machinery specbeam does not implement, with their inert value
UNSUPPORTED_CONFIG = {
    "output_attentions": False,
    "output_hidden_states": False,
    "penalty_alpha": None,
    "dola_layers": None,
    "prompt_lookup_num_tokens": None,
    "token_healing": False,
    "guidance_scale": 1.0,
    "low_memory": False,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "constraints": None,
    "force_words_ids": None,
}
MODEL_KWARGS_ALLOWED = {"attention_mask", "use_cache"}


@dataclass
class Request:
    """One validated `generate` call."""

    input_ids: torch.Tensor  # [batch, length] as given, left padding included
    prompts: list[torch.Tensor]  # per row: [n_i] the real tokens
    config: GenerationConfig
    params: SamplingParams
    logits_processor: LogitsProcessorList
    stopping_criteria: StoppingCriteriaList


def build_request(model, inputs, generation_config, logits_processor, stopping_criteria, extra, kwargs) -> Request:
    """`extra`: the named generate() arguments beyond the common ones; `kwargs`: the rest."""
    for name, inert in UNSUPPORTED_ARGUMENTS.items():
        if extra.get(name, inert) not in (inert, False):
            raise UnsupportedOptionError(name)
    tokenizer = kwargs.pop("tokenizer", None)
    input_ids = _pop_input_ids(inputs, kwargs)
    vocab_size = model.config.get_text_config().vocab_size
    check_input_ids(input_ids, vocab_size)
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        check_token_ids(name, kwargs.get(name), vocab_size)
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is not None:
        check_attention_mask(attention_mask, input_ids)

    has_default_max_length = _has_default(model, generation_config, kwargs, "max_length")
    has_default_min_length = _has_default(model, generation_config, kwargs, "min_length")
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    _refuse_unsupported(config, model_kwargs)
    check_generation_config(config)
    model._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device)
    if attention_mask is None:
        attention_mask = model._prepare_attention_mask_for_generation(input_ids, config, {})
        check_attention_mask(attention_mask, input_ids)

    length = input_ids.shape[1]
    config = model._prepare_generated_length(
        config, has_default_max_length, has_default_min_length, "input_ids", length, input_ids
    )
    model._validate_generated_length(config, length, has_default_max_length)
    params = SamplingParams.from_generation_config(config)
    rows = params.rows_per_prompt
    padded = input_ids.repeat_interleave(rows, dim=0)
    processors = Processors(model._get_logits_processor(
        generation_config=_without_warpers(config) if params.warpers is not None else config,
        input_ids_seq_length=length,
        encoder_input_ids=padded,
        logits_processor=logits_processor if logits_processor is not None else LogitsProcessorList(),
        device=input_ids.device,
        model_kwargs={"attention_mask": attention_mask.repeat_interleave(rows, dim=0)},
    ))
    criteria = model._get_stopping_criteria(
        generation_config=config,
        stopping_criteria=stopping_criteria if stopping_criteria is not None else StoppingCriteriaList(),
        tokenizer=tokenizer,
    )
    prompts = [row[mask.bool()] for row, mask in zip(input_ids, attention_mask)]
    return Request(padded, prompts, config, params, processors, criteria)


def _without_warpers(config: GenerationConfig) -> GenerationConfig:
    """The config whose processors leave out the warpers that the fused filter applies instead."""
    config = copy.deepcopy(config)
    config.do_sample = False  # transformers adds its warpers only when sampling
    return config


def _pop_input_ids(inputs, kwargs) -> torch.Tensor:
    if "inputs_embeds" in kwargs:
        raise UnsupportedOptionError("inputs_embeds", "is not supported: pass input_ids")
    input_ids = kwargs.pop("input_ids", None)
    if inputs is not None and input_ids is not None:
        raise ValueError("pass the prompt once: as inputs or as input_ids, not both")
    input_ids = inputs if inputs is not None else input_ids
    if input_ids is None:
        raise ValueError("input_ids is required: specbeam does not generate from an empty prompt")
    return input_ids


def _has_default(model, generation_config, kwargs, name: str) -> bool:
    """transformers' rule: the length was set neither by the caller nor by the model's config."""
    return (
        kwargs.get(name) is None
        and (generation_config is None or getattr(generation_config, name) is None)
        and getattr(model.generation_config, name) is None
    )


def _refuse_unsupported(config: GenerationConfig, model_kwargs: dict) -> None:
    for name, inert in UNSUPPORTED_CONFIG.items():
        if getattr(config, name, None) not in (None, inert):
            raise UnsupportedOptionError(name)
    if config.num_beams > 1 and config.do_sample:
        raise UnsupportedOptionError("do_sample=True with num_beams > 1", "(beam sampling) is not supported")
    unknown = sorted(set(model_kwargs) - MODEL_KWARGS_ALLOWED)
    if unknown:
        raise UnsupportedOptionError(", ".join(unknown), "is not supported: specbeam takes input_ids and attention_mask")
