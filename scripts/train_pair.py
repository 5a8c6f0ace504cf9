"""Train specbeam's shipped target/draft pair on the Python standard library's own sources.

Retrain (from the repository root; one CPU thread: about 65 minutes alone):

    python scripts/train_pair.py                          # writes specbeam/assets/pair/
    python scripts/train_pair.py --quick --out /tmp/pair  # smoke run of every stage, about 10 seconds
    python scripts/train_pair.py --mid-only               # add the middle stage to the shipped pair (~15 minutes)
    python scripts/train_pair.py --draft-only             # train the shipped pair's draft again (~30 minutes)

Stages:
  1. corpus     the stdlib's `.py` files in sorted order, tests, IDLE, generated tables and docs left out;
                every 25th file is held out for evaluation and never seen by the tokenizer or the models
  2. tokenizer  byte-level BPE; `<|endoftext|>` is bos and eos and separates files, `<|pad|>` pads
  3. target     LlamaForCausalLM trained from scratch with cross-entropy
  4. draft      a Llama at most 1/5 of the target's cost per token, distilled from the shipped target
  5. evaluate   both models reloaded from the saved bfloat16 weights, i.e. exactly what ships
  6. mid        the cascade's middle stage (about 0.35 of the target's cost), distilled the same way, evaluated
  7. foreign    the draft's and the mid's greedy agreement on installed packages' code (not the stdlib)

Cost per token is counted as forward FLOPs ~ 2 x (non-embedding parameters + lm_head parameters); the attention
term (~4 x layers x context x hidden) is left out. Same seed, same machine: same weights (one thread, no
nondeterministic ops).
"""
import argparse
import importlib.util
import json
import math
import os
import sysconfig
import time
import tokenize
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread for BPE training and encoding too

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class CorpusConfig:
    # test suites, IDLE, demos, the 2to3 fixers' fixtures, the codecs' generated mapping tables (encodings/)
    # and pydoc's prose topics are not the code we want to model
    exclude_dirs: tuple[str, ...] = (
        "test", "tests", "idlelib", "turtledemo", "lib2to3", "encodings", "pydoc_data",
        "site-packages", "dist-packages", "__pycache__",
    )
    heldout_every: int = 25  # file i is held out when i % heldout_every == 0
    file_stride: int = 1  # keep every k-th file (quick mode)
    vocab_size: int = 4096

    def __post_init__(self):
        if self.heldout_every < 2 or self.file_stride < 1:
            raise ValueError("heldout_every must be >= 2 and file_stride >= 1")


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"heads must divide hidden_size and kv heads must divide heads: {self}")

    def llama_config(self, vocab_size: int, eos_id: int, pad_id: int, max_positions: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    warmup_steps: int
    batch_size: int = 8
    seq_len: int = 256
    min_lr_ratio: float = 0.1  # the cosine decays to min_lr_ratio x lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ce_weight: float = 1.0  # loss = ce_weight x CE(data) + (1 - ce_weight) x KL(teacher || model)

    def __post_init__(self):
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"need 0 <= warmup_steps < steps, got {self.warmup_steps} and {self.steps}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must lie in [0, 1], got {self.ce_weight}")

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


@dataclass(frozen=True)
class PairConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    # 6 query heads of 64 sharing 2 K/V heads (GQA), tied embeddings: ~8.7M parameters
    target: ModelShape = ModelShape(hidden_size=384, intermediate_size=896, num_layers=5, num_heads=6, num_kv_heads=2)
    # ~1.6M parameters, about 0.18 of the target's cost per token
    draft: ModelShape = ModelShape(hidden_size=192, intermediate_size=512, num_layers=2, num_heads=3, num_kv_heads=1)
    # steps of 8 x 256 tokens measured on one thread: target 1.6 s, draft 1.0 s (half of it the teacher's forward);
    # 900 x 1.6 + 1800 x 1.0 s ~ 54 min, plus ~3 min of tokenizer, encoding and evaluation (and the mid's ~15)
    # the cascade's middle stage: ~3.5M parameters, about 0.35 of the target's cost per token
    mid: ModelShape = ModelShape(hidden_size=256, intermediate_size=640, num_layers=3, num_heads=4, num_kv_heads=1)
    target_train: TrainConfig = TrainConfig(steps=900, lr=1e-3, warmup_steps=50)
    draft_train: TrainConfig = TrainConfig(steps=1800, lr=1.5e-3, warmup_steps=50, ce_weight=0.2)
    mid_train: TrainConfig = TrainConfig(steps=600, lr=1.2e-3, warmup_steps=50, ce_weight=0.2)
    max_positions: int = 1024  # RoPE extrapolates past the 256 trained positions; the engine may go further
    max_cost_ratio: float = 0.2
    eval_tokens: int = 131072
    seed: int = 0


