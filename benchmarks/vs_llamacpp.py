"""llama.cpp vs vLLM (bf16 and QuaRot) on the same weights and cores, side by side.

Batch 1 and concurrent sequences, in one run.

For each model (SmolLM2-135M-Instruct; a random Llama with TinyLlama-1.1B's shapes) the
Hugging Face weights that vLLM serves are written once as an F32 GGUF with gguf-py
(llama.cpp's own Python package; the tokenizer is SmolLM2's GGUF vocabulary, or a
placeholder SentencePiece vocabulary for the random model) and quantized with llama.cpp's
``llama_model_quantize`` to Q4_0, Q4_1 and Q8_0. Before timing, the F32 GGUF's logits
are checked against transformers' on one prompt: the engines serve the same model.

Measured per engine, each in its own subprocess bound to cores 0..T-1:
decode tokens/s with 1, 8 and 32 concurrent sequences (16-token prompts, 64 greedy
tokens each, prompt processing included; llama.cpp: one context with ``n_seq_max``
sequences decoded together in one ``llama_batch`` per step — its parallel decoding),
time to first token of a 1024-token prompt (medians of 3 runs each), and the engine's
start-up time.

    .venv/bin/python benchmarks/vs_llamacpp.py [--models smollm2,1.1b,floor] [--eager]

``--models floor`` runs every engine on a random model with SmolLM2's 30 layers, head
width, vocabulary and tied lm_head but 64 channels: next to no weights to stream or
multiply, so its batch-1 step is each engine's fixed per-step cost at that depth (the
floor under the SmolLM2 figures).

Needs llama-cpp-python (``pip install llama-cpp-python``: builds llama.cpp from source
for the CPU at hand, -march=native, ~15 min on 2 idle cores). It need not go into the
project's venv: a venv of its own that sees the project's packages works, e.g.

    python -m venv ~/.cache/vllm-quarot/venv-llamacpp
    echo $PWD/.venv/lib/python3.11/site-packages \
        > ~/.cache/vllm-quarot/venv-llamacpp/lib/python3.11/site-packages/zz_project.pth
    ~/.cache/vllm-quarot/venv-llamacpp/bin/pip install llama-cpp-python
    PYTHONPATH=$PWD ~/.cache/vllm-quarot/venv-llamacpp/bin/python benchmarks/vs_llamacpp.py

Ratios are against llama.cpp's best configuration in each column (the fastest of the
GGUF types run). ``--baseline-tree DIR`` adds the QuaRot engines once more with the
vllm_quarot package (and native kernels) of another checkout, e.g. main: a before /
after comparison in one run. Writes benchmarks/results/<machine>/vs_llamacpp.md and .png.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cpu_e2e import CACHE, make_model, quantize_model

from vllm_quarot.eval.zoo import smollm2_dir, smollm2_gguf

CONCURRENCY = (1, 8, 32)
# --decode-tokens / --long-prompt set these for the workers through the environment
N_DEC = int(os.environ.get("VS_LLAMACPP_DECODE_TOKENS", 64))
PROMPT = 16
REPEATS = 3  # each figure: the median of 3 timed runs (this machine is noisy)
LONG = int(os.environ.get("VS_LLAMACPP_LONG_PROMPT", 1024))
# --models floor: SmolLM2's depth, heads' width, vocabulary and tied lm_head, but 64 wide
# (one head): every engine's per-step cost with next to no weights to stream or multiply
FLOOR_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                   num_key_value_heads=1, num_hidden_layers=30, vocab_size=49152,
                   tie_word_embeddings=True)
GGUF_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama_ftype


def prompt_ids(i: int, n: int = PROMPT, vocab: int = 31000) -> list[int]:
    from vllm_quarot.eval.throughput import prompt_ids as ids

    return ids(i, n, vocab)


# ---------------------------------------------------------------- the same weights as GGUF

def _permute(w, n_head: int):
    """Hugging Face's q/k row order (rotate-half RoPE) -> GGUF's (interleaved pairs), as
    llama.cpp's convert_hf_to_gguf.py does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _add_vocab(w, cfg, vocab_gguf: Path | None) -> None:
    import gguf

    if vocab_gguf is not None:  # the model's own GGUF vocabulary (SmolLM2)
        for f in gguf.GGUFReader(vocab_gguf).fields.values():
            if f.name.startswith("tokenizer."):
                w.add_key_value(f.name, f.contents(), f.types[0],
                                f.types[1] if len(f.types) > 1 else None)
        return
    # random model: a placeholder SentencePiece vocabulary of the right size (token ids
    # are all that is ever fed)
    n = cfg.vocab_size
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"\u2581t{i}" for i in range(n - len(toks))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * n)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def write_gguf(hf_dir: Path, out: Path, vocab_gguf: Path | None) -> Path:
    """hf_dir's weights, unchanged (float32), as a llama-architecture GGUF."""
    if out.is_file():
        return out
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    print(f"writing {out.name} (F32 GGUF of {hf_dir}) ...", flush=True)
    tmp = out.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocab(w, cfg, vocab_gguf)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        def get(k: str):
            return f.get_tensor(k).to(torch.float32).numpy()

        w.add_tensor("token_embd.weight", get("model.embed_tokens.weight"))
        w.add_tensor("output_norm.weight", get("model.norm.weight"))
        if not cfg.tie_word_embeddings:
            w.add_tensor("output.weight", get("lm_head.weight"))
        for i in range(cfg.num_hidden_layers):
            for hf, gg in names.items():
                t = get(f"model.layers.{i}.{hf}.weight")
                if gg == "attn_q":
                    t = _permute(t, cfg.num_attention_heads)
                elif gg == "attn_k":
                    t = _permute(t, cfg.num_key_value_heads)
                w.add_tensor(f"blk.{i}.{gg}.weight", t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()
    tmp.replace(out)
    return out


def quantize_gguf(src: Path, kind: str, threads: int) -> Path:
    out = src.with_name(src.name.replace("-F32", f"-{kind}"))
    if out.is_file():
        return out
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[kind]
    params.nthread = threads
    tmp = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                      ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {kind} failed")
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- llama.cpp

class LlamaCpp:
    """One llama.cpp context through llama-cpp-python's C API: n_seq sequences decoded
    together, greedy."""

    def __init__(self, gguf: Path, threads: int, n_seq: int, n_ctx: int,
                 f32_cache: bool = False, extra_bufts: bool = True):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        # extra buffer types: llama.cpp's weight repacking and its AMX matmul (default on)
        mp.use_extra_bufts = extra_bufts
        self.model = L.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp cannot load {gguf}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, max(LONG, PROMPT * n_seq), 512
        cp.n_seq_max, cp.n_threads, cp.n_threads_batch = n_seq, threads, threads
        cp.no_perf = True
        if f32_cache:  # llama.cpp's default KV cache is f16
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
            cp.flash_attn_type = 0  # disabled (its CPU path rounds Q to f16)
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(max(LONG, PROMPT * n_seq), 0, n_seq)

    def _decode(self, items: list[tuple[int, int, int, bool]]):
        """items: (token, pos, seq, wants_logits) -> logits [n_out, vocab] (numpy)."""
        import numpy as np

        b, n_out = self.batch, 0
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, out
            n_out += out
        b.n_tokens = len(items)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        ptr = self.L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.vocab))

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def generate(self, prompts: list[list[int]], n_new: int) -> list[list[int]]:
        self.clear()
        items = [(t, p, s, p == len(pr) - 1) for s, pr in enumerate(prompts)
                 for p, t in enumerate(pr)]
        nxt = self._decode(items).argmax(1)
        outs = [[int(t)] for t in nxt]
        for step in range(1, n_new):
            nxt = self._decode([(int(nxt[s]), len(pr) + step - 1, s, True)
                                for s, pr in enumerate(prompts)]).argmax(1)
            for s in range(len(prompts)):
                outs[s].append(int(nxt[s]))
        return outs

    def logits(self, ids: list[int]):
        self.clear()
        return self._decode([(t, p, 0, True) for p, t in enumerate(ids)]).copy()


