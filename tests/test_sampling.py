"""filter_probs and sample: transformers' warpers, ties, exact / support / distribution checks, every backend."""
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specbeam import ops

BACKENDS = ("reference", "triton", "cpp")
KERNELS = ("triton", "cpp")  # checked against the reference
FILTERS = [
    dict(),
    dict(temperature=0.6),
    dict(top_k=7),
    dict(top_p=0.75),
    dict(min_p=0.08),
    dict(temperature=1.4, top_k=40, top_p=0.9, min_p=0.02),
]


def transformers_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):  # [batch, vocab]
    """What transformers' own sampling draws from, warpers built as `_get_logits_processor` builds them."""
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    warpers += [MinPLogitsWarper(min_p)]
    scores = logits.float()
    for warper in warpers:
        scores = warper(None, scores)
    return scores.softmax(dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", FILTERS)
def test_filter_matches_transformers(backend, params, device):
    logits = torch.randn(4, 111, generator=torch.Generator().manual_seed(0)).mul(3).to(device)
    probs = ops.filter_probs(logits, **params, backend=backend)
    expected = transformers_probs(logits, **params)
    assert torch.equal(probs > 0, expected > 0)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


TIED = torch.tensor([[0.06, 0.18, 0.035, 0.35, 0.18, 0.06, 0.035, 0.18]])  # unnormalised, in tied groups


def tied_logits(device):  # [1, 8]
    return TIED.log().to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", [dict(top_k=2), dict(top_k=5), dict(min_p=0.5), dict(min_p=0.15)])
def test_ties_at_top_k_and_min_p_keep_the_group_as_transformers(backend, params, device):
    logits = tied_logits(device)
    kept = ops.filter_probs(logits, **params, backend=backend) > 0
    assert torch.equal(kept, transformers_probs(logits, **params) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 7, 256, 257, 299])  # the C++ kernel: a heap up to 256, a quickselect past it
def test_top_k_keeps_what_transformers_keeps_among_ties_and_minus_infinity(backend, top_k, device):
    """Integer logits (ties everywhere), a run of -inf (fewer than k finite in the last rows) and a row of
    plain normals: the kept set is transformers' whole tie groups."""
    gen = torch.Generator().manual_seed(top_k)
    logits = torch.cat([torch.randint(-4, 4, (5, 300), generator=gen).float(), torch.randn(1, 300, generator=gen)])
    for row in range(5):
        logits[row, : 60 * row] = float("-inf")
    kept = ops.filter_probs(logits.to(device), top_k=top_k, backend=backend) > 0
    assert torch.equal(kept.cpu(), transformers_probs(logits, top_k=top_k) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_p, group", [(0.4, 0.18), (0.85, 0.06)])
def test_ties_at_top_p_keep_the_whole_group(backend, top_p, group, device):
    """transformers keeps part of the tied group at the threshold; the rule here keeps all of it."""
    logits = tied_logits(device)
    kept = ops.filter_probs(logits, top_p=top_p, backend=backend) > 0
    by_transformers = transformers_probs(logits, top_p=top_p) > 0
    in_group = (TIED == group).to(device)
    assert not torch.equal(by_transformers, by_transformers | in_group)  # transformers splits the group
    assert torch.equal(kept, by_transformers | in_group)
    assert torch.equal(kept, (TIED >= group).to(device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_zero_keeps_the_tied_top(backend, device):
    logits = torch.tensor([[1.0, 3.0, 0.0, 3.0]], device=device)
    assert ops.filter_probs(logits, top_p=0.0, backend=backend).tolist() == [[0.0, 0.5, 0.0, 0.5]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [111, 32000, 128256])
def test_plus_minus_100_logits_are_exact(backend, vocab, device):
    batch = 3
    winners = torch.randint(vocab, (batch,), generator=torch.Generator().manual_seed(vocab)).to(device)
    logits = torch.full((batch, vocab), -100.0, device=device)
    logits[torch.arange(batch), winners] = 100.0
    probs = ops.filter_probs(logits, temperature=torch.tensor([1.0, 0.0, 0.7]), backend=backend)
    assert torch.equal(probs, torch.nn.functional.one_hot(winners, vocab).float())
    noise = torch.tensor([0.0, 0.5, 1 - 2**-24], device=device)
    tokens = ops.sample(logits, top_k=torch.tensor([0, 1, 5]), noise=noise, backend=backend)
    assert torch.equal(tokens, winners)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_zero_is_first_argmax(backend, device):
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]], device=device)
    noise = torch.tensor([0.99, 0.99], device=device)
    tokens = ops.sample(logits, temperature=0.0, top_p=0.5, noise=noise, backend=backend)
    assert tokens.tolist() == [1, 0]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(
    "vocab, batch, scale", [(111, 99, 3.0), (32000, 2, 2.0), (128256, 1, 1.0)], ids=["v111", "v32000", "v128256"]
)
def test_kernel_matches_reference(backend, vocab, batch, scale, device):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(batch, vocab, generator=gen) * scale).to(device, torch.bfloat16)
    params = dict(  # one value per row, each filter on in some rows and off in others
        temperature=torch.rand(batch, generator=gen).add(0.3).to(device),
        top_k=torch.randint(0, 60, (batch,), generator=gen).to(device),
        top_p=torch.rand(batch, generator=gen).add(0.3).clamp(max=1.0).to(device),
        min_p=torch.rand(batch, generator=gen).mul(0.2).to(device),
    )
    if vocab > 10_000:  # keep the interpreter quick: one filter per large row
        params = dict(top_p=torch.full((batch,), 0.9, device=device))
    expected = ops.filter_probs(logits, **params, backend="reference")
    probs = ops.filter_probs(logits, **params, backend=backend)
    assert torch.equal(probs > 0, expected > 0)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    noise = torch.rand(batch, generator=gen).to(device)
    tokens = ops.sample(logits, **params, noise=noise, backend=backend)
    assert torch.equal(tokens, ops.sample(logits, **params, noise=noise, backend="reference"))


