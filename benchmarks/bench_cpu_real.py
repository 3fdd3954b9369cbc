"""moeinfer vs llama.cpp vs transformers on a real-shape MoE on the CPU: batch-1 greedy decode and
prefill at bf16, int8 (Q8_0) and int4 (Q4_0), on the same weights, beside the machine's measured
read bandwidth.

    python benchmarks/bench_cpu_real.py                          # OLMoE-1B-7B shape, 8 layers (~3.5B, 7 GB)
    python benchmarks/bench_cpu_real.py --layers 2 --shape hidden_size=256,intermediate_size=128 --reps 1
    python benchmarks/bench_cpu_real.py --llama-python /work/llama-venv/bin/python --threads 2

Steps:
1. the model: `moeinfer init --arch olmoe --shape OLMoE-1B-7B --layers N` (random weights, real shapes);
2. llama.cpp's files, made by llama.cpp's own tools from the same checkpoint: `convert_hf_to_gguf.py`
   (carried by the llama-cpp-python sdist, vendor/llama.cpp) with outtype bf16 and q8_0, and Q4_0 by
   the binding's `llama_model_quantize` from the bf16 file (`--pure`: every matrix Q4_0, as moeinfer's
   q4_0 format; without it llama.cpp keeps the output matrix at Q6_K). The converter does not know
   moeinfer's tokenizer's pre-tokenizer hash; the benchmark feeds token ids, so it is told "default";
3. moeinfer's files: `compress_(model, "q8_0" / "q4_0")` (or the "-all" presets with `--scope all`),
   saved once; the symmetric scheme rounds exactly as ggml's Q8_0/Q4_0, and one expert tensor of each
   GGUF is dequantized with the `gguf` package and compared with moeinfer's (recorded: `weights_equal`);
4. the machine: CPU model and flags, and the read bandwidth, the best of several methods (torch fp32
   matrix-vector product, a torch sum, a numpy sum, half a torch copy), all with `--threads` threads;
5. measurements, interleaved: for every repetition, every (precision, system) runs in a fresh process
   with `--threads` threads: prefill = prompt tokens / time to the first token of a P-token prompt
   (P in `--prompts`), decode = (tokens - 1) / time from the first to the last of `--decode-tokens`
   greedy tokens after a 16-token prompt; llama.cpp runs in a subprocess of `--llama-python`; right
   before each run, the read bandwidth of that moment (the best of step 4's methods, 3 repeats each),
   since a shared VM's bandwidth moves by up to 2x between minutes;
6. results: JSON (every run, medians, bandwidth, roofline %, versions) and a markdown table for
   docs/benchmarks.md: % of roofline against step 4's bandwidth, and (median over runs) against the
   bandwidth measured right before each run.

llama.cpp is never a test dependency: `--llama-python` names an interpreter with llama-cpp-python
0.3.36; without it a venv is made under benchmarks/.llama-venv with `pip install
llama-cpp-python==0.3.36` (a ~15-minute build from source; on AMX CPUs with -mno-amx-* because
llama.cpp's AMX Q8_0/Q4_0 path crashes on the first decode, a known llama.cpp issue).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

from moeinfer.cpuinfo import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
LLAMA_VERSION = "0.3.36"
PRECISIONS = ("bf16", "int8", "int4")
SYSTEMS = ("moeinfer", "llama.cpp", "transformers")
GGUF_TYPE = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
MOEINFER_PRESET = {"int8": "q8_0", "int4": "q4_0"}
DECODE_PROMPT = 16

# --------------------------------------------------------------------------------------------------
# workers (run in fresh processes; each prints one JSON line)
# --------------------------------------------------------------------------------------------------

LLAMA_WORKER = r"""
import json, sys, time
import numpy as np
import llama_cpp
cfg = json.loads(sys.argv[1])
t = cfg["threads"]
llm = llama_cpp.Llama(model_path=cfg["gguf"], n_ctx=max(cfg["prompts"]) + cfg["decode_tokens"] + 64, n_batch=512,
                      n_ubatch=512, n_threads=t, n_threads_batch=t, logits_all=False, verbose=False, seed=0)
rng = np.random.default_rng(0)
def prompt(n):
    return [int(x) for x in rng.integers(2, cfg["vocab"], n)]
def prefill(ids):
    llm.reset(); t0 = time.perf_counter(); llm.eval(ids); return time.perf_counter() - t0
