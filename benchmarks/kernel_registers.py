"""Registers, spills and shared memory of the fused decode kernel, compiled for a GPU this machine need not have
(Triton's compiler and the ``ptxas`` it ships; no GPU, no driver). Registers and shared memory per program are what
bound the programs per SM (decode.md round 21).

The launches are those of ``benchmarks/decode.py``'s kernel sweep (Llama-3.1-8B shape, a rank-64 layer: the chained
hand-ons, the stored kernel and its floors, each with its first launch), captured under Triton's interpreter with the
host code's CUDA operand dtypes and specialized as Triton would on a GPU (16-byte divisibility and ints equal to 1, from
the captured values). Register spills are what round 18 of ``docs/benchmarks/decode.md`` found the stored kernel
losing its time to (255 registers, 5.0 M local-memory requests on an H100), so a change to the kernel's register use
can be checked in seconds before it goes to a GPU:

    python benchmarks/kernel_registers.py --grids d2 d4 [--kernels stored] [--instructions]

On the kernel an H100 ran in round 18, the spilled stack it reports (160 / 240 bytes for d=2 / d=4) is exactly the
``n_spills`` Triton reported there (40 / 60 4-byte words). Only a GPU run times the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16", "int32": "i32", "int64": "i64", "uint8": "u8",
          "int8": "i8", "int16": "i16", "float8_e4m3fn": "fp8e4nv"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _Captured(Exception):
    pass


def capture(grids: str, rank: int, out: Path) -> None:
    """In a process with ``TRITON_INTERPRET=1``: run each variant's launch (:func:`benchmarks.decode.sweep`'s
    ``once``) up to the kernel call and write, per variant, what the kernel was called with to ``out`` (JSON):
    each tensor's dtype and 16-byte alignment, each int's value, the constexprs and the launch options."""
    import torch

    sys.path.insert(0, str(ROOT))
    import aquakv.kernels.decode as decode
    import aquakv.kernels.host as host
    import benchmarks.decode as bench
    from aquakv.kernels import KernelSettings

    bench.DEV = "cpu"
    host.INTERPRET = decode.INTERPRET = False  # the CUDA path's operand dtypes (the kernel itself never runs here)
    code = decode._decode_attention_kernel.fn.__code__
    names = code.co_varnames[:code.co_argcount]

    class Launcher:
        def __getitem__(self, grid: tuple) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                values: dict[str, object] = {}
                for name, a in zip(names, args, strict=False):
                    if isinstance(a, torch.Tensor):
                        values[name] = {"dtype": DTYPES[str(a.dtype).removeprefix("torch.")],
                                        "aligned": a.data_ptr() % 16 == 0}
                    else:
                        values[name] = a
                options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS}
                launches.append({"args": values, "constexprs": kwargs, "options": options, "grid": list(grid)})
                raise _Captured

            return launch

    decode._decode_attention_kernel = Launcher()
    launches: list[dict] = []
    captured = {}
    for name, fn in bench.sweep(1, 512, KernelSettings.from_env(), rank, grids, once=True):
        try:
            fn()
        except _Captured:
            captured[name] = launches.pop()
        else:
            raise RuntimeError(f"{name}: no _decode_attention_kernel launch")
    out.write_text(json.dumps(captured, default=int))


def specialize(kernel: object, launch: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of a captured launch, specialized as Triton does on a GPU, by the kernel's
    own parameters (``do_not_specialize``): an int equal to 1 becomes a constant, pointers aligned to and ints
    divisible by 16 get ``tt.divisibility`` 16."""
    params = {p.name: p for p in kernel.params}
    signature, constexprs, divisible = {}, dict(launch["constexprs"]), []
    for name, a in launch["args"].items():
        if isinstance(a, dict):
            signature[name] = "*" + a["dtype"]
            if a["aligned"] and not params[name].do_not_specialize_on_alignment:
                divisible.append(name)
        elif isinstance(a, float):
            signature[name] = "fp32"
        elif a == 1 and not params[name].do_not_specialize:
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if a % 16 == 0 and not params[name].do_not_specialize:
                divisible.append(name)
    signature |= dict.fromkeys(constexprs, "constexpr")
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return signature, constexprs, attrs


