"""linear: x @ weight.T + bias against float64 torch, batch invariance (bitwise, any M, any row position, any
thread count), bfloat16 weights under float32 x (bitwise the float32 weight's result when it is bfloat16-exact),
the packed layout, weights prepared once against packed per call, and input checks naming the argument."""
import pytest
import torch

from specbeam import ops
from specbeam.linear_weight import LinearWeight, pack, pack_int8, panel_columns, prepare, quantize_int8, read_as

BACKENDS = ("reference", "triton", "cpp")  # "triton" is torch's F.linear: there is no Triton kernel
SHAPES = [(m, 37, 5) for m in range(1, 21)] + [(1, 1, 3), (4, 8, 4), (9, 384, 896), (16, 896, 384), (7, 19, 131)]


def operands(m, k, n, dtype, seed=0):  # x [m, k], weight [n, k], bias [n]
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=gen, dtype=dtype) for shape in ((m, k), (n, k), (n,)))


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count for the test, then puts it back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_matches_float64_torch(backend, device, dtype, rtol, with_bias, m, k, n):
    x, weight, bias = (t.to(device) for t in operands(m, k, n, dtype))
    bias = bias if with_bias else None
    out = ops.linear(x, weight, bias, backend=backend)
    expected = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == dtype and out.shape == (m, n)
    # relative to the size of the terms, as cancellation can leave a sum far smaller than them
    scale = (x.double().abs() @ weight.double().abs().T).clamp(min=1)
    assert ((out.double() - expected).abs() / scale).max() < rtol


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32,) * 2, (torch.float64,) * 2,
                                                  (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("k, n", [(37, 5), (384, 131), (61, 64), (200, 339)])  # 339: 21 panels, every tile width
def test_each_row_is_bitwise_the_same_in_any_batch(backend, threads, num_threads, dtype, weight_dtype, k, n):
    """Row i of linear(x) == linear(x[a:b])[i - a] bitwise, for every window [a, b) around i: the row alone,
    at every position of a batch of M = 1 ... 33 rows, whatever the thread count."""
    threads(num_threads)
    x, weight, bias = operands(33, k, n, dtype, seed=k)
    weight = weight.to(weight_dtype)
    alone = torch.stack([ops.linear(x[i : i + 1], weight, bias, backend=backend)[0] for i in range(33)])
    for m in range(1, 34):
        for start in range(34 - m):
            batch = ops.linear(x[start : start + m], weight, bias, backend=backend)
            assert torch.equal(batch, alone[start : start + m]), (m, start)


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_long_batch_goes_in_chunks_of_rows_that_change_no_row(backend, threads, num_threads, dtype):
    """Past kRowChunk (128) rows, x is taken a chunk at a time (csrc/kernels/linear.h): every row of 300 is still
    bitwise the row alone, and the same in any window of the batch."""
    threads(num_threads)
    x, weight, bias = operands(300, 40, 70, dtype, seed=3)
    out = ops.linear(x, weight, bias, backend=backend)
    for i in (0, 127, 128, 129, 255, 256, 299):
        assert torch.equal(ops.linear(x[i : i + 1], weight, bias, backend=backend)[0], out[i]), i
    for start, stop in ((0, 129), (100, 300), (5, 261)):
        assert torch.equal(ops.linear(x[start:stop], weight, bias, backend=backend), out[start:stop]), (start, stop)


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("k, n", [(37, 5), (384, 131), (61, 64), (896, 9), (200, 339)])
def test_bfloat16_weight_gives_the_bits_of_its_exact_float32(backend, threads, num_threads, with_bias, k, n):
    """A float32 weight that bfloat16 holds exactly: its bfloat16 copy gives bitwise the same out, any M."""
    threads(num_threads)
    x, weight, bias = operands(33, k, n, torch.float32, seed=k + 1)
    compact = weight.to(torch.bfloat16)
    exact = compact.float()
    assert not torch.equal(exact, weight)  # the rounding did something: the operands differ from the test above
    bias = bias if with_bias else None
    for m in range(1, 34):
        out = ops.linear(x[:m], compact, bias, backend=backend)
        assert out.dtype == torch.float32
        assert torch.equal(out, ops.linear(x[:m], exact, bias, backend=backend)), m


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bfloat16_weight_without_the_cpp_kernel(backend):
    """The torch backends take a bfloat16 weight under float32 x too: as its exact float32."""
    x, weight, bias = operands(5, 37, 7, torch.float32)
    compact = weight.to(torch.bfloat16)
    assert torch.equal(ops.linear(x, compact, bias, backend=backend),
                       torch.nn.functional.linear(x, compact.float(), bias))


@pytest.mark.parametrize("backend", ["cpp"])
def test_one_thread_and_two_give_the_same_bits(backend, threads):
    x, weight, bias = operands(9, 384, 896, torch.float32)
    threads(1)
    one = ops.linear(x, weight, bias, backend=backend)
    threads(2)
    assert torch.equal(ops.linear(x, weight, bias, backend=backend), one)


@pytest.mark.parametrize("backend", ["cpp"])
def test_empty_sizes(backend):
    x, weight, bias = operands(3, 0, 4, torch.float32)
    assert torch.equal(ops.linear(x, weight, bias, backend=backend), bias.expand(3, 4))
    assert ops.linear(x[:0], weight, bias, backend=backend).shape == (0, 4)
    assert ops.linear(x, weight[:0], bias[:0], backend=backend).shape == (3, 0)


def packed(weight):  # a prepared weight whose packed tensor is `weight` itself, contiguous or not
    return LinearWeight(weight, weight)


def bad_inputs():
    """(name, x, weight, bias, error): one bad argument each, the others valid."""
    x, weight, bias = operands(4, 8, 6, torch.float32)
    return [
        ("x", x.long(), weight, bias, TypeError),
        ("x", x.half(), weight.half(), bias.half(), TypeError),
        ("x", x[:, ::2], weight[:, :4].contiguous(), bias, ValueError),  # not contiguous
        ("x", x[0], weight, bias, ValueError),
        ("x", x[None], weight, bias, ValueError),
        ("weight", x, weight.double(), bias, TypeError),
        ("weight", x, weight[:, :7], bias, ValueError),  # K does not match x
        ("weight", x, packed(weight.T.contiguous().T), bias, ValueError),  # not contiguous
        ("weight", x, weight[None], bias, ValueError),
        ("bias", x, weight, bias[:5], ValueError),
        ("bias", x, weight, bias.double(), TypeError),
        ("bias", x, weight, torch.zeros(12)[::2], ValueError),  # not contiguous
        ("weight", x.double(), weight.bfloat16(), bias.double(), TypeError),  # bfloat16 only under float32
        ("x", x.bfloat16(), weight.bfloat16(), bias, TypeError),
        ("weight", x, packed(weight.bfloat16().T.contiguous().T), bias, ValueError),  # not contiguous
        ("bias", x, LinearWeight(weight, weight[:4]), bias, ValueError),  # the packed N is not the bias length
        ("bias", x, weight.bfloat16(), bias.bfloat16(), TypeError),  # float32 as x, not as the weight
    ]


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_input_names_the_argument(backend, case):
    name, x, weight, bias, error = bad_inputs()[case]
    with pytest.raises(error, match=name):
        ops.linear(x, weight, bias, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 16, 37])