def llama_worker(gguf: str, threads: int, concurrency: list[int], vocab: int,
                 extra_bufts: bool = True) -> dict:
    t = time.perf_counter()
    eng = {c: LlamaCpp(Path(gguf), threads, c, c * (PROMPT + N_DEC + 8),
                       extra_bufts=extra_bufts) for c in concurrency}
    res: dict = {"startup_s": time.perf_counter() - t}
    def timed(e: LlamaCpp, prompts: list[list[int]], n: int) -> float:
        t = time.perf_counter()
        e.generate(prompts, n)
        return time.perf_counter() - t

    for c in concurrency:
        e = eng[c]
        e.generate([prompt_ids(i, vocab=vocab) for i in range(c)], 4)  # warm-up
        res[f"tok_s_{c}"] = c * N_DEC / _median(
            timed(e, [prompt_ids(100 * r + i, vocab=vocab) for i in range(c)], N_DEC)
            for r in range(1, REPEATS + 1))
    long = LlamaCpp(Path(gguf), threads, 1, LONG + 16, extra_bufts=extra_bufts)
    long.generate([prompt_ids(7, LONG, vocab)], 1)
    res["ttft_s"] = _median(timed(long, [prompt_ids(8 + r, LONG, vocab)], 1)
                            for r in range(REPEATS))
    return res


