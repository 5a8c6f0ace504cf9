"""Tree verification: the Triton kernels against the torch reference (a node-by-node scan over the batch)."""
import pytest
import torch

from specbeam import ops

SIZES = [(4, 16, 32000), (16, 16, 32000)]  # (batch, nodes, vocab)


def random_tree_batch(batch, nodes, vocab, device):
    parents = torch.stack([torch.randint(0, max(node, 1), (batch,)) for node in range(nodes)], dim=1)
    parents[:, 0] = -1
    draft = torch.randint(0, vocab, (batch, nodes))
    return [t.to(device) for t in (parents, torch.full((batch,), nodes), draft)]


@pytest.mark.parametrize("batch, nodes, vocab", SIZES)
def test_greedy_verify(timed, backend, device, batch, nodes, vocab):
    tree = random_tree_batch(batch, nodes, vocab, device)
    target = torch.where(torch.rand(batch, nodes, device=device) < 0.8, tree[2].roll(-1, 1), 0)
    timed(f"greedy b{batch} n{nodes}", ops.greedy_verify, *tree, target, backend=backend)


@pytest.mark.parametrize("batch, nodes, vocab", SIZES)
def test_stochastic_verify(timed, backend, device, batch, nodes, vocab):
    tree = random_tree_batch(batch, nodes, vocab, device)
    target = torch.randn(batch, nodes, vocab, device=device).softmax(dim=-1)
    draft = torch.randn(batch, nodes, vocab, device=device).softmax(dim=-1)
    noise = torch.rand(batch, nodes, device=device), torch.rand(batch, device=device)
    group = f"stochastic b{batch} n{nodes} v{vocab}"
    timed(group, ops.stochastic_verify, *tree, target, draft, *noise, backend=backend)
