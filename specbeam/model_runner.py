"""Runs any Hugging Face decoder through specbeam's attention: every new token of every sequence is packed
into one `[1, T]` row, K/V go to the paged cache, and attention reads them back through block tables."""
import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface, PreTrainedModel

from specbeam import ops
from specbeam.cache import BlockTable, PagedKVCache
from specbeam.config import EngineConfig
from specbeam.lean_decoder import LeanDecoder, unsupported_reason

ATTENTION_NAME = "specbeam"


@dataclass
class StepMetadata:
    """What the attention of one forward needs, shared by all layers."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [num_tokens]
    plan: tuple  # from `ops.plan_attention`

    def attend(self, layer: int, query, key, value, scale: float | None = None) -> torch.Tensor:
        """Store this forward's K/V in the paged cache, then attend over it.
        query: [T, Hq, D]; key, value: [T, Hkv, D] -> [T, Hq, D]."""
        ops.store_kv(*self.cache.slots[layer], key, value, self.slot_mapping)
        return ops.attend(query, *self.cache.layers[layer], self.plan, scale, key, value)


def specbeam_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`AttentionInterface` entry. query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    step: StepMetadata = kwargs["specbeam_step"]
    out = step.attend(module.layer_idx, *(x[0].transpose(0, 1) for x in (query, key, value)), scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, specbeam_attention)


class UnsupportedModelError(ValueError):
    """The model cannot run through specbeam's attention."""


def check_model(model: PreTrainedModel) -> None:
    config = model.config
    if config.is_encoder_decoder:
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder; specbeam runs decoder-only models")
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(f"{type(model).__name__} does not route attention through AttentionInterface")
    for name in ("attn_logit_softcapping", "reorder_and_upcast_attn"):
        if getattr(config, name, None):
            raise UnsupportedModelError(f"model config sets {name}, which specbeam's attention does not implement")


class ModelRunner:
    """Owns one model's cache geometry and runs packed forwards through the attention hook."""

    def __init__(self, model: PreTrainedModel, engine_config: EngineConfig, weights: str | None = None):
        """weights: how the lean decoder reads the linear weights (a draft's option, `SpecConfig.draft_weights`)."""
        check_model(model)
        self.model, self.attention_backend = model, engine_config.attention_backend
        self.device, self.dtype = model.device, model.dtype  # where and how the weights are (read once)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]  # logits per scored token
        use_lean = engine_config.lean_decoder and unsupported_reason(model) is None
        if weights is not None and not use_lean:
            raise ValueError(f"draft_weights={weights!r} is for Llama-family drafts run by the lean decoder; "
                             f"{unsupported_reason(model) or 'lean_decoder is off'}")
        self.lean = LeanDecoder(model, weights) if use_lean else None
        config = model.config.get_text_config()
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.sliding_window = getattr(config, "sliding_window", None)

    def bytes_per_token(self) -> int:
        """KV bytes one position costs across all layers (K and V)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:  # zeroed pools, paged in as used
        shape = (self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return PagedKVCache(*shape, dtype=self.dtype, device=self.device)

    def forward(self, cache: PagedKVCache, works: list["Work"]) -> torch.Tensor:  # [sum of num_logits, vocab]
        """One packed forward over every sequence's new tokens; their K/V go to the slots reserved for them.
        Returns the logits of each work's last `num_logits` tokens, in order."""
        batch = pack(cache, works, self.device, self.attention_backend)
        if self.lean is not None:
            return self.lean(batch.input_ids, batch.positions, batch.logit_rows, batch.step.attend,
                             batch.num_positions)
        with self._specbeam_attention():
            out = self.model(input_ids=batch.input_ids[None], position_ids=batch.positions[None],
                             logits_to_keep=batch.logit_rows, use_cache=False, specbeam_step=batch.step)
        return out.logits[0]

    @contextmanager
    def _specbeam_attention(self):
        config = self.model.config
        saved = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        try:
            yield
        finally:
            config._attn_implementation = saved


@dataclass
class Work:
    """What one sequence feeds to a forward: new tokens after the `table.length` positions already cached."""

    table: BlockTable
    tokens: list[int]  # [n] new token ids
    num_logits: int  # score the last num_logits of them (0: none, a prefill)
    depths: list[int] | None = None  # [n] offsets from table.length; None: 0..n-1
    parents: list[int] | None = None  # [n] each new token's parent among them (-1: none); None: a causal chain


@dataclass
class PackedBatch:
    """A forward's inputs as flat tensors on the model's device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    logit_rows: torch.Tensor  # [R] rows of the T tokens to score
    step: StepMetadata
    num_positions: int  # every position is below it (the longest sequence's length)


def pack(cache: PagedKVCache, works: list[Work], device, attention_backend: str | None) -> PackedBatch:
    """Reserve every work's slots (copy on write included) and lay the forward out flat: the per-token and
    per-sequence integers, block tables included, travel to the device as one tensor."""
    starts = [w.table.length for w in works]
    slots = [slot for w in works for slot in cache.reserve(w.table, len(w.tokens))]
    cache.flush()
    counts = [len(w.tokens) for w in works]
    query_start_loc = [0, *itertools.accumulate(counts)]
    positions = [s + d for s, w, n in zip(starts, works, counts) for d in (w.depths or range(n))]
    logit_rows = [q - k for q, w in zip(query_start_loc[1:], works) for k in range(w.num_logits, 0, -1)]
    tokens = [t for w in works for t in w.tokens]
    seq_lens = [w.table.length for w in works]
    num_positions, width = max(seq_lens), max(len(w.table.blocks) for w in works)
    tables = [b for w in works for b in w.table.blocks + [0] * (width - len(w.table.blocks))]  # padded to width
    parts = (tokens, positions, slots, logit_rows, seq_lens, query_start_loc, tables)
    sizes = [len(p) for p in parts]  # (numpy reads the ints 4x faster than torch.tensor does)
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(parts), np.int64, sum(sizes))).to(device)
    tokens, positions, slots, logit_rows, seq_lens, query_start_loc, tables = flat.split_with_sizes(sizes)
    masks = None if all(w.parents is None for w in works) else _pack_tree_masks(works).to(device)
    plan = ops.plan_attention(tables.view(len(works), width), seq_lens, query_start_loc, masks, cache.block_size,
                              backend=attention_backend, fresh=not any(starts))
    return PackedBatch(tokens, positions, logit_rows, StepMetadata(cache, slots, plan), num_positions)


def _pack_tree_masks(works: list[Work]) -> torch.Tensor:  # [num_tokens, max_new] bool
    """Row t: which new tokens of its work token t sees, itself and its ancestors (a causal chain where the work
    gives no parents), padded to the widest work. Built for every work at once, one level of ancestors per pass:
    as many passes as the deepest token has ancestors among the new tokens."""
    counts = [len(w.tokens) for w in works]
    first = np.repeat(np.cumsum([0, *counts[:-1]]), counts)  # [T] each token's work's first token
    parents = np.concatenate([np.asarray(w.parents if w.parents is not None else range(-1, n - 1), dtype=np.int64)
                              for w, n in zip(works, counts)])
    up = np.where(parents >= 0, parents + first, -1)  # [T] the parent as a token of the whole forward
    mask = np.zeros((len(up), max(counts)), dtype=bool)
    rows = np.arange(len(up))
    ancestors = rows  # row t's ancestor this many levels up
    while rows.size:
        mask[rows, ancestors - first[rows]] = True
        ancestors = up[ancestors]
        rows, ancestors = rows[ancestors >= 0], ancestors[ancestors >= 0]
    return torch.from_numpy(mask)
