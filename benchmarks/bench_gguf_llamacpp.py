"""moeinfer's GGUF files run in llama.cpp itself: same greedy tokens, same top logits?

Not a test (llama.cpp is not a test dependency: llama-cpp-python builds from source in ~15 minutes).
It compares numbers, it times nothing.

    python benchmarks/bench_gguf_llamacpp.py --llama-python /work/llama-venv/bin/python --out-dir /tmp/gguf-check

Steps:
1. build the variants in moeinfer: the shipped model (bf16; q8_0 and q4_0 = moeinfer's symmetric group-32
   presets), REAP-pruned (recipe prune-25) + q4_0, and optionally (--real-shape) a random model with
   OLMoE-1B-7B's layer shapes (hidden 2048, 16 heads, 64 experts top-8, expert inner 1024; few layers, the
   shipped vocabulary so it has a tokenizer), in bf16 and with Q4_0 experts; and optionally (--deepseek)
   random DeepSeek models (llama.cpp's deepseek2): DeepSeek-V2-Lite's attention (MLA without q_lora,
   kv_lora 512, 16 heads, YaRN x40 with mscale 0.707) and FFN shapes with 16 of its 64 experts, 2 layers
   (one dense), and a small DeepSeek-V3-style model (q_lora, sigmoid router with a random correction
   bias, 8 groups keep 4, top-8, routed scaling 2.5), in bf16 and with Q8_0 experts, and (--deepseek-f32)
   in fp32 throughout (F32 file, F32 KV cache in llama.cpp); and optionally (--spm)
   the shipped model with a SentencePiece-style tokenizer (tests/spm_tokenizer.py, Llama's layout,
   trained on the held-out texts), for llama.cpp's "llama" tokenizer on the prompts and on the whole
   held-out texts; and optionally (--deepseek-llm) the shipped model with DeepSeek-LLM/V2's pre-tokenizer
   swapped into its tokenizer (llama.cpp's "deepseek-llm"), the same two comparisons;
   and (--deepseek-llm-vocab FILE, e.g. llama.cpp's models/ggml-vocab-deepseek-llm.gguf: DeepSeek's real
   102k vocabulary, written by llama.cpp's converter) a vocabulary-only file: moeinfer's tokenizer rebuilt
   from it vs llama.cpp's on the whole held-out texts, and vs the reference ids in FILE.inp/.out beside it
   (written by llama.cpp's converter with DeepSeek's own Hugging Face tokenizer);
2. export each with `moeinfer.export(..., format="gguf")` (q8_0/q4_0 experts written without requantizing);
3. moeinfer: greedy continuations of held-out prompts, and the logits at every position of
   prompt + continuation, both in the model's dtype and in fp32 (the same weights upcast);
4. llama.cpp (llama-cpp-python, run by --llama-python in a subprocess: this same file with --worker)
   loads each file, tokenizes the prompts, decodes greedily and returns its logits on the same
   token sequences;
5. compare: tokenization, greedy tokens (matching / first divergence), argmax and top-5 agreement per
   position, max |logit difference| (absolute, and relative to the logits' spread). Results -> JSON +
   a markdown table for docs/interop.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------
# llama.cpp side: runs under the llama-cpp-python interpreter (numpy + llama_cpp only, no torch)
# --------------------------------------------------------------------------------------------------


def worker(job_path: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    job = json.loads(Path(job_path).read_text())
    if job.get("vocab_only"):  # a tokenizer alone: documents as tokenize() gives them, reference cases bare
        llm = Llama(model_path=job["gguf"], vocab_only=True, verbose=False)
        Path(job["result"]).write_text(json.dumps({
            "version": __import__("llama_cpp").__version__,
            "documents": [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in job["documents"]],
            "cases": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in job["cases"]]}))
        return
    # an all-F32 file is run with an F32 KV cache and no flash attention, so llama.cpp keeps fp32 throughout
    exact = dict(type_k=0, type_v=0, flash_attn=False) if job.get("f32") else {}  # 0 = GGML_TYPE_F32
    llm = Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_threads=job["threads"], n_batch=512,
                logits_all=True, verbose=False, seed=0, **exact)
    out: dict[str, Any] = {"tokenized": [], "greedy": [], "logits_file": job["logits_out"]}
    for text in job["texts"]:
        out["tokenized"].append(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    # whole documents, special-token text parsed as tokenizers does (python.txt holds a literal "<s>")
    out["documents"] = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
                        for text in job.get("documents", [])]
    logits = []
    for prompt, seq in zip(job["prompts"], job["sequences"]):
        # greedy continuation from the prompt ids (the same ids moeinfer used)
        llm.reset()
        llm.eval(prompt)
        greedy = []
        for _ in range(job["new_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(nxt)
            llm.eval([nxt])
        out["greedy"].append(greedy)
        # logits on moeinfer's sequence (prompt + moeinfer's continuation), every position
        llm.reset()
        llm.eval(seq)
        logits.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
    np.save(job["logits_out"], np.concatenate(logits, axis=0))
    out["version"] = __import__("llama_cpp").__version__
    Path(job["result"]).write_text(json.dumps(out))


# --------------------------------------------------------------------------------------------------
# moeinfer side
# --------------------------------------------------------------------------------------------------


def prompts(tokenizer: Any, n: int, words: int) -> list[str]:
    """`n` prompts of about `words` words from the shipped held-out texts (english and python, alternately)."""
    from moeinfer.eval.datasets import load_dataset

    texts = [load_dataset("english").text, load_dataset("python").text]
    out = []
    for i in range(n):
        text = texts[i % 2]
        start = (len(text) // (n + 1)) * (i + 1)
        start = text.find("\n", start) + 1
        out.append(" ".join(text[start:start + 4000].split(" ")[:words]).strip())
    return out


def heldout_documents() -> list[str]:
    """The shipped held-out texts, whole (english and python)."""
    from moeinfer.eval.datasets import load_dataset

    return [load_dataset("english").text, load_dataset("python").text]


def greedy(model: Any, ids: list[int], new_tokens: int) -> list[int]:
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.float().argmax()))
    return seq[len(ids):]


def all_logits(model: Any, seqs: list[list[int]]) -> Any:
    import torch

    with torch.no_grad():
        return torch.cat([model(torch.tensor([s]))[0].float() for s in seqs]).numpy()


def real_shape_model(tokenizer: Any, layers: int) -> Any:
    """Random weights, OLMoE-1B-7B's layer shapes, the shipped tokenizer's vocabulary."""
    import torch

    import moeinfer
    from moeinfer.arch import parse_config

    hf = {"model_type": "olmoe", "vocab_size": tokenizer.vocab_size, "hidden_size": 2048, "intermediate_size": 1024,
          "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16,
          "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 4096, "rope_theta": 10000.0, "bos_token_id": tokenizer.bos_token_id,
          "eos_token_id": tokenizer.eos_token_id, "tie_word_embeddings": False}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: ~0.8 GB per layer, not 1.6 in fp32
    try:
        model = moeinfer.MoEModel(parse_config(hf))
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16).eval()
    model.tokenizer = tokenizer
    return model


def deepseek_model(tokenizer: Any, shape: str, layers: int, *, bias: bool) -> Any:
    """Random weights (normal(0, 0.02), norms 1) for a `moeinfer init` shape (moeinfer.loading.shapes), the
    shipped tokenizer's vocabulary; `bias`: a random V3 correction bias, so expert choice depends on it."""
    import torch

    import moeinfer
    from moeinfer.arch import parse_config
    from moeinfer.loading.shapes import resolve_shape

    hf = resolve_shape(f"{shape},vocab_size={tokenizer.vocab_size}", layers=layers)
    torch.manual_seed(0)
    model = moeinfer.MoEModel(parse_config(hf))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        for block in model.moe_blocks():
            correction = block.gate.e_score_correction_bias
            if correction is not None:
                correction.zero_()
                if bias:
                    correction.uniform_(-0.05, 0.05)
        for p in model.parameters():  # bf16 weights; RoPE frequencies and the correction bias stay fp32, as loaded
            p.data = p.data.to(torch.bfloat16)
    model.eval()
    model.tokenizer = tokenizer
    return model


