"""The C++ kernels' parallel loops off the main thread run on specbeam's own worker team
(csrc/kernels/worker_pool.h): the same bits as on the main thread (OpenMP), from any thread and any number of
threads at once, and in a child process forked after the team started (from a thread: libgomp's own team on the
main thread is not fork-safe)."""
import multiprocessing
import threading

import pytest
import torch

from specbeam import ops

pytestmark = pytest.mark.skipif(ops._load_cpp()[0] is None, reason="specbeam._C is not built")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _work(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear wide enough to split over threads, and paged attention over many queries."""
    gen = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(8, 256, generator=gen), torch.randn(4096, 256, generator=gen)
    keys, values = torch.randn(2, 64, 16, 2, 32, generator=gen), torch.randn(2, 64, 16, 2, 32, generator=gen)
    query = torch.randn(40, 4, 32, generator=gen)
    tables = torch.arange(64).view(2, 32)
    attended = ops.paged_attention(query, keys[0], values[0], tables, torch.tensor([300, 200]),
                                   torch.tensor([0, 20, 40]), backend="cpp")
    return ops.linear(x, weight, backend="cpp"), attended


def _in_thread(fn):
    box = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_thread_gets_the_main_threads_bits(two_threads):
    on_main = _work(0)
    assert _same(_in_thread(lambda: _work(0)), on_main)
    assert _same(_work(0), on_main)  # and the main thread's own loop still works after the team started


def test_threads_at_once_each_get_their_own_answer(two_threads):
    expected = [_work(seed) for seed in range(6)]
    results = [None] * 6

    def run(seed: int) -> None:
        for _ in range(5):
            results[seed] = _work(seed)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(_same(r, e) for r, e in zip(results, expected))


def _child(queue) -> None:  # (the main thread's OpenMP is not fork-safe: libgomp's, not ours)
    queue.put([t.tolist() for t in _in_thread(lambda: _work(1))])


def test_a_forked_child_makes_its_own_team(two_threads):
    _in_thread(lambda: _work(1))  # the parent's team exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    child.start()
    got = queue.get(timeout=60)  # before join: the child's queue flushes before it exits
    child.join(timeout=60)
    assert child.exitcode == 0 and got == [t.tolist() for t in _work(1)]


def test_a_caller_thread_that_steps_runs_torch_serially_and_keeps_the_kernels_bits(two_threads):
    """A `generate` caller other than the main thread steps the engine with torch's own operations serial (else
    they open a second OpenMP team beside the main thread's): a logits processor, called on it, sees one thread;
    once the call returns its thread has its count back, the main thread keeps its own, and the kernels on that
    thread give the main thread's bits."""
    from transformers import LogitsProcessorList

    from specbeam import Engine
    from tiny_models import tiny_model

    seen = []

    def record(input_ids, scores):
        seen.append(torch.get_num_threads())
        return scores

    engine, prompt, recording = Engine(tiny_model("llama")), torch.tensor([[5, 6, 7]]), LogitsProcessorList([record])
    main_result = engine.generate(prompt, max_new_tokens=4)
    thread_result, after = _in_thread(lambda: (
        engine.generate(prompt, max_new_tokens=4, logits_processor=recording), _work(3), torch.get_num_threads())[1:])
    assert seen and set(seen) == {1}
    assert after == 2 and torch.get_num_threads() == 2  # the caller's thread has its count back, the main its own
    assert _same(thread_result, _work(3))
    assert torch.equal(engine.generate(prompt, max_new_tokens=4), main_result)


def test_a_caller_thread_prepares_its_call_with_torch_serial(two_threads):
    """A call's preparation (transformers merging its generation config, its processors and criteria built) on a
    thread other than the main one runs torch's operations serially: an OpenMP team opened there would spin on the
    cores that the engine steps on. A value in the generation config, which transformers deep-copies there, sees
    one thread; the caller's thread has its count back afterwards."""
    from transformers import GenerationConfig

    from specbeam import Engine
    from tiny_models import tiny_model

    seen = []

    class CountsThreads:
        def __deepcopy__(self, memo):
            seen.append(torch.get_num_threads())
            return self

    engine, prompt = Engine(tiny_model("llama")), torch.tensor([[5, 6, 7]])
    config = GenerationConfig(max_new_tokens=4, do_sample=False, counts_threads=CountsThreads())
    after = _in_thread(lambda: (engine.generate(prompt, generation_config=config), torch.get_num_threads())[1])
    assert seen and set(seen) == {1}
    assert after == 2
