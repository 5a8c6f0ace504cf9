"""greedy_verify and stochastic_verify: hand-made trees, perfect and hopeless drafts, kernel against
reference, and the exactness of tree speculative sampling (goodness of fit against the target)."""
import pytest
import torch

from specbeam import ops

BACKENDS = ("reference", "triton", "cpp")
KERNELS = ("triton", "cpp")  # checked against the reference


def as_tensors(device, parents, num_nodes, draft, *rest):
    return [torch.tensor(x, device=device) for x in (parents, num_nodes, draft, *rest)]


def random_trees(batch, width, vocab, gen):  # parents, num_nodes, draft_tokens
    parents = torch.full((batch, width), -1)
    for node in range(1, width):
        parents[:, node] = torch.randint(0, node, (batch,), generator=gen)
    num_nodes = torch.randint(1, width + 1, (batch,), generator=gen)
    return parents, num_nodes, torch.randint(0, vocab, (batch, width), generator=gen)


def random_probs(shape, gen):  # peaked distributions with some exact zeros
    probs = torch.rand(shape, generator=gen).pow(4)
    probs = probs.masked_fill(torch.rand(shape, generator=gen) < 0.2, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_by_hand(backend, device):
    # row 0: 0 -> {1: 5, 2: 7}, 2 -> 4: 8, 4 -> 5: 6; the target says 7, 8, 6 then 3 along 0-2-4-5
    # row 1: two equally deep matches (nodes 1 and 2): the lower index wins; nodes >= 3 are padding
    parents = [[-1, 0, 0, 1, 2, 4], [-1, 0, 0, 1, 9, 9]]
    draft = [[1, 5, 7, 9, 8, 6], [1, 4, 4, 0, -1, -1]]
    target = [[7, 2, 8, 2, 6, 3], [4, 11, 12, 0, 0, 0]]
    path, accepted, bonus = ops.greedy_verify(*as_tensors(device, parents, [6, 3], draft, target), backend=backend)
    assert path.tolist() == [[0, 2, 4, 5, -1, -1], [0, 1, -1, -1, -1, -1]]
    assert accepted.tolist() == [3, 1]
    assert bonus.tolist() == [3, 11]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_perfect_and_hopeless_drafts(backend, device):
    gen = torch.Generator().manual_seed(0)
    width = 9
    parents = torch.arange(-1, width - 1).expand(3, -1).contiguous()  # chains
    draft = torch.randint(0, 50, (3, width), generator=gen)
    perfect = torch.cat([draft[:, 1:], torch.full((3, 1), 7)], dim=1)  # the target's argmax after node i = draft[i+1]
    num_nodes = torch.tensor([width, 4, 1])
    tree = [t.to(device) for t in (parents, num_nodes, draft)]
    path, accepted, bonus = ops.greedy_verify(*tree, perfect.to(device), backend=backend)
    assert accepted.tolist() == [width - 1, 3, 0]
    assert path[0].tolist() == list(range(width))
    assert bonus.tolist() == [7, draft[1, 4].item(), draft[2, 1].item()]
    hopeless = perfect + 1
    _, accepted, bonus = ops.greedy_verify(*tree, hopeless.to(device), backend=backend)
    assert accepted.tolist() == [0, 0, 0] and torch.equal(bonus, hopeless[:, 0].to(device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_perfect_and_hopeless_drafts(backend, device):
    gen = torch.Generator().manual_seed(1)
    batch, width, vocab = 4, 6, 30
    parents = torch.arange(-1, width - 1).expand(batch, -1).contiguous()
    num_nodes = torch.full((batch,), width)
    draft = torch.randint(0, vocab, (batch, width), generator=gen)
    uniform, noise = torch.rand(batch, width, generator=gen), torch.rand(batch, generator=gen)
    probs = random_probs((batch, width, vocab), gen)
    probs.scatter_(2, draft.roll(-1, dims=1)[:, :, None], 0.5)  # every drafted token is possible
    probs = (probs / probs.sum(dim=-1, keepdim=True)).to(device)
    uniform, noise = uniform.to(device), noise.to(device)
    args = [t.to(device) for t in (parents, num_nodes, draft)]
    # q == p: accepted with probability min(1, p/q) = 1
    path, accepted, _ = ops.stochastic_verify(*args, probs, probs, uniform, noise, backend=backend)
    assert accepted.tolist() == [width - 1] * batch and path[:, -1].tolist() == [width - 1] * batch
    # p(x) = 0 for every drafted x: rejected; the recovered token comes from max(p - q, 0)
    hopeless = probs.scatter(2, args[2].roll(-1, dims=1)[:, :, None], 0.0)
    hopeless = hopeless / hopeless.sum(dim=-1, keepdim=True)
    _, accepted, recovered = ops.stochastic_verify(*args, hopeless, probs, uniform, noise, backend=backend)
    assert accepted.tolist() == [0] * batch
    assert ((hopeless[:, 0] - probs[:, 0]).clamp(min=0).gather(1, recovered[:, None]) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_empty_residual_keeps_p(backend, device):
    # child 1 drafts token 2 with p = q = 0 there: rejected, max(p - q, 0) = 0, so p stays; child 2 is then accepted
    parents, num_nodes, draft = as_tensors(device, [[-1, 0, 0]], [3], [[0, 2, 1]])
    p = torch.tensor([[[0.5, 0.5, 0.0]] * 3], device=device)
    uniform, noise = torch.tensor([[0.0, 0.5, 0.5]], device=device), torch.tensor([0.3], device=device)
    path, accepted, bonus = ops.stochastic_verify(parents, num_nodes, draft, p, p, uniform, noise, backend=backend)
    assert path.tolist() == [[0, 2, -1]] and accepted.tolist() == [1] and bonus.tolist() == [0]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(
    "batch, width, vocab", [(99, 12, 111), (2, 8, 32000), (1, 5, 128256)], ids=["b99", "v32000", "v128256"]
)
def test_kernel_matches_reference(backend, batch, width, vocab, device):
    gen = torch.Generator().manual_seed(vocab)
    parents, num_nodes, draft = random_trees(batch, width, vocab, gen)
    tree = [t.to(device) for t in (parents, num_nodes, draft)]
    target_tokens = torch.where(torch.rand(batch, width, generator=gen) < 0.7, draft.roll(-1, 1), 0).to(device)
    got = ops.greedy_verify(*tree, target_tokens, backend=backend)
    for got_part, want_part in zip(got, ops.greedy_verify(*tree, target_tokens, backend="reference")):
        assert torch.equal(got_part, want_part)
    target_probs = random_probs((batch, width, vocab), gen).to(device)
    draft_probs = random_probs((batch, width, vocab), gen).to(device)
    target_probs = (target_probs + draft_probs) / 2  # overlap, so that some children are accepted
    noise = [torch.rand(batch, width, generator=gen).to(device), torch.rand(batch, generator=gen).to(device)]
    got = ops.stochastic_verify(*tree, target_probs, draft_probs, *noise, backend=backend)
    want = ops.stochastic_verify(*tree, target_probs, draft_probs, *noise, backend="reference")
    for got_part, want_part in zip(got, want):
        assert torch.equal(got_part, want_part)


# The exactness test. A context-dependent toy target and draft over 3 tokens: P0 / Q0 after the root,
# P1[a] / Q1[a] after token a. The tree: root -> nodes 1, 2, 3; node 1 -> 4, 5; node 2 -> 6. Children are
# drawn i.i.d. from the draft at their parent, as the drafter does. The first two emitted tokens must follow
# P0(a) P1[a](b), whatever the draft.
P0 = torch.tensor([0.5, 0.35, 0.15])
P1 = torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.0, 0.3], [0.2, 0.2, 0.6]])
DRAFTS = {
    "unlike": (torch.tensor([0.1, 0.3, 0.6]), torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])),
    "blind_spots": (torch.tensor([0.0, 0.2, 0.8]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])),
}
TREE = [-1, 0, 0, 0, 1, 1, 2]