def _median(xs) -> float:
    import statistics

    return statistics.median(list(xs))


def check_same_model(hf_dir: Path, f32: Path, threads: int) -> float:
    """Max |logit difference| between transformers (float32) and llama.cpp on the F32 GGUF
    over one 16-token prompt, relative to the logits' max magnitude."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = prompt_ids(3, vocab=AutoConfig.from_pretrained(hf_dir).vocab_size)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    del model
    got = LlamaCpp(f32, threads, 1, 64, f32_cache=True).logits(ids)
    return float(abs(got - ref).max() / abs(ref).max())


# ---------------------------------------------------------------- vLLM

def vllm_worker(model: str, quantization: str | None, dtype: str, compile_: bool,
                concurrency: list[int], vocab: int) -> dict:
    from vllm import LLM

    t = time.perf_counter()
    llm = LLM(model, quantization=quantization, dtype=dtype, enforce_eager=not compile_,
              skip_tokenizer_init=True, max_model_len=2048, max_num_seqs=max(concurrency),
              max_num_batched_tokens=2048, seed=0)
    res: dict = {"startup_s": time.perf_counter() - t,
                 "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch.")}

    from vllm_quarot.eval.throughput import decode_tokens_per_s, time_to_first_token

    for c in concurrency:
        res[f"tok_s_{c}"] = decode_tokens_per_s(llm, c, N_DEC, vocab, REPEATS, PROMPT)
    res["ttft_s"] = time_to_first_token(llm, LONG, vocab, REPEATS)
    return res


def run_worker(args: list[str], threads: int, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args, "--threads", str(threads),
           "--concurrency", os.environ.get("VS_LLAMACPP_CONCURRENCY",
                                           ",".join(map(str, CONCURRENCY)))]
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=full_env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return json.loads(line.removeprefix("RESULT_JSON "))
    raise SystemExit(f"worker {args} failed:\n{proc.stdout[-4000:]}")


# ---------------------------------------------------------------- driver

def models(names: list[str]) -> list[tuple[str, Path, Path | None]]:
    out = []
    for n in names:
        if n == "smollm2":
            out.append(("SmolLM2-135M", smollm2_dir(), smollm2_gguf()))
        elif n == "1.1b":
            out.append(("Llama 1.1B (random)", make_model(CACHE / "random-llama-1.1b"), None))
        elif n == "floor":
            out.append(("Floor: SmolLM2's 30 layers, 64 wide (random)",
                        make_model(CACHE / "random-llama-floor", FLOOR_SHAPE), None))
        else:
            raise SystemExit(f"unknown model {n!r}: smollm2, 1.1b or floor")
    return out


def quarot_checkpoint(hf_dir: Path, scheme: str, lm_head: str) -> Path:
    """RTN without the clip search: speed does not depend on the weights' values."""
    return quantize_model(hf_dir, CACHE / f"speed-{hf_dir.name}-quarot-{scheme}-lmhead-{lm_head}",
                          scheme=scheme, w_clip=False, lm_head=lm_head)