out = {"prefill": {}, "decode": None}
prefill(prompt(8))  # warm-up
for p in cfg["prompts"]:
    out["prefill"][str(p)] = p / prefill(prompt(p))
llm.reset()
ids = prompt(cfg["decode_prompt"])
llm.eval(ids)
stamps, toks = [], []
for i in range(cfg["decode_tokens"]):
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    stamps.append(time.perf_counter()); toks.append(tok)
    if i + 1 < cfg["decode_tokens"]:
        llm.eval([tok])
out["decode"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
out["tokens"] = toks
out["version"] = llama_cpp.__version__
out["system_info"] = llama_cpp.llama_print_system_info().decode()
print(json.dumps(out))
"""


def _torch_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """moeinfer or transformers: prefill and decode timings (step 5), in this (fresh) process."""
    import torch

    torch.set_num_threads(cfg["threads"])
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(2, cfg["vocab"], (n,), generator=g).tolist()

    if cfg["system"].startswith("moeinfer"):
        import moeinfer
        from moeinfer.kernels import native

        native.use_variant(cfg.get("variant"))  # "moeinfer@VARIANT": that native variant; else the best

        model = moeinfer.load(cfg["path"], dtype=torch.bfloat16, progress=False)
        from moeinfer.kernels.select import use_kernel_

        # the CLI's default kernel (auto: the cpu kernel), plus the native bf16 linears unless --no-linears
        use_kernel_(model, cfg.get("kernel") or "auto", linears=cfg.get("linears", True))

        def run(ids: list[int], n: int) -> list[float]:
            stamps: list[float] = []
            moeinfer.generate(model, [ids], max_new_tokens=n, ignore_eos=True,
                              on_token=lambda *a, **k: stamps.append(time.perf_counter()))
            return stamps
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(cfg["path"], dtype=torch.bfloat16).eval()

        class Stamps:
            def __init__(self) -> None:
                self.t: list[float] = []

            def put(self, value: Any) -> None:
                self.t.append(time.perf_counter())

            def end(self) -> None:
                pass

        def run(ids: list[int], n: int) -> list[float]:
            s = Stamps()
            x = torch.tensor([ids])
            with torch.no_grad():
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, streamer=s, pad_token_id=0)
            return s.t[1:]  # the first put is the prompt

    out: dict[str, Any] = {"prefill": {}}
    run(prompt(8), 2)  # warm-up
    for p in cfg["prompts"]:
        t0 = time.perf_counter()
        stamps = run(prompt(p), 1)
        out["prefill"][str(p)] = p / (stamps[0] - t0)
    stamps = run(prompt(cfg["decode_prompt"]), cfg["decode_tokens"])
    out["decode"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return out


# --------------------------------------------------------------------------------------------------
# preparation: model, GGUF files, moeinfer files, llama.cpp interpreter
# --------------------------------------------------------------------------------------------------


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd))[:300], flush=True)
    return subprocess.run(cmd, check=True, **kw)


def llama_python(args: argparse.Namespace) -> str:
    """The interpreter with llama-cpp-python: --llama-python, or a venv built here once (~15 minutes)."""
    if args.llama_python:
        return args.llama_python
    venv = HERE / ".llama-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
        env = dict(os.environ)
        if any(f.startswith("amx") for f in cpu_flags()):
            flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            env["CMAKE_ARGS"] = f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{flags}' -DCMAKE_CXX_FLAGS='{flags}'"
        _run([str(py), "-m", "pip", "install", "--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_VERSION}"],
             env=env)
    return str(py)


def llama_source(work: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (convert_hf_to_gguf.py and gguf-py)."""
    src = work / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        tar = work / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
        if not tar.is_file():
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={LLAMA_VERSION}", "-d", str(work)])
        with tarfile.open(tar) as t:
            t.extractall(work, filter="data")
    return src


CONVERT = r"""
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
# moeinfer's tokenizer is not in llama.cpp's table of pre-tokenizer hashes; the benchmark feeds token ids
TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""

QUANTIZE = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
params.pure = sys.argv[3] == "pure"
params.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""


def make_gguf(model: Path, work: Path, src: Path, llama_py: str, args: argparse.Namespace) -> dict[str, Path]:
    out = {}
    for precision in ("bf16", "int8"):
        f = work / f"model-{GGUF_TYPE[precision]}.gguf"
        if not f.exists():
            _run([sys.executable, "-c", CONVERT, str(src), str(model), "--outtype", GGUF_TYPE[precision], "--outfile",
                  str(f)])
        out[precision] = f
    f = work / f"model-q4_0{'-pure' if args.pure else ''}.gguf"
    if not f.exists():
        _run([llama_py, "-c", QUANTIZE, str(out["bf16"]), str(f), "pure" if args.pure else "mixed", str(args.threads)])
    out["int4"] = f
    return out


def make_moeinfer(model: Path, work: Path, scope: str) -> dict[str, Path]:
    import torch

    import moeinfer
    from moeinfer.compress import compress_

    out = {"bf16": model}
    for precision, preset in MOEINFER_PRESET.items():
        name = preset + ("-all" if scope == "all" else "")
        d = work / f"moeinfer-{name}"
        if not d.exists():
            m = moeinfer.load(model, dtype=torch.bfloat16, progress=False)
            t0 = time.perf_counter()
            compress_(m, name)
            print(f"compress_({name}): {time.perf_counter() - t0:.1f} s", flush=True)
            moeinfer.save(m, d)
            del m
        out[precision] = d
    return out


def weights_equal(gguf_files: dict[str, Path], moe_files: dict[str, Path], src: Path) -> dict[str, Any]:
    """Step 3's check: layer 0's down-projection experts, GGUF (dequantized by gguf-py) vs moeinfer."""
    import numpy as np
    import torch

    sys.path.insert(0, str(src / "gguf-py"))
    import gguf

    import moeinfer

    result: dict[str, Any] = {}
    for precision in ("int8", "int4"):
        reader = gguf.GGUFReader(str(gguf_files[precision]))
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
        ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))).float()
        m = moeinfer.load(moe_files[precision], progress=False)
        ours = m.layers[0].mlp.experts.dequantize_all(torch.float32)[1]  # down [E, D, I]
        ours = ours.reshape(ref.shape)
        result[precision] = {"gguf_type": t.tensor_type.name, "equal": bool(torch.equal(ref, ours)),
                             "max_abs_diff": float((ref - ours).abs().max()),
                             "mismatched_fraction": float((ref != ours).float().mean())}
        del m
    return result


# --------------------------------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------------------------------


def read_bandwidth(threads: int, nbytes: int = 512 << 20, reps: int = 7) -> dict[str, float]:
    """Read bandwidth (bytes/s) by several methods, each the best of `reps`; `best` is the roofline."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)

    def best(fn) -> float:
        fn()
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    n = nbytes // 4
    cols = 4096
    w = torch.randn(n // cols, cols)
    x = torch.randn(cols)
    flat = w.view(-1)
    dst = torch.empty_like(flat)
    arr = flat.numpy()
    out = {"torch_fp32_gemv": nbytes / best(lambda: torch.mv(w, x)),
           "torch_sum": nbytes / best(lambda: flat.sum()),
           "numpy_sum": nbytes / best(lambda: arr.sum()),
           "torch_copy_read": nbytes / best(lambda: dst.copy_(flat))}  # counts only the read half
    out["best"] = max(out.values())
    return out


def machine(threads: int) -> dict[str, Any]:
    from moeinfer.bench.hardware import cpu_name, git_commit, software_info

    wanted = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    flags = cpu_flags()
    import transformers

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "flags": [f for f in wanted if f in flags], "bandwidth": read_bandwidth(threads),
            "load_average": os.getloadavg(), "software": {**software_info(), "transformers": transformers.__version__},
            "commit": git_commit(ROOT), "platform": platform.platform()}


# --------------------------------------------------------------------------------------------------
# measurement and report
# --------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, files: dict[str, dict[str, Path]], llama_py: str | None,
            vocab: int) -> list[dict[str, Any]]:
    runs = []
    common = {"threads": args.threads, "prompts": args.prompts, "decode_tokens": args.decode_tokens,
              "decode_prompt": DECODE_PROMPT, "vocab": vocab}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for rep in range(args.reps):
        for precision in args.precisions:
            for system in args.systems:
                if system == "transformers" and precision != "bf16":
                    continue
                if system == "llama.cpp":
                    cmd = [llama_py, "-c", LLAMA_WORKER, json.dumps({**common, "gguf": str(files["llama.cpp"][precision])})]
                else:
                    name, _, variant = system.partition("@")
                    cfg = {**common, "system": system, "path": str(files[name][precision]), "kernel": args.kernel,
                           "linears": not args.no_linears, "variant": variant or None}
                    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
                bw_now = read_bandwidth(args.threads, reps=3)["best"]  # this moment's roofline (step 5)
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"{system} {precision} rep {rep} failed:\n{proc.stderr[-2000:]}", flush=True)
                    runs.append({"rep": rep, "system": system, "precision": precision, "error": proc.stderr[-2000:]})
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.append({"rep": rep, "system": system, "precision": precision, "bandwidth_before": bw_now, **r})
                pre = ", ".join(f"{p}: {v:.1f}" for p, v in r["prefill"].items())
                print(f"rep {rep} {precision:5s} {system:12s} decode {r['decode']:.2f} tok/s, prefill tok/s {pre}",
                      flush=True)
    return runs


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace, bytes_per_token: dict[str, float],
              bandwidth: float) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for precision in args.precisions:
        for system in args.systems:
            ok = [r for r in runs if r["system"] == system and r["precision"] == precision and "error" not in r]
            if not ok:
                continue
            decode = statistics.median(r["decode"] for r in ok)
            roof = bandwidth / bytes_per_token[f"{system}:{precision}"] if f"{system}:{precision}" in bytes_per_token \
                else None
            bpt = bytes_per_token.get(f"{system}:{precision}")
            per_run = [100 * r["decode"] * bpt / r["bandwidth_before"] for r in ok
                       if bpt is not None and r.get("bandwidth_before")]
            table[f"{system}:{precision}"] = {
                "decode": decode, "decode_all": [r["decode"] for r in ok],
                "prefill": {p: statistics.median(r["prefill"][str(p)] for r in ok) for p in args.prompts},
                "roofline_tok_s": roof, "roofline_pct": None if roof is None else 100 * decode / roof,
                "roofline_pct_per_run": per_run,
                "roofline_pct_run_median": statistics.median(per_run) if per_run else None}
    return table