def draws(backend, logits, num_draws, **params):  # [num_draws] tokens, one row per draw
    noise = torch.rand(num_draws, generator=torch.Generator().manual_seed(1)).to(logits.device)
    return ops.sample(logits.expand(num_draws, -1), **params, noise=noise, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_stay_in_support(backend, device):
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2)).mul(2).to(device)
    params = dict(top_k=20, top_p=0.8, temperature=1.5)
    allowed = ops.filter_probs(logits, **params, backend="reference")[0] > 0
    assert allowed.sum() > 3
    assert allowed[draws(backend, logits, 60, **params)].all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", [dict(temperature=0.8), dict(top_k=5, top_p=0.9, min_p=0.05)])
def test_sample_frequencies_fit_the_filtered_distribution(backend, params, device, fit_pvalue):
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)).to(device)
    counts = torch.bincount(draws(backend, logits, 400, **params).cpu(), minlength=12)
    assert fit_pvalue(counts, transformers_probs(logits.cpu(), **params)[0]) > 1e-3


@pytest.mark.parametrize(
    "params, name",
    [(dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=1.5), "top_p"),
     (dict(min_p=torch.tensor([0.1, 0.2, 0.3])), "min_p")],
)
def test_bad_parameters_name_the_argument(params, name):
    with pytest.raises(ValueError, match=name):
        ops.sample(torch.zeros(2, 5), **params)


def cpp_sampling_args(batch=2, vocab=5):  # logits [batch, vocab] and four [batch] parameters, all valid
    return dict(
        logits=torch.zeros(batch, vocab), temperature=torch.ones(batch), top_k=torch.zeros(batch, dtype=torch.long),
        top_p=torch.ones(batch), min_p=torch.zeros(batch),
    )


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize(
    "name, bad, error",
    [("logits", torch.zeros(2, 5, dtype=torch.long), TypeError), ("logits", torch.zeros(2, 0), ValueError),
     ("logits", torch.zeros(10), ValueError), ("top_k", torch.zeros(2), TypeError),
     ("top_p", torch.ones(3), ValueError), ("temperature", torch.ones(2, 1), ValueError)],
)
def test_cpp_checks_its_inputs(backend, name, bad, error):
    """The extension's own checks, past the Python ones: an error naming the argument, never a crash."""
    args = cpp_sampling_args() | {name: bad}
    with pytest.raises(error, match=name):
        ops._cpp().filter_probs(**args)
    with pytest.raises(error, match=name):
        ops._cpp().sample(noise=torch.rand(2), **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_subnormal_tail_stays_kept_as_softmax_keeps_it(backend, device):
    """Scores 90 below the top have a subnormal probability (the C++ kernel's polynomial exp stops at the
    smallest normal number, so its row falls back to the exact exp there); 200 below, none."""
    logits = torch.tensor([[0.0, -1.0, -90.0, -100.0, -200.0]]).to(device)
    probs = ops.filter_probs(logits, backend=backend)
    expected = transformers_probs(logits)
    assert torch.equal(probs > 0, expected > 0) and int((expected > 0).sum()) == 4
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
