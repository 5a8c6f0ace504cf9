"""Greedy and stochastic verification of draft trees in Triton: one program per tree.

Definitions (accepted / recovered / bonus), arguments, returns and noise: `specbeam.reference.tree_verify`.
A tree is small, so its per-node state lives in registers ([NODES] vectors, NODES >= num_nodes); only the
target and draft distributions of the stochastic case are read in BLOCK-wide chunks of the vocabulary.
"""
import torch
import triton
import triton.language as tl

from specbeam.reference.tree_verify import check_tree

from .sampling import _cdf_step


@triton.jit
def _store_path(row_parents, row_path, last, depth, width, NODES: tl.constexpr):
    """Store the node indices from the root down to `last`, which sits at `depth`, padded with -1."""
    levels = tl.arange(0, NODES)
    path = tl.where(levels == 0, 0, -1).to(tl.int64)
    node = last.to(tl.int64)
    for up in range(0, depth):  # walk up from the last node to just below the root
        path = tl.where(levels == depth - up, node, path)
        node = tl.load(row_parents + node)
    tl.store(row_path + levels, path, mask=levels < width)


@triton.jit
def _greedy_kernel(
    parents_ptr,  # [batch, width] int64
    num_nodes_ptr,  # [batch] int64
    draft_ptr,  # [batch, width] int64
    target_ptr,  # [batch, width] int64: the target's argmax after each node
    path_ptr,  # [batch, width] int64 out
    num_accepted_ptr,  # [batch] int64 out
    next_ptr,  # [batch] int64 out: the bonus token
    width,
    NODES: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * width
    nodes = tl.arange(0, NODES)
    depth = tl.where(nodes == 0, 0, -1)  # depth of each node on an accepted path, -1 off them
    for node in range(1, tl.load(num_nodes_ptr + row)):
        parent = tl.load(parents_ptr + base + node)
        parent_depth = tl.max(tl.where(nodes == parent, depth, -1), axis=0)
        agrees = tl.load(draft_ptr + base + node) == tl.load(target_ptr + base + parent)
        depth = tl.where(nodes == node, tl.where((parent_depth >= 0) & agrees, parent_depth + 1, -1), depth)
    num_accepted = tl.max(depth, axis=0)
    last = tl.min(tl.where(depth == num_accepted, nodes, NODES), axis=0)  # the first of the deepest
    _store_path(parents_ptr + base, path_ptr + base, last, num_accepted, width, NODES)
    tl.store(num_accepted_ptr + row, num_accepted.to(tl.int64))
    tl.store(next_ptr + row, tl.load(target_ptr + base + last))


@triton.jit
def _residual_chunk(p_row, q_row, c, start, vocab, BLOCK: tl.constexpr):
    """Indices and unnormalised residual max(p - c q, 0) of one chunk of a node's distributions."""
    idx = start + tl.arange(0, BLOCK)
    inside = idx < vocab
    p = tl.load(p_row + idx, mask=inside, other=0.0).to(tl.float32)
    q = tl.load(q_row + idx, mask=inside, other=0.0).to(tl.float32)
    return idx, tl.maximum(p - c * q, 0.0)


@triton.jit
def _residual_mass(p_row, q_row, c, vocab, BLOCK: tl.constexpr):
    total = 0.0
    for start in range(0, vocab, BLOCK):
        _, residual = _residual_chunk(p_row, q_row, c, start, vocab, BLOCK)
        total += tl.sum(residual, axis=0)
    return total


@triton.jit
def _stochastic_kernel(
    parents_ptr,  # [batch, width] int64
    num_nodes_ptr,  # [batch] int64
    draft_ptr,  # [batch, width] int64
    target_probs_ptr,  # [batch, width, vocab] p
    draft_probs_ptr,  # [batch, width, vocab] q
    uniform_ptr,  # [batch, width] float32: acceptance noise of each node
    noise_ptr,  # [batch] float32: inverse-CDF noise of the final draw
    path_ptr,  # [batch, width] int64 out
    num_accepted_ptr,  # [batch] int64 out
    next_ptr,  # [batch] int64 out: the recovered or bonus token
    width,
    vocab,
    NODES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * width
    levels = tl.arange(0, NODES)
    path = tl.where(levels == 0, 0, -1).to(tl.int64)
    current = tl.full([], 0, tl.int64)
    depth = tl.full([], 0, tl.int64)
    # After a rejection p <- normalize(max(p - q, 0)). By induction p = max(p0 - c q, 0) / s, with p0 the
    # node's target row: max(max(p0 - c q, 0) / s - q, 0) = max(p0 - (c + s) q, 0) / s, so c <- c + s and
    # s <- sum(max(p0 - c q, 0)). No rejection yet: c = 0, s = 1.
    c = tl.full([], 0.0, tl.float32)
    s = tl.full([], 1.0, tl.float32)
    # children come after their parent: one scan in index order meets each node's children in order
    for node in range(1, tl.load(num_nodes_ptr + row)):
        if tl.load(parents_ptr + base + node) == current:
            p_row = target_probs_ptr + (base + current) * vocab
            q_row = draft_probs_ptr + (base + current) * vocab
            token = tl.load(draft_ptr + base + node)
            q_x = tl.load(q_row + token).to(tl.float32)
            p_x = tl.maximum(tl.load(p_row + token).to(tl.float32) - c * q_x, 0.0) / s
            # accept with probability min(1, p(x) / q(x)); q(x) <= p(x): always
            if tl.load(uniform_ptr + base + node) * q_x < p_x:
                current = tl.cast(node, tl.int64)
                depth += 1
                path = tl.where(levels == depth, current, path)
                c = 0.0
                s = 1.0
            else:
                mass = _residual_mass(p_row, q_row, c + s, vocab, BLOCK)
                c = tl.where(mass > 0, c + s, c)  # an empty residual (p <= q): keep p
                s = tl.where(mass > 0, mass, s)

    # the recovered (after a rejection) or bonus token: inverse CDF of p at the last accepted node
    p_row = target_probs_ptr + (base + current) * vocab
    q_row = draft_probs_ptr + (base + current) * vocab
    threshold = tl.load(noise_ptr + row) * s
    running = 0.0
    token = vocab
    last = -1
    for start in range(0, vocab, BLOCK):
        idx, residual = _residual_chunk(p_row, q_row, c, start, vocab, BLOCK)
        running, token, last = _cdf_step(residual, idx, threshold, running, token, last)
    tl.store(path_ptr + base + levels, path, mask=levels < width)
    tl.store(num_accepted_ptr + row, depth)
    tl.store(next_ptr + row, tl.minimum(token, last).to(tl.int64))


def _outputs(parents):
    batch = parents.shape[0]
    path = torch.empty_like(parents)
    num_accepted = torch.empty(batch, dtype=torch.int64, device=parents.device)
    return path, num_accepted, torch.empty_like(num_accepted)


def greedy_verify(
    parents: torch.Tensor,  # [batch, num_nodes] int64
    num_nodes: torch.Tensor,  # [batch] int64
    draft_tokens: torch.Tensor,  # [batch, num_nodes] int64
    target_tokens: torch.Tensor,  # [batch, num_nodes] int64: the target's argmax after each node
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # path [batch, num_nodes], num_accepted, next_token [batch]
    """The deepest fully agreed root path and the bonus token; see `specbeam.reference.tree_verify`."""
    check_tree(parents, num_nodes, draft_tokens)
    outputs = _outputs(parents)
    _greedy_kernel[(parents.shape[0],)](
        parents.contiguous(),
        num_nodes.contiguous(),
        draft_tokens.contiguous(),
        target_tokens.to(torch.int64).contiguous(),
        *outputs,
        parents.shape[1],
        NODES=triton.next_power_of_2(parents.shape[1]),
    )
    return outputs


def stochastic_verify(
    parents: torch.Tensor,  # [batch, num_nodes] int64
    num_nodes: torch.Tensor,  # [batch] int64
    draft_tokens: torch.Tensor,  # [batch, num_nodes] int64
    target_probs: torch.Tensor,  # [batch, num_nodes, vocab]
    draft_probs: torch.Tensor,  # [batch, num_nodes, vocab]
    uniform: torch.Tensor,  # [batch, num_nodes] in [0, 1)
    noise: torch.Tensor,  # [batch] in [0, 1)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # path [batch, num_nodes], num_accepted, next_token [batch]
    """Tree speculative sampling (SpecInfer); see `specbeam.reference.tree_verify`."""
    check_tree(parents, num_nodes, draft_tokens)
    outputs = _outputs(parents)
    vocab = target_probs.shape[2]
    _stochastic_kernel[(parents.shape[0],)](
        parents.contiguous(),
        num_nodes.contiguous(),
        draft_tokens.contiguous(),
        target_probs.contiguous(),
        draft_probs.contiguous(),
        uniform.to(torch.float32).contiguous(),
        noise.to(torch.float32).contiguous(),
        *outputs,
        parents.shape[1],
        vocab,
        NODES=triton.next_power_of_2(parents.shape[1]),
        BLOCK=min(4096, triton.next_power_of_2(vocab)),
    )
    return outputs
