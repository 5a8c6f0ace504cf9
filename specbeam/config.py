"""Configuration dataclasses, each checked in `__post_init__`."""
from dataclasses import dataclass, replace

from transformers import GenerationConfig

GREEDY, SAMPLE, BEAM = "greedy", "sample", "beam"
DRAFT_WEIGHTS = (None, "bfloat16", "int8")  # how a draft's linear weights are read: as stored, rounded, quantized


@dataclass(frozen=True)
class EngineConfig:
    """How the engine lays out its KV cache.

    block_size: KV slots per block. max_cache_bytes: the target's KV pool, allocated once (None: 256 MiB on
    the CPU, paged in only as used; half the free memory on a GPU); the draft's pool holds twice as many blocks.
    Requests take blocks as their tokens are committed, so max_new_tokens is a limit, not an allocation.
    max_num_seqs: sequences (rows: beams, samples, prompts) running at once at most.
    attention_backend: "reference", "cpp" or "triton" forces one (None: Triton on CUDA, else the C++ extension when built, else the reference).
    lean_decoder: run Llama, Mistral and Qwen2 through `specbeam.lean_decoder` (the same maths without
    transformers' module machinery); False runs every model's own forward. It takes the weights when the
    engine is made (with the C++ extension, a copy packed for its linear kernel, in bfloat16 where that is
    exact): make a new engine after changing a model's weights in place.
    """

    block_size: int = 16
    max_cache_bytes: int | None = None
    max_num_seqs: int = 256
    attention_backend: str | None = None
    lean_decoder: bool = True

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.max_cache_bytes is not None and self.max_cache_bytes <= 0:
            raise ValueError(f"max_cache_bytes must be positive or None, got {self.max_cache_bytes!r}")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive int, got {self.max_num_seqs!r}")
        if self.attention_backend not in (None, "reference", "cpp", "triton"):
            raise ValueError(f'attention_backend must be "reference", "cpp", "triton" or None, '
                             f"got {self.attention_backend!r}")
        if not isinstance(self.lean_decoder, bool):
            raise TypeError(f"lean_decoder must be a bool, got {self.lean_decoder!r}")


@dataclass(frozen=True)
class SamplingParams:
    """What one `generate` call decodes, read off a prepared `GenerationConfig`."""

    mode: str
    max_length: int
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    pad_token_id: int | None = None
    # sampling: (temperature, top_k, top_p, min_p) for the fused filter `ops.filter_probs`, which then stands in
    # for transformers' warpers; None where a warper it does not implement is set (typical_p, epsilon, eta)
    warpers: tuple[float, int, float, float] | None = None

    @classmethod
    def from_generation_config(cls, config: GenerationConfig) -> "SamplingParams":
        if config.num_beams > 1:
            mode = BEAM
        else:
            mode = SAMPLE if config.do_sample else GREEDY
        pad = config._pad_token_tensor
        return cls(
            mode=mode,
            max_length=config.max_length,
            num_beams=config.num_beams,
            num_return_sequences=config.num_return_sequences,
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
            pad_token_id=None if pad is None else int(pad),
            warpers=_fused_warpers(config) if mode == SAMPLE else None,
        )

    @property
    def rows_per_prompt(self) -> int:
        """Sequences decoded per prompt: the beams, or the independent samples."""
        return self.num_beams if self.mode == BEAM else self.num_return_sequences


def _fused_warpers(config: GenerationConfig) -> tuple[float, int, float, float] | None:
    """transformers' temperature, top-k, top-p and min-p as `ops.filter_probs` takes them, unless another
    warper is set."""
    others = (config.typical_p not in (None, 1.0) or config.epsilon_cutoff not in (None, 0.0)
              or config.eta_cutoff not in (None, 0.0))
    if others:
        return None
    return (config.temperature if config.temperature is not None else 1.0, config.top_k or 0,
            config.top_p if config.top_p is not None else 1.0, config.min_p or 0.0)


@dataclass(frozen=True)
class SpecConfig:
    """Shape of the draft trees.

    depth: drafted tokens on each root path. width: nodes kept per depth (greedy: per tree, the best by
    cumulative draft log-probability; beam search: per prompt, over all of its beams' trees, the best by beam
    score + cumulative draft log-probability; sampling: i.i.d. chains under the root). branch: children expanded
    per node (top-branch by draft probability). node_budget: drafted nodes per tree at most. Beam search widens
    width to at least 2 num_beams and branch to num_beams, so that a draft that agrees with the target covers
    every beam the target keeps (it picks its beams among 2 num_beams candidates).
    adaptive: each round drafts the tree of depth 0..depth and width 1..width (beam search: depth only) with the
    most expected tokens per second, from the pass costs and the acceptance measured on this machine so far
    (`specbeam.tree_policy`); False: always `depth` and `width`.
    draft_weights: "bfloat16" runs a draft with its linear weights rounded to bfloat16, "int8" with them
    quantized to int8 per output column (with the C++ extension a float32 draft then streams a half or a quarter
    of the bytes a pass); None runs them as stored. Lossless either way: the target verifies whatever the draft
    proposes. Llama-family drafts only (the lean decoder holds the copy).
    """

    depth: int = 4
    width: int = 2
    branch: int = 2
    node_budget: int = 64  # drafted nodes per tree at most
    adaptive: bool = True
    draft_weights: str | None = None

    def __post_init__(self):
        for name in ("depth", "width", "branch", "node_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {self.adaptive!r}")
        if self.draft_weights not in DRAFT_WEIGHTS:
            raise ValueError(f"draft_weights must be one of {DRAFT_WEIGHTS}, got {self.draft_weights!r}")

    def for_beams(self, num_beams: int) -> "SpecConfig":
        return replace(self, width=max(self.width, 2 * num_beams), branch=max(self.branch, num_beams))

    @property
    def max_nodes(self) -> int:
        """Nodes of a tree, its root included."""
        return 1 + min(self.depth * self.width, self.node_budget)