def active_bytes(model_dir: Path, precision: str, scope: str, system: str) -> float:
    """Bytes one decode step reads: the active experts, attention, router and lm_head (embedding: one row)."""
    import torch

    from moeinfer.arch import parse_config
    from moeinfer.loading.checkpoint import read_config
    from moeinfer.model.transformer import MoEModel

    cfg = parse_config(read_config(model_dir))
    with torch.device("meta"):
        m = MoEModel(cfg)
    # per weight: ggml's Q8_0/Q4_0 blocks hold 32 codes and an fp16 scale; moeinfer's q8_0/q4_0 groups of 32
    # are read as the same bytes (codes and the fp16 scale, moeinfer.kernels.quantized_cpu.read_scales; the
    # midpoint zeros are not read, read_zeros), though memory also holds fp32 scales and zeros
    per_weight = {"bf16": 2.0, "int8": 34 / 32, "int4": 18 / 32}[precision]
    experts = other = 0.0
    for name, p in m.named_parameters():
        if "experts." in name:
            experts += p.numel() * cfg.router.top_k / cfg.num_experts
        elif "embed_tokens" not in name:
            other += p.numel()
    quantized_other = system == "llama.cpp" or scope == "all"
    return experts * per_weight + other * (per_weight if quantized_other and precision != "bf16" else 2.0)