def deepseek_llm_model(tiny: Any) -> Any:
    """The shipped model, its tokenizer's pre-tokenizer replaced by DeepSeek-LLM/V2's (llama.cpp's "deepseek-llm")."""
    import copy

    from tokenizers import Tokenizer as Backend

    from moeinfer.loading.gguf.pretokenizers import build_pre_tokenizer

    model = copy.deepcopy(tiny)
    backend = Backend.from_str(tiny.tokenizer.backend.to_str())  # its own copy: tiny's tokenizer stays as it is
    backend.pre_tokenizer = build_pre_tokenizer("deepseek-llm")
    model.tokenizer = copy.copy(tiny.tokenizer)
    model.tokenizer.backend = backend
    return model


def with_digit_runs(tokenizer: Any) -> Any:
    """A copy of a deepseek-llm tokenizer whose digits step is llama.cpp's: runs of \\p{N} kept whole (regex
    "\\p{N}+", src/llama-vocab.cpp) where DeepSeek's tokenizer.json splits each digit alone (Digits with
    individual_digits); the two differ only on a vocabulary with merges of two numeric characters."""
    import copy

    from tokenizers import Regex, pre_tokenizers

    from moeinfer.loading.gguf.pretokenizers import PRE_STEPS

    steps = [pre_tokenizers.Split(Regex(s if isinstance(s, str) else r"\p{N}+"), behavior="isolated", invert=False)
             for s in PRE_STEPS["deepseek-llm"]]
    out = copy.copy(tokenizer)
    out.backend = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
    out.backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return out


