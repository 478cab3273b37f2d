"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU (Triton's
bundled ptxas), and report facts about the PTX. Run as a script in a process where
TRITON_INTERPRET is unset (tests/test_triton_compile.py does that):

    python tests/triton_aot.py CC KERNEL PRECISION   ->  one JSON line

KERNEL: "rbf_symmetric" (the persistent kernel) or "update_c" / "update_d" (the update on C,
or on D = C^T). Strides of the contiguous dims are specialised to 1 and pointers/sizes to
16-byte divisibility, as Triton's JIT does for contiguous, aligned tensors at launch.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys


def compile_kernel(cc: int, kernel: str, precision: str) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel == "rbf_symmetric":
        fn = importlib.import_module("kcm_cuda.kernels.triton.rbf_kernel")
        fn = fn._rbf_symmetric_persistent_kernel
        args = ["x_ptr", "xsq_ptr", "out_ptr", "M", "D", "stride_xm", "stride_om", "neg_scale"]
        types = ["*fp32", "*fp32", "*fp32", "i32", "i32", "i32", "i32", "fp32"]
        unit = {"stride_xk": 1, "stride_on": 1}
        meta = {"NATIVE_DOT": False, "INPUT_PRECISION": precision, "BLOCK_M": 128,
                "BLOCK_K": 32, "CTAS_PER_SM": 1}  # fmt: skip
        aligned = ["x_ptr", "xsq_ptr", "out_ptr", "M", "D", "stride_xm", "stride_om"]
    else:
        fn = importlib.import_module("kcm_cuda.kernels.triton.convex_update")._convex_update_kernel
        args = ["k_ptr", "c_ptr", "out_ptr", "part_ptr", "N", "stride_kb", "stride_km",
                "stride_cb", "stride_cm", "stride_ob", "stride_om", "stride_pb"]  # fmt: skip
        types = ["*fp32"] * 4 + ["i32"] * 8
        unit = {"stride_kn": 1, "stride_cn": 1, "stride_on": 1}
        meta = {"TRANSPOSED": kernel == "update_d", "INPUT_PRECISION": precision,
                "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}  # fmt: skip
        aligned = args[:-1]
    params = list(fn.arg_names)
    signature = {}
    for name in params:
        signature[name] = types[args.index(name)] if name in args else "constexpr"
    attrs = {(params.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs={**unit, **meta}, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 8, "num_stages": 3}
    )
    ptx = compiled.asm["ptx"]
    return {
        "cc": cc,
        "kernel": kernel,
        "precision": precision,
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma": len(re.findall(r"\bmma\.sync", ptx)),
        "cp_async_4B": len(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*,\s*0x4,", ptx)),
        "cp_async_16B": len(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*,\s*0x10,", ptx)),
    }


if __name__ == "__main__":
    cc, kernel, precision = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    print(json.dumps(compile_kernel(cc, kernel, precision)))