def markdown(result: dict[str, Any]) -> str:
    mach = result["machine"]
    bw = mach["bandwidth"]
    lines = [f"CPU: {mach['cpu']} ({mach['cores']} cores, {mach['threads']} threads used); flags: "
             f"{' '.join(mach['flags'])}.",
             "Read bandwidth (GB/s, best of 7): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.items()) + ".",
             f"Model: {result['model']['shape']} at {result['model']['layers']} layers "
             f"({result['model']['params'] / 1e9:.2f}B parameters), random weights (`moeinfer init`); "
             f"{result['args']['reps']} interleaved repetitions, median; decode = {result['args']['decode_tokens']} "
             f"greedy tokens after a {DECODE_PROMPT}-token prompt.",
             f"Versions: moeinfer {mach['commit']}, torch {mach['software']['torch']}, transformers "
             f"{mach['software']['transformers']}, llama-cpp-python {result.get('llama_version')}.",
             f"Weights equal to llama.cpp's (layer 0 down experts): {json.dumps(result.get('weights_equal'))}.", "",
             "| precision | system | decode tok/s | % of roofline | % of each run's roofline (median) | " +
             " | ".join(f"prefill {p} tok/s" for p in result["args"]["prompts"]) + " |",
             "|---|---|---|---|---|" + "---|" * len(result["args"]["prompts"])]
    for key, row in result["table"].items():
        system, precision = key.split(":")
        pct = "-" if row["roofline_pct"] is None else f"{row['roofline_pct']:.0f}%"
        run_pct = "-" if row.get("roofline_pct_run_median") is None else f"{row['roofline_pct_run_median']:.0f}%"
        lines.append(f"| {precision} | {system} | {row['decode']:.2f} | {pct} | {run_pct} | " +
                     " | ".join(f"{row['prefill'][p]:.1f}" for p in result["args"]["prompts"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=8, help="layers of the OLMoE-1B-7B-shaped model (default 8)")
    ap.add_argument("--shape", default="OLMoE-1B-7B", help="moeinfer init --shape (preset and/or KEY=VALUE,...)")
    ap.add_argument("--model", default=None, help="use this checkpoint instead of making one")
    ap.add_argument("--work-dir", default=str(HERE / ".cpu_real"), help="models, GGUF files, sdist (default: "
                    "benchmarks/.cpu_real, git-ignored)")
    ap.add_argument("--llama-python", default=None, help="interpreter with llama-cpp-python 0.3.36 (default: build "
                    "benchmarks/.llama-venv, ~15 minutes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=lambda s: [int(x) for x in s.split(",")], default=[16, 128, 512])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS))
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=list(PRECISIONS))
    ap.add_argument("--scope", choices=["experts", "all"], default="experts",
                    help="moeinfer quantizes experts only (q8_0/q4_0) or every linear layer (q8_0-all/q4_0-all)")
    ap.add_argument("--no-pure", dest="pure", action="store_false",
                    help="llama.cpp's Q4_0 with its default mix (output matrix at Q6_K)")
    ap.add_argument("--kernel", default=None, help="moeinfer kernel (moeinfer.kernels.select.use_kernel_; "
                    "default auto, as the CLI)")
    ap.add_argument("--no-linears", action="store_true",
                    help="leave moeinfer's dense linears on torch (default: the native CPU linears)")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_real.json"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_torch_worker(json.loads(args.worker))))
        return 0
    from moeinfer.kernels.native import VARIANTS

    bad = [s for s in args.systems if s not in SYSTEMS and s not in [f"moeinfer@{v}" for v in VARIANTS]]
    bad += [p for p in args.precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"unknown system/precision {bad}; systems: {SYSTEMS} or moeinfer@VARIANT ({', '.join(VARIANTS)}), "
                 f"precisions: {PRECISIONS}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    # 1. the model
    if args.model:
        model = Path(args.model)
    else:
        from moeinfer.loading.random_init import init_checkpoint

        model = work / f"olmoe-{args.layers}l-{zlib.crc32(args.shape.encode()):08x}"
        if not (model / "config.json").exists():
            init_checkpoint(model, arch="olmoe", shape=args.shape, layers=args.layers)
    hf = json.loads((model / "config.json").read_text())
    # 2.-3. files for each system
    files: dict[str, dict[str, Path]] = {"transformers": {"bf16": model}}
    llama_py = None
    result: dict[str, Any] = {"args": vars(args), "model": {"path": str(model), "shape": args.shape,
                                                            "layers": hf["num_hidden_layers"]}}
    if "llama.cpp" in args.systems:
        llama_py = llama_python(args)
        src = llama_source(work)
        files["llama.cpp"] = make_gguf(model, work, src, llama_py, args)
        result["llama_version"] = subprocess.run([llama_py, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                                 capture_output=True, text=True, check=True).stdout.strip()
    if any(s.startswith("moeinfer") for s in args.systems):
        files["moeinfer"] = make_moeinfer(model, work, args.scope)
    if "llama.cpp" in args.systems and "moeinfer" in files:
        try:
            result["weights_equal"] = weights_equal(files["llama.cpp"], files["moeinfer"], src)
        except Exception as e:  # a check, not the benchmark: record why it could not run
            result["weights_equal"] = {"error": repr(e)}
    # 4. the machine
    result["machine"] = machine(args.threads)
    from moeinfer.loading.random_init import tensor_specs

    result["model"]["params"] = sum(s.numel for s in tensor_specs(hf))
    # 5. measure, interleaved
    runs = measure(args, files, llama_py, int(hf["vocab_size"]))
    # 6. report
    bpt = {f"{s}:{p}": active_bytes(model, p, args.scope, s) for s in args.systems for p in args.precisions}
    result.update(runs=runs, bytes_per_token=bpt,
                  table=summarize(runs, args, bpt, result["machine"]["bandwidth"]["best"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