def document_report(tokenizer: Any, text: str, ours: list[int], theirs: list[int]) -> dict[str, Any]:
    """Whether llama.cpp's ids of `text` equal moeinfer's; where not, the first position that differs and the
    tokens around it on both sides."""
    first = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    out: dict[str, Any] = {"chars": len(text), "tokens": len(ours), "llama_tokens": len(theirs),
                           "equal": ours == theirs, "first_difference": first}
    if first is not None:
        def pieces(ids: list[int]) -> list[str]:
            return [tokenizer.decode([i]) for i in ids[max(0, first - 3):first + 6]]

        out["moeinfer_around"], out["llama_around"] = pieces(ours), pieces(theirs)
    return out


def vocab_check(path: Path, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """moeinfer's tokenizer rebuilt from a vocabulary-only GGUF file vs llama.cpp's (held-out texts) and vs the
    reference ids beside it (FILE.inp / FILE.out, llama.cpp's tokenizer test data, when present)."""
    import gguf

    from moeinfer.loading.gguf.archmap import Metadata
    from moeinfer.loading.gguf.vocab import read_tokenizer

    meta = Metadata(gguf.GGUFReader(path).fields, str(path))
    tokenizer = read_tokenizer(meta)
    documents = heldout_documents()
    inp, ref = Path(f"{path}.inp"), Path(f"{path}.out")
    cases = inp.read_text().split("\n__ggml_vocab_test__\n") if inp.is_file() and ref.is_file() else []
    expected = [[int(t) for t in line.split()] for line in ref.read_text().split("\n")[:len(cases)]] if cases else []
    slug = path.name.replace(".", "-")
    job = {"gguf": str(path), "vocab_only": True, "documents": documents, "cases": cases,
           "result": str(out_dir / f"{slug}.llama.json")}
    job_path = out_dir / f"{slug}.job.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([args.llama_python, __file__, "--worker", str(job_path)], capture_output=True, text=True)
    name = f"vocabulary {path.name} ({meta.get('tokenizer.ggml.pre')})"
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr[-2000:]}
    theirs = json.loads(Path(job["result"]).read_text())
    ours_cases = [tokenizer.encode(c, add_special_tokens=False) for c in cases]
    return {"variant": name, "vocab_only": True, "llama_cpp_python": theirs["version"],
            "tokens": len(meta.require("tokenizer.ggml.tokens")),
            "documents": [document_report(tokenizer, d, tokenizer.encode(d), b)
                          for d, b in zip(documents, theirs["documents"])],
            "reference_cases": len(cases),
            "moeinfer_equals_reference": sum(a == b for a, b in zip(ours_cases, expected)),
            "llama_equals_reference": sum(a == b for a, b in zip(theirs["cases"], expected)),
            "reference_mismatches": [{"text": c, "reference": e, "moeinfer": a, "llama": b}
                                     for c, e, a, b in zip(cases, expected, ours_cases, theirs["cases"])
                                     if not a == b == e]}