# SASS opcodes counted by ``--instructions``: barriers, shared-memory traffic (layout conversions go through it),
# tensor-core products (wgmma / mma.sync), special functions (RoPE's sine, cosine), global and local (spill) memory
OPCODES = ("BAR", "STS", "LDS", "STSM", "LDSM", "HGMMA", "QGMMA", "HMMA", "MUFU", "LDG", "STG", "LDL", "STL")


def opcode_counts(sass: str) -> dict[str, int]:
    """How often each of :data:`OPCODES` appears in ``cuobjdump -sass`` text (static counts: a loop body once)."""
    ops = [m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)",
                                                            sass)]
    return {"instructions": len(ops), **{op: ops.count(op) for op in OPCODES}}


def compile_counts(launch: dict, arch: int, maxnreg: int | None, tokens: int | None = None,
                   warps: int | None = None, instructions: bool = False, stages: int | None = None,
                   defer: bool = False) -> dict:
    """Compile the captured launch for ``sm_<arch>`` (``tokens`` per program / ``warps`` / ``stages`` instead of the
    captured ones)
    and read ptxas's register and spill report (and, with ``instructions``, the SASS opcode counts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    sys.path.insert(0, str(ROOT))
    from aquakv.kernels.jit import _decode_attention_kernel as kernel

    signature, constexprs, attrs = specialize(kernel, launch)
    constexprs |= {"BT": tokens} if tokens else {}
    constexprs |= {"DEFER_V": True} if defer and constexprs.get("STORED") else {}
    src = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}, attrs)
    options = dict(launch["options"]) | ({"maxnreg": maxnreg} if maxnreg else {})
    options |= ({"num_warps": warps} if warps else {}) | ({"num_stages": stages} if stages else {})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(compiled.asm["ptx"])
        report = subprocess.run([str(tools / "ptxas"), f"-arch=sm_{arch}a", "-v", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                                capture_output=True, text=True, check=True)
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", f"{d}/k.cubin"], capture_output=True, text=True,
                              check=True).stdout if instructions else ""
    text = report.stdout + report.stderr
    numbers = {key: int(m.group(1)) if (m := re.search(pattern, text)) else 0 for key, pattern in (
        ("registers", r"Used (\d+) registers"), ("stack_bytes", r"(\d+) bytes stack frame"),
        ("spill_store_bytes", r"(\d+) bytes spill stores"), ("spill_load_bytes", r"(\d+) bytes spill loads"))}
    return {**numbers, "shared_bytes": compiled.metadata.shared, "tokens_per_program": constexprs["BT"], **options,
            **(opcode_counts(sass) if sass else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grids", nargs="+", default=["d2", "d4"], choices=["d2", "d4"])
    p.add_argument("--rank", type=int, default=64, help="predictor rank of the sweep's layer (above 128: no projected "
                   "hand-on, as benchmarks/decode.py sweeps it)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    p.add_argument("--maxnreg", type=int, default=None, help="cap the registers per thread (ptxas then spills)")
    p.add_argument("--tokens", type=int, default=None, help="compressed tokens per program instead of the captured")
    p.add_argument("--warps", type=int, default=None, help="warps per program instead of the captured")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages instead of the captured")
    p.add_argument("--instructions", action="store_true",
                   help="also count SASS opcodes (cuobjdump): barriers, shared-memory traffic, MMAs, MUFU, loads")
    p.add_argument("--kernels", nargs="+", default=None,
                   help="variants to compile (default: all of benchmarks/decode.py's sweep: 'stored', 'chained, "
                        "projected hand-on', ...)")
    p.add_argument("--deferred", action="store_true",
                   help="the stored kernels with the value predictor's term deferred (value_latents='deferred')")
    p.add_argument("--capture", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.capture:
        capture(args.grids[0], args.rank, Path(args.capture))
        return
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    for grids in args.grids:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "launch.json"
            command = [sys.executable, __file__, "--capture", str(path), "--grids", grids, "--rank", str(args.rank)]
            subprocess.run(command, env=env, check=True)
            launches = json.loads(path.read_text())
        for name, launch in launches.items():
            if args.kernels and name not in args.kernels:
                continue
            print(json.dumps({"grids": grids, "rank": args.rank, "kernel": name, "arch": args.arch,
                              **compile_counts(launch, args.arch, args.maxnreg, args.tokens, args.warps,
                                               args.instructions, args.stages, args.deferred)}), flush=True)


if __name__ == "__main__":
    main()
