"""Train `moeinfer-tiny`, the reference MoE that ships with moeinfer, from scratch on the CPU.

Shapes: B batch rows, T context, V vocab, N = B*T tokens, E experts, K top-k.

The model is a Mixtral (Jiang et al., 2024): 8 experts, top-2, built with moeinfer's own classes
(`moeinfer.arch.parse_config` on a Mixtral config.json dict, `MoEModel`), so `moeinfer.load` and
transformers' `MixtralForCausalLM` both read the checkpoint unchanged. The loss is next-token
cross-entropy plus the Switch Transformer load-balancing loss (Fedus et al., 2022):
aux = E * sum_e f_e * P_e, f_e = share of the N*K token-slots sent to expert e, P_e = mean router
probability of e, averaged over layers and weighted by `--aux-coef` (balanced routing gives 1).

Steps:
1. byte-level BPE tokenizer (`tokenizers`), trained on the train split with equal bytes of both
   domains; `<s>` is prepended by the tokenizer's post-processor, `</s>` ends each document;
2. tokenize each domain's train and eval documents into one token stream each (cached under --work);
3. build and initialise the model (normal std 0.02, residual output projections 0.02/sqrt(2L),
   norms 1); training swaps the expert-compute stage for an autograd-friendly one (unbind + cat,
   checked against the eager reference at start-up) — the same math;
4. AdamW, linear warm-up then cosine decay over the WALL-CLOCK budget, so a run of any length ends at
   a low learning rate; every batch holds half English, half Python random crops;
5. every `--checkpoint-min` minutes: held-out loss on fixed windows, a resumable state
   (`<work>/state.pt`) and a bf16 checkpoint written through `moeinfer.save` into `--dest`, so a
   run cut short still leaves a usable model; at the end the same, plus the loss curve PNG.

Run (corpus from tools/build_corpus.py):
    python tools/train_reference.py --budget-min 70 --threads 2
    python tools/train_reference.py --report     # held-out numbers, xz baseline, expert heat map

`--report` evaluates the shipped checkpoint (fp32 compute) on the shipped held-out texts with
`moeinfer.eval.evaluate` (context 256, stride 128), compresses the same files with xz preset 9e
(Python's lzma, the library behind `xz -9e`), counts expert choices per layer and domain and writes
docs/reference-eval.json and docs/reference-experts.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moeinfer.arch import parse_config
from moeinfer.model import moe
from moeinfer.model.transformer import MoEModel

REPO = Path(__file__).resolve().parent.parent
DOMAINS = ("english", "python")
BOS, EOS = "<s>", "</s>"


def mixtral_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config.json dict (transformers v5 field names)."""
    return {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
        "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.inner,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
        "num_local_experts": args.experts, "num_experts_per_tok": args.top_k,
        "max_position_embeddings": args.context, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None,
        "router_aux_loss_coef": args.aux_coef, "output_router_logits": False, "router_jitter_noise": 0.0,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }


# 1. tokenizer ----------------------------------------------------------------------------------

def read_docs(corpus: Path, part: str, domain: str) -> list[str]:
    with open(corpus / part / f"{domain}.jsonl") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(corpus: Path, vocab: int, seed: int, dest: Path) -> None:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    english = read_docs(corpus, "train", "english")
    python = read_docs(corpus, "train", "python")
    random.Random(seed).shuffle(python)
    budget, sample = sum(len(t) for t in english), []
    for text in python:  # equal bytes of both domains, so neither owns the merges
        if budget <= 0:
            break
        sample.append(text)
        budget -= len(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(english + sample, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 0), (EOS, 1)])
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))


def tokenizer_config() -> dict[str, Any]:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "model_max_length": 256, "clean_up_tokenization_spaces": False}


def load_tokenizer(path: Path) -> Any:
    from moeinfer.loading.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


# 2. token streams ------------------------------------------------------------------------------

def token_stream(tok: Any, docs: list[str]) -> np.ndarray:
    """Documents as <s> ... </s> back to back, uint16."""
    out: list[int] = []
    for enc in tok.backend.encode_batch(docs):
        out.extend(enc.ids)
        out.append(tok.eos_token_id)
    return np.asarray(out, dtype=np.uint16)


