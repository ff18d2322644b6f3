"""Compile the Triton kernels for a GPU architecture without a GPU.

The interpreter runs code that the compiler may reject (types of loop-carried values, layouts,
register pressure), so the CPU tests also build every kernel, with the block sizes the launchers
choose, for an NVIDIA target, and report each build's registers and spills:

    python -m udat_kernels.triton_backend.aot [--arch 90]

Exit status 1 when a kernel fails to compile. Must run without TRITON_INTERPRET (the kernels are
bound to the interpreter when it is set at import).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _common, small_c, tiled

_INT_ARGS = {"B", "C", "D", "P", "N", "R", "stride", "stride_x", "stride_w", "stride_g",
             "stride_v"}
_I64_ARGS = {"ignore_index", "row0"}
_DATA_PTRS = {"x_ptr", "w_ptr", "gx_ptr", "gw_ptr", "src_ptr", "hat_ptr", "v_ptr", "out_ptr",
              "g_ptr"}


def _signature(fn, constexprs: dict, dtype: str) -> dict:
    """Argument types as the launchers pass them: data in `dtype`, scratch in fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "target_ptr":
            sig[name] = "*i64"
        elif name in _DATA_PTRS:
            sig[name] = "*" + dtype
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        elif name in _I64_ARGS:
            sig[name] = "i64"
        else:
            sig[name] = "fp32"
    return sig


def specs():
    """(label, kernel, constexprs, dtype, num_warps, num_stages) for representative launches."""
    out = []
    flags = dict(HAS_CW=True, HAS_SW=True, HAS_LAMBDA=True, HAS_BIAS=False)
    for dtype in ("fp32", "bf16"):
        for B, C in ((64, 2), (65536, 7)):
            for grad in (False, True):
                bb, bc, bd, warps = small_c._config(B, C, 1024, grad)
                single = B <= bb
                out.append((f"small_c {dtype} B={B} C={C} {'bwd' if grad else 'fwd'}",
                            small_c._small_c_kernel,
                            dict(flags, NORMALIZE=True, HAS_MARGIN=True, STRAIGHT_THROUGH=False,
                                 HAS_GLOSS=grad, REDUCTION=1, WRITE_LOSS=not grad,
                                 COMPUTE_GRAD=grad, DENOM_INLINE=single, SINGLE_PROGRAM=single,
                                 GW_DIRECT=single, NUM_C=C, BLOCK_B=bb, BLOCK_C=bc,
                                 BLOCK_D=bd), dtype, warps, 2))
    out.append(("small_c linear", small_c._small_c_kernel,
                dict(flags, NORMALIZE=False, HAS_MARGIN=False, STRAIGHT_THROUGH=False,
                     HAS_BIAS=True, HAS_GLOSS=False, REDUCTION=2, WRITE_LOSS=True,
                     COMPUTE_GRAD=True, DENOM_INLINE=False, SINGLE_PROGRAM=False,
                     GW_DIRECT=False, NUM_C=3, BLOCK_B=16, BLOCK_C=4, BLOCK_D=128),
                "fp16", 8, 2))
    out.append(("grad weight finish", small_c._small_c_grad_weight_kernel,
                dict(NORMALIZE=True, HAS_BIAS=True, BLOCK_P=16, BLOCK_D=256), "bf16", 4, 2))
    out.append(("mean denominator", _common._mean_denominator_kernel,
                dict(HAS_CW=True, HAS_SW=True, BLOCK=1024), "fp32", 4, 2))
    out.append(("row norms", tiled._row_norm_kernel,
                dict(WRITE_HAT=True, BLOCK_R=16, BLOCK_D=256), "bf16", 4, 2))
    for dtype, dot32 in (("bf16", False), ("fp32", True)):
        bm, bn, bk, warps, stages = (128, 128, 32, 8, 4) if dtype == "bf16" else (64, 64, 32, 4, 2)
        out.append((f"logits {dtype}", tiled._logits_kernel,
                    dict(NORMALIZE=True, HAS_MARGIN=True, HAS_BIAS=False, DOT_FP32=dot32,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), dtype, warps, stages))
    for write_loss, has_lse in ((True, False), (False, True)):
        out.append((f"softmax grad {'fwd' if write_loss else 'bwd'}", tiled._softmax_grad_kernel,
                    dict(NORMALIZE=True, HAS_MARGIN=True, STRAIGHT_THROUGH=False, HAS_CW=True,
                         HAS_SW=True, HAS_GLOSS=has_lse, REDUCTION=1, WRITE_LOSS=write_loss,
                         COMPUTE_GRAD=True, HAS_LSE=has_lse, BLOCK_N=1024), "bf16", 4, 2))
    out.append(("project", tiled._project_kernel,
                dict(NORMALIZE=True, HAS_LAMBDA=True, BLOCK_R=16, BLOCK_D=256), "bf16", 4, 2))
    return out


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    fields = [w for line in res.stdout.splitlines() if "REG:" in line for w in line.split()]
    return " ".join(w for w in fields if w.startswith(("REG:", "STACK:")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    args = p.parse_args(argv)
    if _common.interpreting():
        print("unset TRITON_INTERPRET: the kernels are bound to the interpreter", flush=True)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, kernel, constexprs, dtype, warps, stages in specs():
        src = ASTSource(kernel, _signature(kernel, constexprs, dtype), constexprs=constexprs)
        try:
            compiled = triton.compile(src, target=target,
                                      options={"num_warps": warps, "num_stages": stages})
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"ok   {label}: {_resources(compiled.asm.get('cubin', b''))}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
