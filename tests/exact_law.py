"""Exact laws of short sampled continuations, for goodness-of-fit tests of sampling.

A vocab-8 Llama makes the joint law of 3 new tokens 512 cells, enumerated exactly: the model's float64 forward
on every prefix, then transformers' own logits processors (not specbeam's) applied to that prefix's logits, as
transformers' `generate` applies them under sampling."""
import itertools

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB8 = 8


def vocab8_model(seed: int = 0, noise: float = 0.0, noise_seed: int = 1) -> LlamaForCausalLM:
    """A one-layer float64 Llama over 8 tokens, its output weights scaled up 6x (sharper next-token laws), without
    eos or pad; `noise` adds Gaussian noise of that scale to every weight (a draft that agrees with the
    seed-`seed` model more or less)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
        if noise:
            generator = torch.Generator().manual_seed(noise_seed)
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * noise)
    return model


def sampling_processors(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        repetition_penalty: float = 1.0) -> LogitsProcessorList:
    """transformers' processors for these `generate` arguments, in the order its `generate` applies them."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


@torch.no_grad()
def next_token_probs(model, prefixes: torch.Tensor, processors: LogitsProcessorList) -> torch.Tensor:
    """[rows, n] unpadded prefixes -> [rows, vocab] float64: the processed law of the next token after each."""
    logits = model(prefixes).logits[:, -1].to(torch.float32)  # the engine processes float32 logits
    return processors(prefixes, logits).double().softmax(dim=-1)


def exact_joint(model, prompt: torch.Tensor, processors: LogitsProcessorList, new_tokens: int) -> torch.Tensor:
    """[1, n] prompt -> [vocab ** new_tokens] float64 on the CPU: the probability of each continuation, at cell
    x1 * vocab^(k-1) + ... + xk (as `cells` numbers them). Runs where the prompt is."""
    vocab, device = model.config.vocab_size, prompt.device
    joint = torch.ones(1, dtype=torch.float64, device=device)
    for step in range(new_tokens):
        continuations = torch.tensor(list(itertools.product(range(vocab), repeat=step)), dtype=torch.long,
                                     device=device).reshape(vocab ** step, step)
        prefixes = torch.cat([prompt.expand(vocab ** step, -1), continuations], dim=1)
        joint = (joint[:, None] * next_token_probs(model, prefixes, processors)).flatten()
    return joint.cpu()


def cells(sequences: torch.Tensor, prompt_len: int, vocab: int) -> torch.Tensor:
    """[rows, prompt_len + k] -> [vocab ** k] counts of each continuation cell."""
    new = sequences[:, prompt_len:].cpu()
    index = torch.zeros(new.shape[0], dtype=torch.long)
    for column in new.T:
        index = index * vocab + column
    return torch.bincount(index, minlength=vocab ** new.shape[1])


def marginal(joint: torch.Tensor, vocab: int, keep: int) -> torch.Tensor:
    """The law (or counts) of the first `keep` tokens out of a joint over more."""
    return joint.reshape(vocab ** keep, -1).sum(dim=1)


def pooled(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells whose expected count is below `min_expected` merged into one (cells of probability zero kept
    apart, so that a count there still shows), so that a chi-square test's approximation holds."""
    counts, probs = counts.double().cpu(), probs.double().cpu()
    expected = probs * counts.sum()
    rare = (expected < min_expected) & (probs > 0)
    keep = ~rare
    return (torch.cat([counts[keep], counts[rare].sum()[None]]), torch.cat([probs[keep], probs[rare].sum()[None]]))


def lookup_prompt(model, processors: LogitsProcessorList, head=(3, 1), middle: int = 5) -> torch.Tensor:
    """[1, 7] prompt `head, b, c, middle, head`: n-gram lookup finds `head` earlier and drafts the chain b, c;
    (b, c) is the pair the target is likeliest to emit after this very prompt, so that the drafted chain is
    accepted at depth 2 as often as a lookup can be."""
    pairs = [(b, c) for b in range(model.config.vocab_size) for c in range(model.config.vocab_size)
             if (b, c) != tuple(head)]  # (head) itself would make the lookup match later in the prompt
    prompts = torch.tensor([[*head, b, c, middle, *head] for b, c in pairs], device=model.device)
    first = next_token_probs(model, prompts, processors)
    drafted = torch.tensor(pairs, device=model.device)
    second = next_token_probs(model, torch.cat([prompts, drafted[:, :1]], dim=1), processors)
    likelihood = first.gather(1, drafted[:, :1])[:, 0] * second.gather(1, drafted[:, 1:])[:, 0]
    return prompts[int(likelihood.argmax())][None]