DEEPSEEK_SHAPES = {
    "deepseek-v2-lite-shape": "DeepSeek-V2-Lite,n_routed_experts=16",
    "deepseek-v3-small": ("DeepSeek-V3,hidden_size=1024,num_attention_heads=16,num_key_value_heads=16,"
                          "q_lora_rank=384,n_routed_experts=32,moe_intermediate_size=256,intermediate_size=2048,"
                          "first_k_dense_replace=1"),
}


def variants(args: argparse.Namespace) -> Iterator[tuple[str, Any, str, bool]]:
    """(name, moeinfer model, --quant for export, reload), one at a time (one real-shape model in memory).
    reload: moeinfer's side runs on the exported file loaded back (for the real-shape q4_0, whose
    quantization by `compress_` takes minutes and GBs here; tests/loading/test_gguf.py shows that
    file = `compress_(model, "q4_0")` bit for bit on the shipped model)."""
    import copy

    import moeinfer
    from moeinfer.compress.calibration import CalibrationConfig

    tiny = moeinfer.load("tiny", progress=False)
    yield "tiny bf16", tiny, "auto", False
    for q in ("q8_0", "q4_0"):
        m = copy.deepcopy(tiny)
        moeinfer.compress_(m, q, progress=False)
        yield f"tiny {q}", m, "auto", False
    pruned = copy.deepcopy(tiny)
    # the presets prune-25 then q4_0, as one recipe
    recipe = [{"method": "prune_reap", "ratio": 0.25}, {"method": "quantize", "bits": 4, "group_size": 32,
                                                       "algorithm": "sym"}]
    moeinfer.compress_(pruned, recipe, calibration=CalibrationConfig(source="heldout"), progress=False)
    yield "tiny REAP-25% + q4_0", pruned, "auto", False
    if args.spm:
        import dataclasses

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test's tokenizer builder
        from spm_tokenizer import moeinfer_tokenizer

        spm = copy.deepcopy(tiny)
        spm.tokenizer = moeinfer_tokenizer("normalizer")
        spm.config = dataclasses.replace(spm.config, bos_token_id=1, eos_token_ids=(2,))
        yield "tiny spm-tokenizer bf16", spm, "auto", False
    if args.deepseek_llm:
        yield "tiny deepseek-llm-tokenizer bf16", deepseek_llm_model(tiny), "auto", False
    if args.deepseek:
        for label, shape in DEEPSEEK_SHAPES.items():
            model = deepseek_model(tiny.tokenizer, shape, args.deepseek_layers, bias="v3" in label)
            yield f"{label} {args.deepseek_layers}L bf16", model, "auto", False
            yield f"{label} {args.deepseek_layers}L q8_0", model, "q8_0", True
            if args.deepseek_f32:
                yield f"{label} {args.deepseek_layers}L f32", model.float(), "f32", False
            del model
    if args.real_shape:
        big = real_shape_model(tiny.tokenizer, args.real_shape_layers)
        yield f"olmoe-shape {args.real_shape_layers}L bf16", big, "auto", False
        yield f"olmoe-shape {args.real_shape_layers}L q4_0", big, "q4_0", True


