"""The `specbeam` console script, run in-process on the shipped pair at small sizes."""
import json

import pytest
import torch

from specbeam.assets import PAIR_DIR, load_default_pair
from specbeam.cli import demo, main
from specbeam.cli.modes import DEFAULT_MODES
from test_trace_html import page_data

TARGET, DRAFT = str(PAIR_DIR / "target"), str(PAIR_DIR / "draft")  # the tokenizer is their sibling directory
PROMPTS = PAIR_DIR.parent / "prompts.jsonl"
PROMPT = "import os\n\n\ndef main():\n"


@pytest.fixture(autouse=True)
def offline_and_threads_restored(monkeypatch):
    """No network; `--threads` changes torch's process-wide setting, so put it back."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield load_default_pair()


def table_rows(text: str, labels: list[str]) -> dict[str, str]:
    return {label: line for line in text.splitlines() for label in labels if line.startswith(label + "  ")}


def test_the_pair_loads_offline(pair):
    target, draft, tokenizer = pair
    assert target.config.vocab_size == draft.config.vocab_size == len(tokenizer)


def test_shipped_prompts_end_at_a_line_break_and_give_the_next_line():
    cases = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    assert len(cases) == 20
    assert all(c["prompt"].endswith("\n") and c["answer"].strip() and "\n" not in c["answer"] for c in cases)


def _completion(target, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """transformers' own completion of the prompt, decoded."""
    inputs = tokenizer(prompt, return_tensors="pt")
    out = target.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def test_demo_writes_both_pictures_and_matches_transformers(pair, tmp_path, capsys):
    """The demo prints transformers' own greedy and beam completions as identical to specbeam's, and for
    sampling transformers' completion from its seed."""
    target, _, tokenizer = pair
    assert main(["demo", "--max-new-tokens", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, ["greedy", "beam 4", "sample"])
    assert rows["greedy"].endswith("identical") and rows["beam 4"].endswith("identical")
    for label in ("greedy", "beam 4"):
        mode = {m.label: m for m in DEFAULT_MODES.values()}[label]
        text = _completion(target, tokenizer, demo.PROMPT, 8, **mode.generate_kwargs())
        assert f"--- {label}: transformers = specbeam ---\n{text}\n" in out
    torch.manual_seed(demo.SEED)
    text = _completion(target, tokenizer, demo.PROMPT, 8, **DEFAULT_MODES["sample"].generate_kwargs())
    assert any(f"--- sample: {name} ---\n{text}\n" in out
               for name in (f"transformers (seed {demo.SEED})", "transformers = specbeam"))
    for name in ("beam_tree.png", "acceptance.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert page_data(tmp_path / "beam_tree.html")["prompts"][0]["returned"]  # the page beside the PNGs


@pytest.mark.parametrize("draft_weights", [[], ["--draft-weights", "int8"]], ids=["as-stored", "int8"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_the_draft_prints_what_transformers_generates(pair, num_beams, draft_weights, capsys):
    target, _, tokenizer = pair
    args = ["--prompt", PROMPT, "--num-beams", str(num_beams), "--max-new-tokens", "8", "--threads", "1"]
    assert main(["generate", "--model", TARGET, "--draft", DRAFT, *draft_weights, *args]) == 0
    captured = capsys.readouterr()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    expected = target.generate(**inputs, num_beams=num_beams, do_sample=False, max_new_tokens=8)
    assert captured.out == tokenizer.decode(expected[0, inputs.input_ids.shape[1]:], skip_special_tokens=True) + "\n"
    assert "tokens/s" in captured.err and "accepted" in captured.err


def test_generate_writes_the_beam_trace_page(pair, tmp_path, capsys):
    _, _, tokenizer = pair
    page = tmp_path / "trace.html"
    args = ["--prompt", PROMPT, "--num-beams", "4", "--max-new-tokens", "6", "--threads", "1", "--trace", str(page)]
    assert main(["generate", "--model", TARGET, "--draft", DRAFT, *args]) == 0
    captured = capsys.readouterr()
    assert f"wrote {page}" in captured.err
    best = page_data(page)["prompts"][0]["returned"][0]
    tokens = [page_data(page)["prompts"][0]["nodes"][n]["token"] for n in best["path"]]
    assert captured.out == tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


def test_a_trace_needs_beam_search(tmp_path, capsys):
    assert main(["generate", "--model", TARGET, "--prompt", PROMPT, "--trace", str(tmp_path / "t.html")]) == 1
    assert "--trace draws a beam search" in capsys.readouterr().err and not (tmp_path / "t.html").exists()


def test_eval_on_two_prompts(pair, tmp_path, capsys):
    prompts, results = tmp_path / "two.jsonl", tmp_path / "results.json"
    prompts.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:2]))
    assert main(["eval", "--model", TARGET, "--draft", DRAFT, "--prompts", str(prompts), "--max-new-tokens", "8",
                 "--threads", "1", "--json", str(results)]) == 0
    rows = table_rows(capsys.readouterr().out, ["greedy", "beam 4", "sample"])
    assert rows["greedy"].endswith("2/2") and rows["beam 4"].endswith("2/2")
    by_mode = {r["mode"]: r for r in json.loads(results.read_text())}
    assert by_mode["greedy"]["equal_to_transformers"] == by_mode["beam 4"]["equal_to_transformers"] == 2
    assert all(r["answered"] == 2 and r["latency_seconds"]["p50"] > 0 for r in by_mode.values())
    cases = [json.loads(line) for line in prompts.read_text().splitlines()]
    target, _, tokenizer = pair
    for label in ("greedy", "beam 4"):  # exact matches: transformers' completions' first lines against the answers
        kwargs = {m.label: m for m in DEFAULT_MODES.values()}[label].generate_kwargs()
        first_lines = [_completion(target, tokenizer, c["prompt"], 8, **kwargs).split("\n", 1)[0] for c in cases]
        expected = sum(line.strip() == c["answer"].strip() for line, c in zip(first_lines, cases))
        assert by_mode[label]["exact_matches"] == expected
        assert rows[label].split()[-2] == f"{expected}/2"
    for result in by_mode.values():  # drafted tokens accepted per round: the acceptance rates by depth added up
        assert result["accepted_per_round"] == pytest.approx(sum(result["acceptance_by_depth"]))


def test_chat_without_a_template_fails_clearly(capsys):
    assert main(["generate", "--model", TARGET, "--prompt", "hello", "--chat"]) == 1
    error = capsys.readouterr().err
    assert "tokenizer" in error and str(PAIR_DIR / "tokenizer") in error and "has no chat template" in error


def test_eval_of_the_shipped_cascade(tmp_path, capsys):
    prompts, results, chart = tmp_path / "two.jsonl", tmp_path / "cascade.json", tmp_path / "cascade.png"
    prompts.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:2]))
    assert main(["eval", "--cascade", "--prompts", str(prompts), "--max-new-tokens", "6", "--threads", "1",
                 "--json", str(results), "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    by_config = {r["config"]: r for r in json.loads(results.read_text())}
    lossless = ["two-stage (draft, depth 3)", "three-stage (draft, mid, depth 3)", "cascade (adaptive)", "router λ=inf"]
    assert all(by_config[name]["agreement"] == 2 for name in lossless)  # every lossless configuration: the target's
    assert by_config["router λ=inf"]["stopped_at"] == {"target": 2}
    assert by_config["router λ=0"]["stopped_at"] == {"draft": 2}  # free quality: the smallest draft answers
    assert by_config["three-stage (draft, mid, depth 3)"]["stage_passes"][1] > 0
    assert "heldout" in out or "auc" in out.lower()
    assert chart.stat().st_size > 0