def _mib(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20


def plot(results: dict, concurrency: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (model, engines) in zip(axes[0], results.items(), strict=True):
        for name, r in engines.items():
            ax.plot(concurrency, [r[f"tok_s_{c}"] for c in concurrency], marker="o",
                    label=name, linestyle="--" if name.startswith("llama.cpp") else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.set_xlabel("concurrent sequences")
        ax.set_ylabel("generated tokens/s (all sequences)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    global N_DEC, LONG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,1.1b")
    ap.add_argument("--eager", action="store_true",
                    help="vLLM eager (default: vLLM's default, compiled)")
    ap.add_argument("--schemes", default="w4a4,w4a8", help="QuaRot schemes")
    ap.add_argument("--lm-head", default="w8a8", help="QuaRot checkpoints' --lm-head")
    ap.add_argument("--base-dtypes", default="auto,float32",
                    help="vLLM dtypes of the unquantized model (auto: its bf16)")
    ap.add_argument("--quarot-dtype", default="auto",
                    help="vLLM dtype of the QuaRot checkpoints (auto: the checkpoint's bf16)")
    ap.add_argument("--gguf", default="Q4_0,Q4_1,Q8_0", help="llama.cpp quantizations")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results/<machine tag>)")
    ap.add_argument("--name", default="vs_llamacpp", help="result files' name (.md, .png)")
    ap.add_argument("--decode-tokens", type=int, default=N_DEC,
                    help="greedy tokens generated per sequence")
    ap.add_argument("--long-prompt", type=int, default=LONG, help="TTFT prompt length")
    ap.add_argument("--in-process", action="store_true",
                    help="also run each vLLM engine with its engine core in the calling "
                         "process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="also run the QuaRot engines with this checkout's vllm_quarot")
    ap.add_argument("--from-raw", type=Path, default=None,
                    help="make the table and plot from the per-engine lines a run printed")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    N_DEC, LONG = a.decode_tokens, a.long_prompt
    os.environ["VS_LLAMACPP_DECODE_TOKENS"] = str(a.decode_tokens)
    os.environ["VS_LLAMACPP_CONCURRENCY"] = a.concurrency
    os.environ["VS_LLAMACPP_LONG_PROMPT"] = str(a.long_prompt)
    if a.out is None and a.worker is None:
        from cpu_peak import machine_tag

        a.out = Path("benchmarks/results") / machine_tag()
    conc = [int(c) for c in a.concurrency.split(",")]
    if a.worker is not None:  # inside the subprocess
        os.sched_setaffinity(0, range(a.threads))
        kind, target, vocab = a.worker[0], a.worker[1], int(a.worker[2])
        if kind == "llama":
            res = llama_worker(target, a.threads, conc, vocab,
                               extra_bufts=a.worker[3:4] != ["no-extra-bufts"])
        else:
            q = None if a.worker[3] == "none" else a.worker[3]
            res = vllm_worker(target, q, a.worker[4], not a.eager, conc, vocab)
        print("RESULT_JSON " + json.dumps(res), flush=True)
        return

    if a.from_raw is not None:
        all_res, checks = parse_raw(a.from_raw)
        return report(all_res, checks, conc, a)

    from transformers import AutoConfig

    vllm_env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{a.threads - 1}",
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    all_res: dict[str, dict[str, dict]] = {}
    checks: dict[str, float] = {}
    a.out.mkdir(parents=True, exist_ok=True)
    raw = a.out / f"{a.name}_raw.txt"  # each engine's line as it ends: --from-raw RAW
    raw.write_text("")

    def log(*parts: object) -> None:
        line = " ".join(map(str, parts))
        print(line, flush=True)
        with raw.open("a") as f:
            f.write(line + "\n")

    for label, hf_dir, vocab_gguf in models(a.models.split(",")):
        vocab = AutoConfig.from_pretrained(hf_dir).vocab_size
        f32 = write_gguf(hf_dir, CACHE / f"{hf_dir.name}-F32.gguf", vocab_gguf)
        checks[label] = check_same_model(hf_dir, f32, a.threads)
        log(f"{label}: llama.cpp F32 GGUF vs transformers, max |Δlogit| / max |logit| = "
            f"{checks[label]:.2e}")
        if checks[label] > 1e-4:
            raise SystemExit(f"{label}: the GGUF does not compute the same model")
        res: dict[str, dict] = {}
        for kind in filter(None, a.gguf.split(",")):
            g = quantize_gguf(f32, kind, a.threads)
            try:
                res[f"llama.cpp {kind}"] = run_worker(["llama", str(g), str(vocab)], a.threads)
            except SystemExit as exc:  # e.g. llama.cpp's AMX matmul crashing on a shape
                log(f"{label}: llama.cpp {kind} with its extra buffer types (repack, AMX) "
                    f"failed ({str(exc).splitlines()[0]} ...): running it without them")
                kind = f"{kind} (no extra buffer types)"
                res[f"llama.cpp {kind}"] = run_worker(
                    ["llama", str(g), str(vocab), "no-extra-bufts"], a.threads)
            res[f"llama.cpp {kind}"]["mib"] = g.stat().st_size / 2**20
            log(label, f"llama.cpp {kind}", res[f"llama.cpp {kind}"])
        # vLLM's default process layout; with --in-process also the engine core in the
        # LLM's own process (one process fewer polling these cores between steps)
        layouts = [("", vllm_env)]
        if a.in_process:
            layouts.append((" (in-process engine core)",
                            dict(vllm_env, VLLM_ENABLE_V1_MULTIPROCESSING="0")))
        for dtype in filter(None, a.base_dtypes.split(",")):
            for suffix, env in layouts:
                name = f"vLLM {'bf16' if dtype == 'auto' else dtype}{suffix}"
                res[name] = run_worker(["vllm", str(hf_dir), str(vocab), "none", dtype],
                                       a.threads, env)
                res[name]["mib"] = _mib(hf_dir)
                log(label, name, res[name])
        for scheme in filter(None, a.schemes.split(",")):
            ckpt = quarot_checkpoint(hf_dir, scheme, a.lm_head)
            name = f"vLLM QuaRot {scheme.upper()}"
            if a.quarot_dtype != "auto":
                name += f" ({a.quarot_dtype})"
            for suffix, env in layouts:
                r = run_worker(["vllm", str(ckpt), str(vocab), "quarot", a.quarot_dtype],
                               a.threads, env)
                res[name + suffix] = dict(r, mib=_mib(ckpt))
                log(label, name + suffix, res[name + suffix])
            if a.baseline_tree is not None:  # the same engine with another checkout's code
                base = f"{name} ({a.baseline_tree.resolve().name}'s kernels)"
                env = dict(vllm_env, PYTHONPATH=str(a.baseline_tree.resolve()))
                r = run_worker(["vllm", str(ckpt), str(vocab), "quarot", a.quarot_dtype],
                               a.threads, env)
                res[base] = dict(r, mib=_mib(ckpt))
                log(label, base, res[base])
        all_res[label] = res
    report(all_res, checks, conc, a)


def parse_raw(path: Path) -> tuple[dict[str, dict[str, dict]], dict[str, float]]:
    """The lines `LABEL ENGINE {dict}` and `LABEL: llama.cpp F32 GGUF ... = X` a run
    printed, back into its results."""
    import ast

    all_res: dict[str, dict[str, dict]] = {}
    checks: dict[str, float] = {}
    engines = ("llama.cpp", "vLLM")
    for line in path.read_text().splitlines():
        if "F32 GGUF vs transformers" in line:
            label = line.split(":")[0]
            checks[label] = float(line.rsplit("=", 1)[1])
            continue
        head, _, tail = line.partition(" {")
        if not tail:
            continue
        i = min(head.find(f" {e} ") for e in engines if f" {e} " in head + " ")
        all_res.setdefault(head[:i], {})[head[i + 1:]] = ast.literal_eval("{" + tail)
    return all_res, checks


def report(all_res: dict[str, dict[str, dict]], checks: dict[str, float],
           conc: list[int], a: argparse.Namespace) -> None:
    mode = "eager" if a.eager else "compiled (vLLM default)"
    lines = []
    for label, res in all_res.items():
        llama = [n for n in res if n.startswith("llama.cpp")] or [next(iter(res))]
        # per column, llama.cpp's best configuration
        ref = {f"tok_s_{c}": max(res[n][f"tok_s_{c}"] for n in llama) for c in conc}
        ref["ttft_s"] = min(res[n]["ttft_s"] for n in llama)
        best = {key: next(n for n in llama if res[n][key] == v) for key, v in ref.items()}
        lines += [f"\n**{label}** (ratios vs llama.cpp's best configuration per column: "
                  + ", ".join(f"{key.removeprefix('tok_s_')}: {n}" for key, n in best.items())
                  + f"; F32 GGUF vs transformers logits: {checks[label]:.1e} relative)\n",
                  "| engine | " + " | ".join(f"tok/s ×{c} seq" for c in conc)
                  + f" | TTFT {LONG}-token prompt (s) | start-up (s) | weights (MiB) |",
                  "|---|" + "---:|" * (len(conc) + 3)]
        for name, r in res.items():
            cells = [f"{r[f'tok_s_{c}']:.1f} ({r[f'tok_s_{c}'] / ref[f'tok_s_{c}']:.2f}×)"
                     for c in conc]
            shown = f"{name} [{r['dtype']}]" if "dtype" in r else name
            lines.append(f"| {shown} | " + " | ".join(cells)
                         + f" | {r['ttft_s']:.2f} ({ref['ttft_s'] / r['ttft_s']:.2f}×) "
                           f"| {r['startup_s']:.0f} | {r['mib']:.0f} |")
    table = "\n".join(lines)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    png = a.out / f"{a.name}.png"
    plot(all_res, conc, png)
    from vllm_quarot.runtime.ops import cpu as cpu_ops

    cmd = shlex.join(["benchmarks/vs_llamacpp.py", *sys.argv[1:]])  # keeps --gguf ""
    from cpu_peak import header

    (a.out / f"{a.name}.md").write_text(
        f"# llama.cpp vs vLLM on the same weights (CPU, {a.threads} threads, vLLM {mode}, "
        f"QuaRot kernels {cpu_ops.isa()}, QuaRot lm_head {a.lm_head})\n\n"
        f"{header('.venv/bin/python ' + cmd)}\nEach figure is the median of {REPEATS} runs "
        f"({N_DEC} greedy tokens per sequence after a {PROMPT}-token prompt). "
        f"TTFT ratio: llama.cpp's time / this engine's (> 1: faster).\n{table}\n\n"
        f"![tok/s vs concurrency]({png.name})\n")
    print(f"wrote {a.out / a.name}.md and {png}")


if __name__ == "__main__":
    main()
