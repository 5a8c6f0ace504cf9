"""Train the early-exit router's quality predictor on the shipped pair, and measure its calibration.

    python scripts/train_router.py           # writes specbeam/assets/router.safetensors and router_metrics.json
    python scripts/train_router.py --quick   # a smoke run on a few prompts, written to /tmp

Prompts: code prefixes of the stdlib files `train_pair.py` held out (never seen by the models), made as
`make_prompts.py` makes them (the lines before an unindented answer line) with a random number of context
lines, so that prompt lengths vary; prompts of every 4th file are held out for the calibration report.

Each prompt gives one example per decision point t (tokens generated before the router decides, 0 = the
request's start). The target greedily continues the prompt; one forward of each stage over prompt and
continuation gives every logit needed. Features: `specbeam.router` with the stages (draft, target) on the
context = prompt + the first t tokens; the running acceptance is the draft's over those t tokens.

Label: the draft's acceptance over the next `continuation` tokens of the target's greedy continuation,
teacher-forced: the fraction of them that are the draft's argmax at their parent. The predictor is trained
on that fraction with binary cross-entropy (so its output estimates an acceptance rate, what the DP needs);
ECE compares predictions with the fractions; AUC ranks the held-out examples against the binary label
"fraction >= the training examples' median".
"""
import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from itertools import chain, zip_longest
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from make_prompts import file_prompts
from train_pair import CorpusConfig, stdlib_files

from specbeam.assets import load_default_pair
from specbeam.calibration import expected_calibration_error, roc_auc
from specbeam.router import FEATURES, ROUTER_PATH, QualityPredictor, RecentAcceptance, router_features


@dataclass(frozen=True)
class RouterTrainConfig:
    prompts_per_file: int = 64
    context_lines: tuple[int, int] = (2, 30)  # a prompt's lines are drawn uniformly from this range
    max_prompt_tokens: int = 192  # + 64 generated: within the 256 positions the pair was trained on
    decision_points: tuple[int, ...] = (0, 8, 16, 32)  # tokens generated before the router decides
    continuation: int = 32  # tokens after a decision point that its label is measured on
    heldout_every: int = 4  # prompts of held-out file i are held out again (for calibration) when i % 4 == 0
    steps: int = 400  # full-batch AdamW steps
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


QUICK = RouterTrainConfig(prompts_per_file=2, decision_points=(0, 4), continuation=8, steps=20)


# ---------------------------------------------------------------- prompts

def make_prompts(cfg: RouterTrainConfig) -> list[tuple[str, bool]]:
    """(prompt text, held out) pairs, round robin over the held-out stdlib files."""
    _, files = stdlib_files(CorpusConfig())
    rng = random.Random(cfg.seed)
    per_file = []
    for index, path in enumerate(files):
        prompts = file_prompts(path, rng, context_lines=rng.randint(*cfg.context_lines))
        per_file.append([(p["prompt"], index % cfg.heldout_every == 0) for p in prompts[: cfg.prompts_per_file]])
    return [p for p in chain.from_iterable(zip_longest(*per_file)) if p is not None]


# ---------------------------------------------------------------- features and labels

@torch.inference_mode()
def examples(target, draft, ids: torch.Tensor, cfg: RouterTrainConfig) -> list[tuple[int, torch.Tensor, float]]:
    """ids: [L] prompt tokens -> (t, features [F], label) for each decision point t inside the continuation."""
    L, horizon = len(ids), max(cfg.decision_points) + cfg.continuation
    greedy = target.generate(ids[None], attention_mask=torch.ones(1, L, dtype=torch.long),
                             max_new_tokens=horizon, do_sample=False)[0, L:]  # [n], n < horizon after eos
    sequence = torch.cat([ids, greedy])[None, :-1]  # the last greedy token is never an input
    target_logits, draft_logits = target(sequence).logits[0], draft(sequence).logits[0]  # [L + n - 1, V]
    accepted = (draft_logits[L - 1:].argmax(-1) == greedy).tolist()  # [n]: greedy[j] is the draft's argmax
    out = []
    for t in (t for t in cfg.decision_points if t < len(greedy)):
        recent = RecentAcceptance()
        recent.extend(accepted[:t])
        context = slice(0, L + t)  # the features read the last positions of the context
        features = router_features(draft_logits[context], target_logits[context], L + t, L + horizon, recent.value)
        label = sum(accepted[t: t + cfg.continuation]) / len(accepted[t: t + cfg.continuation])
        out.append((t, features, label))
    return out


