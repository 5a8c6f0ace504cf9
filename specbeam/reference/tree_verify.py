"""Verification of draft trees against the target, in plain torch.

Each row holds one tree. Node 0 is the root (the beam's last token, parent -1); node i >= 1 has a parent
< i and a drafted token; nodes >= num_nodes[b] are padding. The children of a node are tried in increasing
node index.

- accepted tokens: drafted tokens on the chosen root path, each agreed to by the target at its parent;
- recovered token: drawn from the residual distribution at the last accepted node after a rejection there;
- bonus token: drawn from the target at the last accepted node when none of its children was rejected
  (a leaf); in greedy verification, always the target's argmax at the last accepted node.

Both verifiers return `(path, num_accepted, next_token)`: `path [batch, num_nodes]` the node indices from the
root (path[:, 0] == 0) down to the last accepted node, padded with -1 (its width, num_nodes, bounds any depth);
`num_accepted [batch]` the number of accepted tokens, i.e. the depth of the last accepted node;
`next_token [batch]` the recovered or bonus token that follows them.
"""
import torch

from specbeam.reference.sampling import inverse_cdf


def check_tree(
    parents: torch.Tensor,  # [batch, num_nodes] int64
    num_nodes: torch.Tensor,  # [batch] int64
    draft_tokens: torch.Tensor,  # [batch, num_nodes] int64
) -> None:
    """Raise ValueError unless the three describe a batch of trees (shapes and dtypes only: no device sync)."""
    if parents.dim() != 2 or parents.shape[1] < 1:
        raise ValueError(f"parents must be [batch, num_nodes] with num_nodes >= 1, got {tuple(parents.shape)}")
    expected = (("num_nodes", num_nodes, parents.shape[:1]), ("draft_tokens", draft_tokens, parents.shape))
    for name, tensor, shape in expected:
        if tensor.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    for name, tensor in (("parents", parents), ("num_nodes", num_nodes), ("draft_tokens", draft_tokens)):
        if tensor.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {tensor.dtype}")


def _path_to(
    parents: torch.Tensor,  # [batch, num_nodes]
    last: torch.Tensor,  # [batch] the last accepted node
    depth: torch.Tensor,  # [batch] its depth
) -> torch.Tensor:  # [batch, num_nodes]
    """Node indices from the root down to `last`, padded with -1."""
    path = torch.full_like(parents, -1)
    rows = torch.arange(parents.shape[0], device=parents.device)
    node = last.clone()
    for level in range(int(depth.max()), -1, -1):
        here = depth >= level
        path[rows[here], level] = node[here]
        node = torch.where(here, parents[rows, node].clamp(min=0), node)
    return path


def greedy_verify(
    parents: torch.Tensor,  # [batch, num_nodes] int64
    num_nodes: torch.Tensor,  # [batch] int64
    draft_tokens: torch.Tensor,  # [batch, num_nodes] int64
    target_tokens: torch.Tensor,  # [batch, num_nodes] int64: the target's argmax after each node
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept the deepest root path whose every drafted token equals the target's argmax at its parent
    (equally deep: the lowest last node); the bonus token is the target's argmax at the last accepted node."""
    check_tree(parents, num_nodes, draft_tokens)
    depth = torch.full_like(parents, -1)  # -1: not on an accepted path
    depth[:, 0] = 0
    for node in range(1, parents.shape[1]):
        parent = parents[:, node].clamp(0, node - 1)[:, None]  # padding may hold anything
        parent_depth = depth.gather(1, parent)[:, 0]
        agrees = draft_tokens[:, node] == target_tokens.gather(1, parent)[:, 0]
        accepted = (node < num_nodes) & (parent_depth >= 0) & agrees
        depth[:, node] = torch.where(accepted, parent_depth + 1, -1)
    last = depth.argmax(dim=1)  # the first of the deepest
    num_accepted = depth.gather(1, last[:, None])[:, 0]
    return _path_to(parents, last, num_accepted), num_accepted, target_tokens.gather(1, last[:, None])[:, 0]


def _residual(
    p: torch.Tensor,  # [batch, vocab]
    q: torch.Tensor,  # [batch, vocab]
) -> torch.Tensor:  # [batch, vocab]
    """normalize(max(p - q, 0)); p itself where that is all zero (p <= q everywhere, up to rounding)."""
    residual = (p - q).clamp(min=0)
    mass = residual.sum(dim=1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), p)


def stochastic_verify(
    parents: torch.Tensor,  # [batch, num_nodes] int64
    num_nodes: torch.Tensor,  # [batch] int64
    draft_tokens: torch.Tensor,  # [batch, num_nodes] int64
    target_probs: torch.Tensor,  # [batch, num_nodes, vocab] p: the target's distribution after each node
    draft_probs: torch.Tensor,  # [batch, num_nodes, vocab] q: the distribution each node's children were drawn from
    uniform: torch.Tensor,  # [batch, num_nodes] in [0, 1): entry c decides on node c (entry 0 unused)
    noise: torch.Tensor,  # [batch] in [0, 1): inverse-CDF draw of the recovered or bonus token
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tree speculative sampling (SpecInfer): the emitted tokens follow the target's distribution exactly.

    Walk down from the root. At the current node, with target p and draft q, try its children in index order:
    child c with token x is accepted iff uniform[c] * q(x) < p(x), i.e. with probability min(1, p(x) / q(x)),
    and the walk moves to c. A rejection replaces p by normalize(max(p - q, 0)) for the next child (q stays:
    siblings are i.i.d. from q). When no child is accepted the next token is drawn from p by inverse CDF on
    `noise`: recovered if a child was rejected, bonus otherwise."""
    check_tree(parents, num_nodes, draft_tokens)
    batch, width = parents.shape
    rows = torch.arange(batch, device=parents.device)
    current = torch.zeros_like(num_nodes)
    depth = torch.zeros_like(num_nodes)
    path = torch.full_like(parents, -1)
    path[:, 0] = 0
    p, q = target_probs[:, 0].clone(), draft_probs[:, 0].clone()
    # children come after their parent, so one scan in index order meets each node's children in order,
    # after every node on the path to it
    for node in range(1, width):
        tried = (node < num_nodes) & (parents[:, node] == current)
        token = torch.where(tried, draft_tokens[:, node], 0)[:, None]  # padding may hold anything
        accepted = tried & (uniform[:, node] * q.gather(1, token)[:, 0] < p.gather(1, token)[:, 0])
        rejected = tried & ~accepted
        p[rejected] = _residual(p[rejected], q[rejected])
        p[accepted], q[accepted] = target_probs[accepted, node], draft_probs[accepted, node]
        current[accepted] = node
        depth += accepted.long()
        path[rows[accepted], depth[accepted]] = node
    return path, depth, inverse_cdf(p, noise)