QUICK = PairConfig(
    corpus=CorpusConfig(file_stride=10, vocab_size=512),
    target=ModelShape(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=1),
    draft=ModelShape(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=1, num_kv_heads=1),
    target_train=TrainConfig(steps=20, lr=3e-3, warmup_steps=5, seq_len=64),
    draft_train=TrainConfig(steps=20, lr=3e-3, warmup_steps=5, seq_len=64, ce_weight=0.2),
    mid=ModelShape(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1, num_kv_heads=1),
    mid_train=TrainConfig(steps=20, lr=3e-3, warmup_steps=5, seq_len=64, ce_weight=0.2),
    eval_tokens=4096,
)


# ---------------------------------------------------------------- corpus and tokenizer

def stdlib_files(cfg: CorpusConfig) -> tuple[list[Path], list[Path]]:
    """The stdlib's `.py` files sorted by relative path, split into (train, heldout)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & set(cfg.exclude_dirs)),
        key=lambda p: p.relative_to(root).as_posix(),
    )[:: cfg.file_stride]
    heldout = [p for i, p in enumerate(files) if i % cfg.heldout_every == 0]
    train = [p for i, p in enumerate(files) if i % cfg.heldout_every != 0]
    return train, heldout


def read_source(path: Path) -> str:
    with tokenize.open(path) as f:  # honours the file's coding cookie
        return f.read()


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any byte string encodes, and decode(encode(s)) == s."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",  # batched prompts for generation
        clean_up_tokenization_spaces=False,  # code must round-trip exactly
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str], desc: str) -> torch.Tensor:
    """All files as one stream of ids, each file followed by eos: [num_tokens]."""
    ids: list[int] = []
    for text in tqdm(texts, desc=desc, unit="file"):
        ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- models

def param_count(model: LlamaForCausalLM) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def flops_per_token(model: LlamaForCausalLM) -> int:
    """Forward FLOPs per token ~ 2 x (non-embedding parameters + lm_head parameters)."""
    embedding = model.get_input_embeddings().weight.numel()
    lm_head = model.get_output_embeddings().weight.numel()  # the same matrix when tied, counted as a matmul
    return 2 * (param_count(model) - embedding + lm_head)


def build_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, cfg: PairConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = shape.llama_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.max_positions)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def save_bf16(model: LlamaForCausalLM, path: Path) -> None:
    """bfloat16 safetensors halve the size; loading with dtype=torch.float32 casts back exactly."""
    model.to(torch.bfloat16).save_pretrained(path)
    model.to(torch.float32)


def load_saved(path: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


# ---------------------------------------------------------------- training

def sample_windows(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens (inputs and their next tokens): [batch_size, seq_len + 1]."""
    starts = torch.randint(len(stream) - seq_len, (batch_size,), generator=gen)
    return stream[starts[:, None] + torch.arange(seq_len + 1)]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1 over w steps, then cosine from 1 to r over the remaining T - w steps:
    f(t) = t / w for t < w, else r + (1 - r) x (1 + cos(pi x (t - w) / (T - w))) / 2."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: LlamaForCausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains are left alone)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def distill_loss(
    logits: torch.Tensor,  # [N, V] model
    labels: torch.Tensor,  # [N]
    teacher_logits: torch.Tensor | None,  # [N, V] or None
    ce_weight: float,
) -> torch.Tensor:
    """w x CE(labels, q) + (1 - w) x KL(p || q), KL(p || q) = sum_v p_v (log p_v - log q_v), p = teacher, q = model."""
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None:
        return ce
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True, reduction="batchmean")
    return ce_weight * ce + (1 - ce_weight) * kl