def dataset(cfg: RouterTrainConfig) -> dict[str, torch.Tensor]:
    """Over all examples: features [R, F], labels [R], t [R] (decision point), heldout [R] bool."""
    target, draft, tokenizer = load_default_pair()
    columns = {"t": [], "features": [], "labels": [], "heldout": []}
    for text, held in tqdm(make_prompts(cfg), desc="prompts", unit="prompt", mininterval=5):
        ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False)[-cfg.max_prompt_tokens:])
        for t, features, label in examples(target, draft, ids, cfg):
            for name, value in zip(columns, (t, features, label, held)):
                columns[name].append(value)
    return {"t": torch.tensor(columns["t"]), "features": torch.stack(columns["features"]),
            "labels": torch.tensor(columns["labels"], dtype=torch.float32), "heldout": torch.tensor(columns["heldout"])}


# ---------------------------------------------------------------- training and evaluation

def fit(features: torch.Tensor, labels: torch.Tensor, cfg: RouterTrainConfig) -> QualityPredictor:
    """features [R, F], labels [R] in [0, 1]: minimise BCE(sigmoid(model(x)), label), full batch."""
    torch.manual_seed(cfg.seed)
    model = QualityPredictor()
    model.standardise_on(features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in (bar := tqdm(range(cfg.steps), desc="fit", unit="step", mininterval=5)):
        loss = F.binary_cross_entropy_with_logits(model(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()


def auc(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> float | None:
    """scores, labels: [R]; AUC against labels >= threshold, None when all fall on one side."""
    positive = labels >= threshold
    return round(roc_auc(scores, positive), 4) if 0 < positive.sum() < len(positive) else None


def calibration(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """probs, labels: [R]; the AUC, and the ECE against the fractions themselves."""
    return {"examples": len(labels), "auc": auc(probs, labels, threshold),
            "ece": round(expected_calibration_error(probs, labels), 4)}


def evaluate(model: QualityPredictor, data: dict[str, torch.Tensor], cfg: RouterTrainConfig) -> dict:
    held, labels, features = data["heldout"], data["labels"], data["features"]
    threshold = labels[~held].median().item()
    probs = model.predict(features)
    return {
        "threshold": round(threshold, 4),
        "train": calibration(probs[~held], labels[~held], threshold),
        "heldout": calibration(probs[held], labels[held], threshold),
        "heldout_by_decision_point": {t: calibration(probs[held & (data["t"] == t)], labels[held & (data["t"] == t)],
                                                     threshold) for t in cfg.decision_points},
        # each feature alone as a score (below 0.5: it ranks backwards): what the MLP adds over it
        "heldout_auc_by_feature": {name: auc(features[held, i], labels[held], threshold)
                               for i, name in enumerate(FEATURES)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few prompts, a few steps, written to /tmp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else RouterTrainConfig()
    out = Path("/tmp/router.safetensors") if args.quick else ROUTER_PATH
    start = time.perf_counter()
    data = dataset(cfg)
    train = ~data["heldout"]
    model = fit(data["features"][train], data["labels"][train], cfg)
    model.save(out)
    metrics = {"config": asdict(cfg), "features": list(FEATURES), "examples": len(data["labels"]),
               "mean_label": round(data["labels"].mean().item(), 4), **evaluate(model, data, cfg),
               "seconds": round(time.perf_counter() - start, 1)}
    out.with_name("router_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