def test_pack_layout(dtype, n):
    """Panel p row k holds weight[p P + c, k] (bfloat16: columns in the order 0, 8, 1, 9, ...), then the tail."""
    k = 3
    weight = torch.arange(n * k, dtype=dtype).view(n, k)
    out = pack(weight).reshape(-1)
    p = panel_columns(dtype)
    full = n // p * p
    order = [c for pair in zip(range(8), range(8, 16)) for c in pair] if dtype == torch.bfloat16 else range(p)
    expected = [weight[q * p + c, kk] for q in range(n // p) for kk in range(k) for c in order]
    expected += [weight[full + c, kk] for kk in range(k) for c in range(n - full)]
    assert pack(weight).shape == (n, k) and torch.equal(out, torch.stack(expected))


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bfloat16_exact", [True, False])
def test_prepared_weight_gives_the_bits_of_the_plain_one(backend, dtype, bfloat16_exact):
    """prepare() packs once (from bfloat16 where exact, and only then); the result is the plain weight's."""
    x, weight, bias = operands(7, 61, 37, dtype)
    if bfloat16_exact:
        weight = weight.to(torch.bfloat16).to(dtype)
    prepared = prepare(weight, cpp_kernel=True)
    compact = bfloat16_exact and dtype == torch.float32
    assert prepared.weight is weight and prepared.packed.dtype == (torch.bfloat16 if compact else dtype)
    assert torch.equal(ops.linear(x, prepared, bias, backend=backend), ops.linear(x, weight, bias, backend=backend))
    assert prepare(weight, cpp_kernel=False).packed is None
    assert torch.equal(ops.linear(x, prepared, bias, backend="reference"), torch.nn.functional.linear(x, weight, bias))


def int8_weight(weight):  # [N, K] float32 -> the LinearWeight of its int8 form: dequantized for torch, packed for C++
    return LinearWeight(read_as(weight, "int8"), pack_int8(weight))


def test_int8_quantization_per_output_column():
    """scale[j] = max_k |w[j, k]| / 127 (1 for a zero row), q = round(w / scale): every |error| <= scale / 2."""
    weight = torch.randn(9, 40, generator=torch.Generator().manual_seed(3))
    weight[4] = 0
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (9,) and scale[4] == 1 and q[4].eq(0).all()
    assert torch.allclose(scale[:4], weight[:4].abs().amax(1) / 127) and q.abs().max() == 127
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()
    packed = pack_int8(weight)
    assert packed.shape == (9, 44) and torch.equal(packed.reshape(-1)[:36].view(torch.float32), scale)
    assert torch.equal(packed.reshape(-1)[36:], pack(q).reshape(-1))


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("k, n", [(37, 5), (384, 131), (61, 64), (200, 339)])
def test_int8_weight_scales_its_sums_and_is_batch_invariant(backend, threads, num_threads, with_bias, k, n):
    """An int8 weight under float32 x: the dequantized weight's product (float64 torch), to float32 rounding, and
    bitwise the same row whatever the batch around it."""
    threads(num_threads)
    x, weight, bias = operands(33, k, n, torch.float32, seed=k + 2)
    bias = bias if with_bias else None
    prepared = int8_weight(weight)
    out = ops.linear(x, prepared, bias, backend=backend)
    expected = torch.nn.functional.linear(x.double(), prepared.weight.double(), None if bias is None else bias.double())
    scale = (x.double().abs() @ prepared.weight.double().abs().T).clamp(min=1)
    assert out.dtype == torch.float32 and ((out.double() - expected).abs() / scale).max() < 1e-6
    for m in range(1, 34):
        assert torch.equal(ops.linear(x[:m], prepared, bias, backend=backend), out[:m]), m
    assert torch.equal(ops.linear(x, prepared, bias, backend="reference"),
                       torch.nn.functional.linear(x, prepared.weight, bias))


@pytest.mark.parametrize("backend", ["cpp"])
def test_int8_weight_is_checked(backend):
    x, weight, bias = operands(4, 8, 6, torch.float32)
    with pytest.raises(ValueError, match="weight"):  # its scale columns missing: K does not match x
        ops.linear(x, packed(pack(quantize_int8(weight)[0])), bias, backend=backend)
    with pytest.raises(TypeError, match="weight"):  # int8 only under float32 x
        ops.linear(x.double(), packed(pack_int8(weight)), bias.double(), backend=backend)
