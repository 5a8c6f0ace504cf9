"""Tree verification, batched over trees: which path of each draft tree a model accepts, and the token it emits
after it. Greedy: the deepest path whose every token is the model's argmax at its parent, then the argmax there.
Sampling: tree speculative sampling (DESIGN.md), which emits exactly the model's distribution."""
from typing import Callable

import torch

from specbeam import ops
from specbeam.host import as_tensor
from specbeam.tree import DraftTree


def verify_trees(trees: list[DraftTree], processed: list[torch.Tensor],
                 sampling_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list[list[int]], list[int]]:
    """processed: per tree, the model's processed scores at its nodes [nodes, vocab]. sampling_probs: processed
    scores [rows, vocab] -> the distribution to sample (None: greedy); draws: the uniforms that decide, per tree
    ([trees, the widest tree's nodes] and [trees], `draw_uniforms`). Returns each tree's accepted path (node
    indices from the root) and the token after it."""
    if sampling_probs is None and all(len(t) == 1 for t in trees):  # plain greedy steps: the argmax
        return [[0]] * len(trees), torch.cat(processed).argmax(dim=-1).tolist()
    width = max(len(t) for t in trees)
    scores = torch.nn.utils.rnn.pad_sequence(processed, batch_first=True)  # [trees, width, vocab], zeros after
    device = scores.device  # the verify kernel runs where the scores are
    parents = as_tensor([t.parents + [-1] * (width - len(t)) for t in trees], device)
    tokens = as_tensor([t.tokens + [0] * (width - len(t)) for t in trees], device)
    num_nodes = as_tensor([len(t) for t in trees], device)
    if sampling_probs is not None:
        q = scores.new_zeros(scores.shape)  # the draft's probabilities at each node: none at a root or padding
        for i, tree in enumerate(trees):
            if tree.draft_probs is not None:
                q[i, :len(tree)] = tree.draft_probs
        uniform, noise = draws
        p = sampling_probs(scores.flatten(0, 1)).view(scores.shape)
        path, accepted, next_token = ops.stochastic_verify(
            parents, num_nodes, tokens, p, q, uniform.to(device), noise.to(device))
    else:
        path, accepted, next_token = ops.greedy_verify(parents, num_nodes, tokens, scores.argmax(dim=-1))
    paths = [p[: a + 1] for p, a in zip(path.tolist(), accepted.tolist())]
    return paths, next_token.tolist()


def draw_uniforms(trees: list[DraftTree], generator: torch.Generator, width: int | None = None):
    """The U(0, 1) draws that decide one request's trees, from its generator (on the generator's device):
    uniform [trees, its widest tree] (zeros after, up to `width` if given) and noise [trees]."""
    widest = max(len(t) for t in trees)
    uniform, noise = _uniforms((len(trees), widest), generator), _uniforms((len(trees),), generator)
    return torch.nn.functional.pad(uniform, (0, (width or widest) - widest)), noise


def _uniforms(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """U(0, 1) draws from the request's generator, on the generator's device."""
    return torch.rand(shape, generator=generator, device=generator.device)