def train(
    model: LlamaForCausalLM, stream: torch.Tensor, cfg: TrainConfig, seed: int, desc: str,
    teacher: LlamaForCausalLM | None = None,
) -> dict:
    """Trains in place; returns steps, tokens, seconds and the last steps' mean loss."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    model.train()
    losses, start = [], time.perf_counter()
    for _ in (bar := tqdm(range(cfg.steps), desc=desc, unit="step", mininterval=5)):
        window = sample_windows(stream, cfg.batch_size, cfg.seq_len, gen)
        inputs, labels = window[:, :-1], window[:, 1:]
        logits = model(input_ids=inputs).logits.flatten(0, 1)
        teacher_logits = None
        if teacher is not None:
            with torch.inference_mode():
                teacher_logits = teacher(input_ids=inputs).logits.flatten(0, 1)
        loss = distill_loss(logits, labels.flatten(), teacher_logits, cfg.ce_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    model.eval()
    tail = losses[-max(1, cfg.steps // 20):]
    return {"tokens": cfg.tokens, "seconds": round(time.perf_counter() - start, 1),
            "final_loss": round(sum(tail) / len(tail), 4), **asdict(cfg)}


# ---------------------------------------------------------------- evaluation

@torch.inference_mode()
def evaluate(target: LlamaForCausalLM, draft: LlamaForCausalLM, stream: torch.Tensor, seq_len: int,
             max_tokens: int) -> dict:
    """Teacher-forced on consecutive held-out windows of seq_len + 1 tokens:
    perplexity = exp(mean NLL); greedy agreement = mean [argmax p == argmax q];
    sampling acceptance = mean sum_v min(p_v, q_v), the chance that speculative sampling keeps a draft token."""
    num_windows = min(max_tokens, len(stream) - 1) // seq_len
    windows = stream[: num_windows * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # [W, seq_len + 1]
    nll_t = nll_d = agree = accept = 0.0
    for window in tqdm(windows, desc="evaluate", unit="window", mininterval=5):
        inputs, labels = window[None, :-1], window[1:]
        p_logits, q_logits = target(input_ids=inputs).logits[0], draft(input_ids=inputs).logits[0]  # [T, V]
        nll_t += F.cross_entropy(p_logits, labels, reduction="sum").item()
        nll_d += F.cross_entropy(q_logits, labels, reduction="sum").item()
        agree += (p_logits.argmax(-1) == q_logits.argmax(-1)).sum().item()
        accept += torch.minimum(p_logits.softmax(-1), q_logits.softmax(-1)).sum().item()
    n = num_windows * seq_len
    return {
        "eval_tokens": n,
        "target_heldout_perplexity": round(math.exp(nll_t / n), 3),
        "draft_heldout_perplexity": round(math.exp(nll_d / n), 3),
        "draft_greedy_agreement": round(agree / n, 4),
        "draft_sampling_acceptance": round(accept / n, 4),
    }


def model_metrics(model: LlamaForCausalLM, shape: ModelShape, training: dict) -> dict:
    embedding = model.get_input_embeddings().weight.numel()
    return {"params": param_count(model), "non_embedding_params": param_count(model) - embedding,
            "flops_per_token": flops_per_token(model), "shape": asdict(shape), "training": training}


# ---------------------------------------------------------------- main

def run(cfg: PairConfig, out: Path) -> dict:
    start = time.perf_counter()
    train_files, heldout_files = stdlib_files(cfg.corpus)
    train_texts = [read_source(p) for p in train_files]
    heldout_texts = [read_source(p) for p in heldout_files]

    tokenizer = train_tokenizer(train_texts, cfg.corpus.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    train_stream = token_stream(tokenizer, train_texts, "encode train")
    heldout_stream = token_stream(tokenizer, heldout_texts, "encode heldout")

    target = build_model(cfg.target, tokenizer, cfg, cfg.seed)
    draft = build_model(cfg.draft, tokenizer, cfg, cfg.seed + 1)
    cost_ratio = flops_per_token(draft) / flops_per_token(target)
    if cost_ratio > cfg.max_cost_ratio:
        raise ValueError(f"draft costs {cost_ratio:.3f} of the target per token, above {cfg.max_cost_ratio}")

    target_training = train(target, train_stream, cfg.target_train, cfg.seed, "target")
    save_bf16(target, out / "target")
    teacher = load_saved(out / "target")  # distil from exactly the weights that ship
    draft_metrics, quality = train_draft(cfg, out, draft, teacher, train_stream, heldout_stream)
    mid = train_mid(cfg, out, teacher, train_stream, heldout_stream)
    return {
        "seed": cfg.seed,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "weights_dtype": "bfloat16",
        "corpus": {"python_stdlib": sysconfig.get_python_version(), "train_files": len(train_files),
                   "heldout_files": len(heldout_files), "train_tokens": len(train_stream),
                   "heldout_tokens": len(heldout_stream), **asdict(cfg.corpus)},
        "target": model_metrics(target, cfg.target, target_training),
        "draft": draft_metrics,
        "cost_ratio": round(cost_ratio, 4),
        **quality,
        "mid": mid,
        "foreign_code": foreign_agreement(cfg, out),
        "total_seconds": round(time.perf_counter() - start, 1),
    }


def train_draft(cfg: PairConfig, out: Path, draft: LlamaForCausalLM, teacher: LlamaForCausalLM,
                train_stream: torch.Tensor, heldout_stream: torch.Tensor) -> tuple[dict, dict]:
    """The draft distilled from the shipped target, saved to out / "draft": (its metrics, its held-out quality)."""
    training = train(draft, train_stream, cfg.draft_train, cfg.seed + 1, "draft", teacher=teacher)
    save_bf16(draft, out / "draft")
    quality = evaluate(teacher, load_saved(out / "draft"), heldout_stream, cfg.target_train.seq_len, cfg.eval_tokens)
    return model_metrics(draft, cfg.draft, training), quality


def train_mid(cfg: PairConfig, out: Path, teacher: LlamaForCausalLM, train_stream: torch.Tensor,
              heldout_stream: torch.Tensor) -> dict:
    """The cascade's middle stage, distilled from the shipped target like the draft; saved to out / "mid"."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    mid = build_model(cfg.mid, tokenizer, cfg, cfg.seed + 2)
    training = train(mid, train_stream, cfg.mid_train, cfg.seed + 2, "mid", teacher=teacher)
    save_bf16(mid, out / "mid")
    quality = evaluate(teacher, load_saved(out / "mid"), heldout_stream, cfg.target_train.seq_len, cfg.eval_tokens)
    cost_ratio = round(flops_per_token(mid) / flops_per_token(teacher), 4)
    mid_quality = {k.replace("draft_", "mid_"): v for k, v in quality.items() if k != "target_heldout_perplexity"}
    return {**model_metrics(mid, cfg.mid, training), "cost_ratio": cost_ratio, **mid_quality}


