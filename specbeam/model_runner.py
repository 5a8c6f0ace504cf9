"""Runs any Hugging Face decoder through specbeam's attention: every new token of every sequence is packed
into one `[1, T]` row, K/V go to the paged cache, and attention reads them back through block tables."""
from contextlib import contextmanager
from dataclasses import dataclass

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
        return ops.attend(query, *self.cache.layers[layer], self.plan, scale)


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

    def __init__(self, model: PreTrainedModel, engine_config: EngineConfig):
        check_model(model)
        self.model, self.attention_backend = model, engine_config.attention_backend
        self.device, self.dtype = model.device, model.dtype  # where and how the weights are (read once)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]  # logits per scored token
        use_lean = engine_config.lean_decoder and unsupported_reason(model) is None
        self.lean = LeanDecoder(model) if use_lean else None
        config = model.config.get_text_config()
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.sliding_window = getattr(config, "sliding_window", None)

    def bytes_per_token(self) -> int:
        """KV bytes one position costs across all layers (K and V)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        shape = (self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return PagedKVCache(*shape, dtype=self.dtype, device=self.device)

    def forward(
        self,
        cache: PagedKVCache,
        tables: list[BlockTable],
        new_tokens: list[torch.Tensor],  # per sequence: [n_s] token ids to append
        depths: list[torch.Tensor] | None = None,  # per sequence: [n_s] offsets from its length; None: 0..n_s-1
        tree_masks: list[torch.Tensor] | None = None,  # per sequence: [n_s, n_s] bool ancestor-or-self
        logit_rows: torch.Tensor | None = None,  # [R] packed rows to score; None: each sequence's last
    ) -> torch.Tensor:  # [R, vocab]
        device = self.device
        counts = torch.tensor([len(t) for t in new_tokens])
        starts = [table.length for table in tables]
        slots = [cache.reserve(table, len(tokens)) for table, tokens in zip(tables, new_tokens)]
        if depths is None:
            depths = [torch.arange(n) for n in counts.tolist()]
        positions = torch.cat([start + d.cpu() for start, d in zip(starts, depths)])
        query_start_loc = torch.zeros(len(tables) + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=query_start_loc[1:])
        if logit_rows is None:
            logit_rows = query_start_loc[1:] - 1
        plan = ops.plan_attention(
            _pad_tables(tables).to(device),
            torch.tensor([t.length for t in tables], device=device),
            query_start_loc.to(device),
            None if tree_masks is None else _pack_tree_masks(tree_masks).to(device),
            cache.block_size,
            backend=self.attention_backend,
        )
        step = StepMetadata(cache, torch.tensor(sum(slots, []), device=device), plan)
        input_ids, positions, logit_rows = (t.to(device) for t in (torch.cat(new_tokens), positions, logit_rows))
        if self.lean is not None:
            return self.lean(input_ids, positions, logit_rows, step.attend)
        with self._specbeam_attention():
            out = self.model(input_ids=input_ids[None], position_ids=positions[None], logits_to_keep=logit_rows,
                             use_cache=False, specbeam_step=step)
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


def _pad_tables(tables: list[BlockTable]) -> torch.Tensor:  # [num_seqs, max_blocks]
    width = max(len(t.blocks) for t in tables)
    return torch.tensor([t.blocks + [0] * (width - len(t.blocks)) for t in tables], dtype=torch.long)


def _pack_tree_masks(masks: list[torch.Tensor]) -> torch.Tensor:  # [num_tokens, max_new]
    width = max(m.shape[1] for m in masks)
    return torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
