"""Compile the Triton kernels for an NVIDIA GPU without one (triton.compile with an
explicit target; ptxas ships with triton) and read what the GPU would run: the PTX,
the shared memory and ptxas's register / stack use.

Run as a script (``python tests/triton_compile.py``, never under TRITON_INTERPRET=1,
which turns the kernels into interpreted functions): compiles every case of CASES
for sm_80, sm_89 and sm_90 and prints one JSON line per result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_quarot.runtime.ops import triton as tk

# opt-in shared memory per block (bytes): A100, RTX 30xx/A10, RTX 40xx/L4/L40S, H100
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _signature(kernel, types: dict[str, str], meta: dict) -> tuple[dict, dict]:
    consts = {k: v for k, v in meta.items() if k in kernel.arg_names}
    sig = {name: "constexpr" if name in consts else types[name] for name in kernel.arg_names}
    return sig, consts


def gemm_args(m: int, k: int, groups: int, w_bits: int, act: torch.dtype | None,
              has_bias: bool, out_dtype: torch.dtype):
    """(kernel, types, meta) of one gemm launch; act None = int8 codes (W4A4/W8A8)."""
    meta = tk.gemm_meta(m, k, groups, w_bits, act is None, has_bias, out_dtype)
    types = {"a_ptr": "*i8" if act is None else _PTR[act], "a_scale_ptr": "*fp32",
             "w_ptr": "*i8", "w_scale_ptr": "*fp32", "bias_ptr": _PTR[out_dtype],
             "out_ptr": _PTR[out_dtype]}
    types |= dict.fromkeys(["M", "N", "K", "stride_a", "stride_w",
                            "stride_ws", "stride_o"], "i32")
    return tk._gemm_kernel, types, meta


def hadamard_quantize_args(n: int, dtype: torch.dtype):
    meta = tk.hadamard_quantize_meta(n, 4, dtype)
    types = {"x_ptr": _PTR[dtype], "codes_ptr": "*i8", "scale_ptr": "*fp32",
             "hk_ptr": "*fp32", "hp1_ptr": "*fp32", "hp2_ptr": "*fp32",
             "stride_x": "i32", "stride_c": "i32", "norm": "fp32", "mult": "fp32"}
    return tk._hadamard_quantize_kernel, types, meta


def quantize_args(n: int, dtype: torch.dtype):
    meta = tk.quantize_meta(n, 4)
    types = {"x_ptr": _PTR[dtype], "codes_ptr": "*i8", "scale_ptr": "*fp32", "K": "i32",
             "stride_x": "i32", "stride_c": "i32", "mult": "fp32"}
    return tk._quantize_kernel, types, meta


def compile_for(kernel, types: dict, meta: dict, cc: int) -> dict:
    """{'ptx', 'shared', 'regs', 'stack', 'local'} of the kernel compiled for sm_<cc>."""
    sig, consts = _signature(kernel, types, meta)
    opts = {"num_warps": meta.get("num_warps", 4), "num_stages": meta.get("num_stages", 3),
            "enable_fp_fusion": False}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", cc, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    try:
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {"ptx": compiled.asm["ptx"], "shared": compiled.metadata.shared,
            "regs": int(fields["REG"]), "stack": int(fields["STACK"]),
            "local": int(fields["LOCAL"])}


CCS = (80, 89, 90)
GEMM_SHAPES = [  # (w_bits, activation dtype or None for int8 codes, groups of K=4096)
    (4, None, 1), (4, None, 32), (4, None, 64), (8, None, 1), (4, torch.bfloat16, 32),
    (4, torch.float16, 1),
]
HADAMARD_SIZES = (4096, 11008, 14336, 1536, 18944, 28672)


def _gemm_id(m: int, w_bits: int, act: torch.dtype | None, groups: int) -> str:
    return f"gemm-m{m}-w{w_bits}-{'int8' if act is None else str(act)[6:]}-g{groups}"


CASES = {
    **{_gemm_id(m, w, act, g): (gemm_args, (m, 4096, g, w, act, True, torch.bfloat16))
       for m in (1, 64, 2048) for w, act, g in GEMM_SHAPES},
    **{f"hadamard-{n}": (hadamard_quantize_args, (n, torch.bfloat16)) for n in HADAMARD_SIZES},
    "quantize-4096": (quantize_args, (4096, torch.bfloat16)),
}


def main() -> None:
    for case, (make, args) in CASES.items():
        for cc in CCS:
            r = compile_for(*make(*args), cc)
            mma = [line.strip() for line in r.pop("ptx").splitlines()
                   if "mma.sync" in line or "wgmma.mma_async" in line]
            print(json.dumps({"case": case, "cc": cc, "mma": mma[:2], **r}), flush=True)


if __name__ == "__main__":
    main()