def load_streams(tok: Any, corpus: Path, work: Path) -> dict[tuple[str, str], np.ndarray]:
    streams = {}
    for part in ("train", "eval"):
        for domain in DOMAINS:
            cache = work / f"tokens-{part}-{domain}.npy"
            if not cache.is_file():
                np.save(cache, token_stream(tok, read_docs(corpus, part, domain)))
            streams[part, domain] = np.load(cache)
    return streams


def sample_batch(streams: dict[tuple[str, str], np.ndarray], part: str, rows: int, context: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """[rows, context+1] random crops; the first half English, the second Python."""
    out = []
    for i in range(rows):
        s = streams[part, DOMAINS[0] if i < rows // 2 else DOMAINS[1]]
        start = int(rng.integers(0, len(s) - context - 1))
        out.append(torch.from_numpy(s[start:start + context + 1].astype(np.int64)))
    return torch.stack(out)


# 3. model --------------------------------------------------------------------------------------

def init_weights_(model: MoEModel) -> None:
    std = 0.02
    residual_std = std / math.sqrt(2 * model.config.num_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj")):
            torch.nn.init.normal_(p, std=residual_std)
        else:
            torch.nn.init.normal_(p, std=std)


def _train_experts_forward(self: moe.Experts, x: torch.Tensor, routing: moe.Routing) -> torch.Tensor:
    """Experts.forward with per-expert weights taken by `unbind` (one gradient stack) instead of
    indexing (a full-size zero gradient per expert) and outputs joined by `cat`; same math."""
    d = moe.dispatch(routing.indices, self.num_experts)
    xs = x[d.tokens]  # [S, D]
    gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
    ys = []
    for e, seg in enumerate(xs.split(d.counts.tolist())):
        if seg.shape[0]:
            gate, up = F.linear(seg, gate_up[e]).chunk(2, dim=-1)
            ys.append(F.linear(F.silu(gate) * up, down[e]))
    return moe.combine(torch.cat(ys), d, routing.weights, x.shape[0])


def use_training_experts_(model: MoEModel, *, check: bool = True) -> None:
    for block in model.moe_blocks():
        if check:
            x = torch.randn(37, model.config.hidden_size)
            r = block.gate(x)
            with torch.no_grad():
                ref = block.experts(x, r)
                new = _train_experts_forward(block.experts, x, r)
            torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
        block.experts.forward = types.MethodType(_train_experts_forward, block.experts)


class RouterStats:
    """Observer on every MoE block: keeps this forward's router logits for the balancing loss."""

    def __init__(self, model: MoEModel) -> None:
        self.routings: list[moe.Routing] = []
        self.E, self.K = model.config.num_experts, model.config.top_k
        for block in model.moe_blocks():
            block.observer = self

    def __call__(self, layer_idx: int, routing: moe.Routing) -> None:
        self.routings.append(routing)

    def aux_loss(self) -> torch.Tensor:
        """Switch load-balancing loss, E * sum_e f_e * P_e, averaged over layers (1 when balanced)."""
        losses = []
        for r in self.routings:
            probs = r.logits.softmax(-1)  # [N, E]
            f = torch.bincount(r.indices.reshape(-1), minlength=self.E).float() / r.indices.numel()
            losses.append(self.E * (f * probs.mean(0)).sum())
        self.routings = []
        return torch.stack(losses).mean()


# 5. checkpoints --------------------------------------------------------------------------------

@torch.no_grad()
def held_out_loss(model: MoEModel, batches: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for domain, batch in batches.items():
        logits = model(batch[:, :-1])
        out[domain] = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    return out


def ship(model: MoEModel, tok: Any, dest: Path, dtype: torch.dtype) -> None:
    from moeinfer.api import save

    for block in model.moe_blocks():
        block.observer = None
    tok_attr, model.tokenizer = model.tokenizer, None
    clone = copy.deepcopy(model).to(dtype)
    model.tokenizer = tok_attr
    for block in clone.moe_blocks():
        block.experts.__dict__.pop("forward", None)
    clone.tokenizer = tok
    save(clone, dest, overwrite=True)  # re-shipping replaces the previous reference checkpoint


def plot(log: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in log if "loss" in r]
    for key, label in (("loss_english", "train, English"), ("loss_python", "train, Python")):
        vals = np.array([r[key] for r in log if "loss" in r])
        k = min(25, len(vals))
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid") if k else vals
        ax.plot(steps[k - 1:] if k else steps, smooth, label=f"{label} (mean of {k} steps)")
    evals = [r for r in log if "eval_english" in r]
    for key, label in (("eval_english", "held out, English"), ("eval_python", "held out, Python")):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o--", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("moeinfer-tiny training (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expert_usage(model: MoEModel, text: str, *, context: int, windows: int) -> np.ndarray:
    """Share of top-k choices per expert at each MoE layer [L, E] over the text's first `windows`
    non-overlapping windows (through moeinfer.traces.trace when present, else a plain observer)."""
    ids = torch.tensor(model.tokenizer.encode(text)[: context * windows])
    batch = ids[: len(ids) // context * context].view(-1, context)  # [W, C]
    L, E = len(model.moe_blocks()), model.config.num_experts
    try:
        from moeinfer.traces.trace import record_routing
    except ImportError:
        record_routing = None
    if record_routing is not None:
        with torch.no_grad(), record_routing(model, logits=False) as rec:
            model(batch)
        experts = rec.trace().experts  # [N, L, K]
        counts = np.stack([np.bincount(experts[:, layer][experts[:, layer] >= 0], minlength=E)
                           for layer in range(experts.shape[1])])
    else:
        counts = np.zeros((L, E))
        layer_of = {b.layer_idx: i for i, b in enumerate(model.moe_blocks())}

        def observe(layer_idx: int, routing: moe.Routing) -> None:
            counts[layer_of[layer_idx]] += np.bincount(routing.indices.reshape(-1).numpy(), minlength=E)

        for block in model.moe_blocks():
            block.observer = observe
        with torch.no_grad():
            model(batch)
        for block in model.moe_blocks():
            block.observer = None
    return counts / counts.sum(1, keepdims=True)


def report(out_json: Path, out_png: Path) -> None:
    import lzma

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import moeinfer
    from moeinfer.eval import evaluate
    from moeinfer.eval.datasets import DATA_DIR, DATASETS

    model = moeinfer.load("tiny", dtype=torch.float32, progress=False)
    rows: dict[str, Any] = {"params": model.num_parameters(), "domains": {}}
    usage = {}
    for name, fname in DATASETS.items():
        raw = (DATA_DIR / fname).read_bytes()
        xz = len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
        t0 = time.time()
        r = evaluate(model, name, context=256, stride=128, batch_size=16)
        rows["domains"][name] = {**r.to_dict(), "xz_bytes": xz, "xz_bits_per_byte": 8 * xz / len(raw),
                                 "eval_seconds": round(time.time() - t0, 1)}
        print(r, f"| xz -9e {8 * xz / len(raw):.4f} bits/byte", flush=True)
        usage[name] = expert_usage(model, (DATA_DIR / fname).read_text(), context=256, windows=64)
        rows["domains"][name]["expert_share"] = usage[name].round(4).tolist()
    out_json.write_text(json.dumps(rows, indent=2))
    fig, axes = plt.subplots(1, len(usage), figsize=(4.2 * len(usage), 3.2), sharey=True)
    vmax = max(u.max() for u in usage.values())
    for ax, (name, u) in zip(axes, usage.items()):
        im = ax.imshow(u, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"{name} (held out)")
        ax.set_xlabel("expert")
        ax.set_xticks(range(u.shape[1]))
        ax.set_yticks(range(u.shape[0]))
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes, label="share of top-2 choices")
    fig.suptitle("moeinfer-tiny: expert usage per layer (16k tokens per domain)", y=1.04)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=REPO / "out" / "corpus")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "train")
    ap.add_argument("--dest", type=Path, default=REPO / "moeinfer" / "models" / "moeinfer-tiny")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "reference-loss.png")
    ap.add_argument("--budget-min", type=float, help="wall-clock training budget, minutes (required to train)")
    ap.add_argument("--report", action="store_true", help="evaluate the shipped checkpoint instead of training")
    ap.add_argument("--checkpoint-min", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from <work>/state.pt")
    ap.add_argument("--vocab", type=int, default=6144)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--inner", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="rows per step, half per domain")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.report:
        report(REPO / "docs" / "reference-eval.json", REPO / "docs" / "reference-experts.png")
        return
    if args.budget_min is None:
        ap.error("--budget-min is required to train")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # 1.-2. tokenizer and token streams
    tok_dir = args.work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(args.corpus, args.vocab, args.seed, tok_dir)
    tok = load_tokenizer(tok_dir)
    streams = load_streams(tok, args.corpus, args.work)
    for (part, domain), s in streams.items():
        print(f"{part:5s} {domain:8s} {len(s):>10,d} tokens", flush=True)
    eval_rng = np.random.default_rng(12345)
    eval_batches = {d: torch.stack([sample_batch(streams, "eval", 2, args.context, eval_rng)[0 if d == "english" else 1]
                                    for _ in range(16)]) for d in DOMAINS}

    # 3. model
    hf = mixtral_config(args)
    model = MoEModel(parse_config(hf))
    init_weights_(model)
    use_training_experts_(model)
    stats = RouterStats(model)
    counts = model.num_parameters()
    print(f"parameters: total {counts['total']:,d}, active per token {counts['active']:,d}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=True)
    step, tokens_seen, elapsed_before, log = 0, 0, 0.0, []
    state_path = args.work / "state.pt"
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, tokens_seen, elapsed_before, log = state["step"], state["tokens"], state["elapsed"], state["log"]
        rng = state["rng"]
        print(f"resumed at step {step}", flush=True)
    budget = args.budget_min * 60

    def save_all(final: bool) -> None:
        model.eval()
        ev = held_out_loss(model, eval_batches)
        model.train()
        log.append({"step": step, "tokens": tokens_seen, "eval_english": ev["english"], "eval_python": ev["python"]})
        print(f"step {step} held-out loss english {ev['english']:.3f} python {ev['python']:.3f}", flush=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "tokens": tokens_seen,
                    "elapsed": elapsed_before + time.time() - t_train, "log": log, "rng": rng,
                    "args": vars(args)}, args.work / "state.tmp")
        (args.work / "state.tmp").replace(state_path)
        ship(model, tok, args.dest, getattr(torch, args.dtype))
        stats.__init__(model)  # ship() cleared the observers
        (args.work / "log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "log": log, "final": final}))
        plot(log, args.plot)

    # 4. training
    model.train()
    t_train = time.time()
    last_ckpt = t_train
    while True:
        elapsed = elapsed_before + time.time() - t_train
        if elapsed >= budget:
            break
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (
            args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sample_batch(streams, "train", args.batch, args.context, rng)  # [B, T+1]
        logits = model(batch[:, :-1])  # [B, T, V]
        per_tok = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(args.batch, -1)
        ce = per_tok.mean()
        aux = stats.aux_loss()
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        step += 1
        tokens_seen += batch[:, 1:].numel()
        half = args.batch // 2
        rec = {"step": step, "tokens": tokens_seen, "time": round(elapsed, 1), "lr": lr, "loss": ce.item(),
               "loss_english": per_tok[:half].mean().item(), "loss_python": per_tok[half:].mean().item(),
               "aux": aux.item(), "grad_norm": gnorm}
        log.append(rec)
        if step % 10 == 0:
            rate = tokens_seen / max(elapsed, 1e-9)
            print(f"step {step:5d} t {elapsed / 60:6.1f}m lr {lr:.2e} loss {rec['loss']:.3f} "
                  f"(en {rec['loss_english']:.3f} py {rec['loss_python']:.3f}) aux {rec['aux']:.3f} "
                  f"gnorm {gnorm:.2f} {rate:.0f} tok/s", flush=True)
        if time.time() - last_ckpt >= args.checkpoint_min * 60:
            save_all(final=False)
            last_ckpt = time.time()

    # 5. final checkpoint
    save_all(final=True)
    print(f"done: {step} steps, {tokens_seen:,d} tokens, {(time.time() - t_start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