def compare(name: str, model: Any, quant: str, reload: bool, args: argparse.Namespace, out_dir: Path
            ) -> dict[str, Any]:
    import copy

    import numpy as np
    import torch

    import moeinfer

    slug = name.replace(" ", "-").replace("%", "").replace("+", "")
    path = out_dir / f"{slug}.gguf"
    report = moeinfer.export(model, path, format="gguf", quant=quant, overwrite=True, progress=False)
    if reload:
        model = moeinfer.load(path, progress=False)
    texts = prompts(model.tokenizer, args.prompts, args.words)
    documents = heldout_documents() if "tokenizer" in name else []
    ids = [model.tokenizer.encode(t) for t in texts]
    conts = [greedy(model, p, args.new_tokens) for p in ids]
    seqs = [p + c for p, c in zip(ids, conts)]
    ours = all_logits(model, seqs)
    small = sum(p.numel() for p in model.parameters()) < 300_000_000
    model32 = None
    if small:  # fp32: the same weights upcast
        model32 = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    ours32 = all_logits(model32, seqs) if small else None
    conts32 = [greedy(model32, p, args.new_tokens) for p in ids] if small else None
    job = {"gguf": str(path), "n_ctx": max(len(s) for s in seqs) + 8, "threads": args.threads, "texts": texts,
           "prompts": ids, "sequences": seqs, "new_tokens": args.new_tokens, "f32": quant == "f32",
           "documents": documents,
           "logits_out": str(out_dir / f"{slug}.llama-logits.npy"), "result": str(out_dir / f"{slug}.llama.json")}
    job_path = out_dir / f"{slug}.job.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([args.llama_python, __file__, "--worker", str(job_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr[-2000:]}
    theirs_json = json.loads(Path(job["result"]).read_text())
    theirs = np.load(job["logits_out"])

    def diffs(a: Any, b: Any) -> dict[str, float]:
        d = np.abs(a - b)
        spread = a.std(axis=-1, keepdims=True)
        top5 = np.mean([len(set(np.argsort(-x)[:5]) & set(np.argsort(-y)[:5])) / 5 for x, y in zip(a, b)])
        return {"max_abs": float(d.max()), "max_rel_to_std": float((d / spread).max()),
                "argmax_agree": float(np.mean(a.argmax(-1) == b.argmax(-1))), "top5_overlap": float(top5)}

    def match(mine: list[list[int]] | None) -> tuple[list[float], list[int | None]] | tuple[None, None]:
        if mine is None:
            return None, None
        frac = [sum(x == y for x, y in zip(c, g)) / len(c) for c, g in zip(mine, theirs_json["greedy"])]
        first = [next((i for i, (x, y) in enumerate(zip(c, g)) if x != y), None)
                 for c, g in zip(mine, theirs_json["greedy"])]
        return frac, first

    greedy_match, first_div = match(conts)
    greedy_match32, first_div32 = match(conts32)
    return {
        "variant": name, "file": path.name, "file_mib": path.stat().st_size / 2**20,
        "types": report.type_counts(), "notes": report.notes, "llama_cpp_python": theirs_json["version"],
        "tokenization_equal": [a == b for a, b in zip(ids, theirs_json["tokenized"])],
        "documents": [document_report(model.tokenizer, d, a, b) for d, a, b in
                      zip(documents, [model.tokenizer.encode(d) for d in documents], theirs_json["documents"])],
        # deepseek-llm: are the differences all llama.cpp's digit runs? (its ids vs moeinfer's with that step)
        "documents_equal_with_llama_digit_runs": [with_digit_runs(model.tokenizer).encode(d) == b for d, b in
                                                  zip(documents, theirs_json["documents"])]
        if "deepseek-llm" in name else None,
        "greedy_match_fraction": greedy_match, "first_divergence": first_div,
        "greedy_match_fraction_fp32": greedy_match32, "first_divergence_fp32": first_div32,
        "positions": int(ours.shape[0]),
        "vs_moeinfer_model_dtype": diffs(ours, theirs),
        "vs_moeinfer_fp32": diffs(ours32, theirs) if ours32 is not None else None,
        "moeinfer_dtype_vs_fp32": diffs(ours32, ours) if ours32 is not None else None,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| variant | file | tokenization equal | greedy tokens equal | moeinfer in | argmax agree | "
             "top-5 overlap | max abs logit diff | same / logit std | (moeinfer bf16 vs fp32: max abs) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("vocab_only"):
            continue
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'].strip().splitlines()[-1][:200]} |||||||||")
            continue
        for which, v, g in (("model dtype", r["vs_moeinfer_model_dtype"], r["greedy_match_fraction"]),
                            ("fp32", r["vs_moeinfer_fp32"], r["greedy_match_fraction_fp32"])):
            if v is None:
                continue
            own = f"{r['moeinfer_dtype_vs_fp32']['max_abs']:.4f}" if r["moeinfer_dtype_vs_fp32"] else "-"
            lines.append(
                f"| {r['variant']} | {r['file_mib']:.1f} MiB {r['types']} | {sum(r['tokenization_equal'])}/"
                f"{len(r['tokenization_equal'])} | {sum(x == 1.0 for x in g)}/{len(g)} prompts "
                f"({100 * sum(g) / len(g):.0f}% of tokens) | {which} | {100 * v['argmax_agree']:.1f}% | "
                f"{100 * v['top5_overlap']:.1f}% | {v['max_abs']:.4f} | {v['max_rel_to_std']:.4f} | {own} |")
    tokenized = [r for r in results if r.get("documents") and "error" not in r]
    if tokenized:
        lines += ["", "| variant | held-out text | characters | moeinfer tokens | llama.cpp tokens | equal | "
                  "first difference (moeinfer / llama.cpp tokens around it) |", "|---|---|---|---|---|---|---|"]
        for r in tokenized:
            for name, d in zip(("english", "python"), r["documents"]):
                around = "" if d["equal"] else f"at {d['first_difference']}: {d['moeinfer_around']!r} / " \
                                               f"{d['llama_around']!r}"
                lines.append(f"| {r['variant']} | {name} | {d['chars']} | {d['tokens']} | {d['llama_tokens']} | "
                             f"{'yes' if d['equal'] else 'no'} | {around} |")
            digit_runs = r.get("documents_equal_with_llama_digit_runs")
            if digit_runs:
                lines.append(f"| {r['variant']}, moeinfer with llama.cpp's digit runs | english, python | | | | "
                             f"{', '.join('yes' if e else 'no' for e in digit_runs)} | |")
        for r in tokenized:
            if r.get("reference_cases"):
                lines.append(f"\n{r['variant']}: reference cases equal, moeinfer {r['moeinfer_equals_reference']}/"
                             f"{r['reference_cases']}, llama.cpp {r['llama_equals_reference']}/{r['reference_cases']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--llama-python", default="/work/llama-venv/bin/python",
                   help="interpreter with llama-cpp-python installed")
    p.add_argument("--out-dir", default="gguf-llamacpp-check")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--words", type=int, default=24, help="words per prompt")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--real-shape", action="store_true",
                   help="add an OLMoE-shaped random model (about 0.8 GB per layer in bf16)")
    p.add_argument("--real-shape-layers", type=int, default=1)
    p.add_argument("--spm", action="store_true", help="add the shipped model with a SentencePiece-style tokenizer")
    p.add_argument("--deepseek-llm", action="store_true",
                   help="add the shipped model with DeepSeek-LLM/V2's pre-tokenizer (llama.cpp's deepseek-llm)")
    p.add_argument("--deepseek-llm-vocab", type=Path, default=None,
                   help="a vocabulary-only GGUF file (llama.cpp's models/ggml-vocab-deepseek-llm.gguf) to compare "
                        "tokenizers on")
    p.add_argument("--deepseek", action="store_true",
                   help="add random DeepSeek-V2-Lite-shaped and small V3-style models (llama.cpp's deepseek2)")
    p.add_argument("--deepseek-layers", type=int, default=2)
    p.add_argument("--deepseek-f32", action="store_true", help="with --deepseek: also each model in fp32")
    p.add_argument("--only", nargs="*", default=None, help="run the variants whose name contains one of these words")
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import torch

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, model, quant, reload in variants(args):
        if args.only and not any(word in name for word in args.only):
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        results.append(compare(name, model, quant, reload, args, out_dir))
        del model
        print(json.dumps(results[-1], indent=1), file=sys.stderr, flush=True)
    if args.deepseek_llm_vocab:
        results.append(vocab_check(args.deepseek_llm_vocab, args, out_dir))
        print(json.dumps(results[-1], indent=1, ensure_ascii=False)[:4000], file=sys.stderr, flush=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