FOREIGN_PACKAGES = ("tqdm", "packaging", "jinja2", "click", "requests", "httpx")  # pure Python, not the stdlib


def foreign_agreement(cfg: PairConfig, out: Path) -> dict:
    """Greedy agreement with the shipped target of the draft and the mid, teacher-forced on Python code that is
    not from the standard library (installed packages' sources, never trained on)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    files = sorted(p for name in FOREIGN_PACKAGES if (spec := importlib.util.find_spec(name)) and spec.origin
                   for p in Path(spec.origin).parent.rglob("*.py"))
    stream = token_stream(tokenizer, [read_source(p) for p in files], "encode foreign")
    target = load_saved(out / "target")
    agreement = {}
    for name in ("draft", "mid"):
        quality = evaluate(target, load_saved(out / name), stream, cfg.target_train.seq_len, cfg.eval_tokens)
        agreement[f"{name}_greedy_agreement"] = quality["draft_greedy_agreement"]
    return {"packages": list(FOREIGN_PACKAGES), "files": len(files), **agreement}


def _streams(cfg: PairConfig, out: Path) -> tuple[PreTrainedTokenizerFast, torch.Tensor, torch.Tensor]:
    """The tokenizer of the pair in `out` and the train and held-out token streams it gives."""
    train_files, heldout_files = stdlib_files(cfg.corpus)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    train_stream = token_stream(tokenizer, [read_source(p) for p in train_files], "encode train")
    heldout_stream = token_stream(tokenizer, [read_source(p) for p in heldout_files], "encode heldout")
    return tokenizer, train_stream, heldout_stream


def run_mid_only(cfg: PairConfig, out: Path) -> dict:
    """Add the middle stage to a pair already in `out`: its tokenizer and target as they are."""
    _, train_stream, heldout_stream = _streams(cfg, out)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["mid"] = train_mid(cfg, out, load_saved(out / "target"), train_stream, heldout_stream)
    metrics["foreign_code"] = foreign_agreement(cfg, out)
    return metrics


def run_draft_only(cfg: PairConfig, out: Path) -> dict:
    """Train the draft of a pair already in `out` again: its tokenizer, target and mid as they are."""
    tokenizer, train_stream, heldout_stream = _streams(cfg, out)
    metrics = json.loads((out / "metrics.json").read_text())
    draft = build_model(cfg.draft, tokenizer, cfg, cfg.seed + 1)
    metrics["draft"], quality = train_draft(cfg, out, draft, load_saved(out / "target"), train_stream, heldout_stream)
    metrics.update(quality)
    metrics["foreign_code"] = foreign_agreement(cfg, out)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "specbeam/assets/pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models and corpus: a smoke run of every stage")
    parser.add_argument("--mid-only", action="store_true", help="add the middle stage to the pair in --out")
    parser.add_argument("--draft-only", action="store_true", help="train the draft of the pair in --out again")
    parser.add_argument("--foreign-only", action="store_true",
                        help="only measure the drafts' agreement on installed packages' code (not the stdlib)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = replace(QUICK if args.quick else PairConfig(), seed=args.seed)
    if args.foreign_only:
        metrics = json.loads((args.out / "metrics.json").read_text())
        metrics["foreign_code"] = foreign_agreement(cfg, args.out)
    else:
        metrics = (run_mid_only if args.mid_only else run_draft_only if args.draft_only else run)(cfg, args.out)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