def drafted_trees(q0, q1, num_trees, gen):  # parents, draft tokens, target probs, draft probs per node
    parents = torch.tensor(TREE).expand(num_trees, -1).contiguous()
    first = torch.multinomial(q0, 3 * num_trees, replacement=True, generator=gen).view(num_trees, 3)
    under_1 = torch.multinomial(q1[first[:, 0]], 2, replacement=True, generator=gen)
    under_2 = torch.multinomial(q1[first[:, 1]], 1, replacement=True, generator=gen)
    draft = torch.cat([torch.zeros(num_trees, 1, dtype=torch.long), first, under_1, under_2], dim=1)
    uniform_3 = torch.full((num_trees, 3, 3), 1 / 3)  # depth 2: the third token is not checked
    target = torch.cat([P0.expand(num_trees, 1, -1), P1[first], uniform_3], dim=1)
    drafted = torch.cat([q0.expand(num_trees, 1, -1), q1[first], uniform_3], dim=1)
    return parents, draft, target, drafted


def drafted_at(draft, path, level):  # [num_trees] the token of the path's node at `level`
    return draft.gather(1, path[:, level : level + 1].clamp(min=0))[:, 0]


def emitted_pairs(draft, path, accepted, next_token, gen):  # [num_trees] 3 * first + second
    """The first two tokens emitted. Where only one was (nothing accepted), the second comes from the next
    step, which samples the target after the first token."""
    first = torch.where(accepted >= 1, drafted_at(draft, path, 1), next_token)
    next_step = torch.multinomial(P1[first], 1, generator=gen)[:, 0]
    second = torch.where(accepted == 1, next_token, next_step)
    second = torch.where(accepted >= 2, drafted_at(draft, path, 2), second)
    return 3 * first + second


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draft_name", DRAFTS)
def test_stochastic_emits_the_target_distribution(backend, draft_name, device, fit_pvalue):
    gen = torch.Generator().manual_seed(7)
    num_trees = 800
    parents, draft, target, drafted = drafted_trees(*DRAFTS[draft_name], num_trees, gen)
    uniform, noise = torch.rand(num_trees, len(TREE), generator=gen), torch.rand(num_trees, generator=gen)
    num_nodes = torch.full((num_trees,), len(TREE))
    args = [t.to(device) for t in (parents, num_nodes, draft, target, drafted, uniform, noise)]
    path, accepted, next_token = [t.cpu() for t in ops.stochastic_verify(*args, backend=backend)]
    assert accepted.float().mean() > 0.3  # the tree is really used
    pairs = emitted_pairs(draft, path, accepted, next_token, gen)
    counts = torch.bincount(pairs, minlength=9)
    assert fit_pvalue(counts.view(3, 3).sum(dim=1), P0) > 1e-3  # the first token
    assert fit_pvalue(counts, (P0[:, None] * P1).flatten()) > 1e-3  # the first two


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize(
    "name, bad, error",
    [("parents", torch.zeros(2, 3, dtype=torch.int32), TypeError),
     ("num_nodes", torch.ones(3, dtype=torch.long), ValueError), ("draft_tokens", torch.full((2, 3), 7), ValueError),
     ("target_probs", torch.ones(2, 3, 4, dtype=torch.long), TypeError),
     ("draft_probs", torch.ones(2, 3, 5), ValueError), ("uniform", torch.rand(2), ValueError),
     ("noise", torch.rand(2, 1), ValueError)],
)
def test_cpp_checks_its_inputs(backend, name, bad, error):
    """Bad shapes, dtypes and out-of-vocabulary tokens raise an error naming the argument, never crash."""
    parents = torch.tensor([[-1, 0, 0]] * 2)
    args = dict(parents=parents, num_nodes=torch.full((2,), 3), draft_tokens=torch.zeros(2, 3, dtype=torch.long),
                target_probs=torch.full((2, 3, 4), 0.25), draft_probs=torch.full((2, 3, 4), 0.25),
                uniform=torch.rand(2, 3), noise=torch.rand(2))
    with pytest.raises(error, match=name):
        ops._cpp().stochastic_verify(**(args | {name: bad}))
    if name in ("parents", "num_nodes"):  # greedy_verify checks the tree the same way
        tree = dict(parents=parents, num_nodes=args["num_nodes"], draft_tokens=args["draft_tokens"])
        with pytest.raises(error, match=name):
            ops._cpp().greedy_verify(**(tree | {name: bad}), target_tokens=args["draft_tokens"])
