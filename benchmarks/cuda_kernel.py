"""The CUDA decode kernel alone (``aquakv/kernels/cuda_decode.cu``, through the runtime's
:func:`aquakv.kernels.cuda.partials`): checked on the runtime's own encoding of a layer, then timed at 32k on random
codes (Llama-3.1-8B shape: 8 KV heads, 32 query heads, head 128, groups of 64, d=2 grids at 2 bits, stored float8
projections, the key residual after RoPE).

The check (``check``) encodes random keys and values with ``KernelSettings.key_residual="post_rope"``'s format
(:func:`aquakv.codec.encode` with the model's RoPE), some tokens masked, and compares the kernel's attention with
attention over :func:`aquakv.codec.decode`'s ``K̂, V̂``. Without a GPU it runs :func:`reference` instead of the
kernel: the kernel's math in float32 on the same operands (what ``tests/test_cuda_kernel.py`` checks in CI).

    python benchmarks/cuda_kernel.py --out DIR [--batches 8 32 82] [--ranks 64 128]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from aquakv.codec import EncodedBlock, Projections, decode, encode  # noqa: E402
from aquakv.family import Rope  # noqa: E402
from aquakv.kernels import cuda  # noqa: E402
from aquakv.packing import unpack  # noqa: E402
from aquakv.rope import apply_rotary_pos_emb, residual_rotation  # noqa: E402
from benchmarks.decode import gpu_ms, llama_config, make_codecs, random_block, random_projections  # noqa: E402

NH, GQ, HD, GS = 8, 4, 128, 64
DM, NG, HQ = NH * HD, NH * HD // GS, NH * GQ


def llama_rope(device: str) -> Rope:
    """Llama-3.1's RoPE (its rotary module: theta 500000, llama3 scaling), rotate-half."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return Rope(LlamaRotaryEmbedding(llama_config(2)).to(device), apply_rotary_pos_emb, standard=True)


def reference(block: EncodedBlock, codec, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              valid: torch.Tensor | None) -> torch.Tensor:
    """The kernel's math in float32 on a block in natural code order: the key prediction from the float8 ``z^K`` and
    ``up``, plus the bias, rounded to bf16 and RoPE'd with bf16 tables; the residual's scores in the rotated space
    (``q_g S_g / GS`` against scaled units); values attended rotated, un-rotated after; the value predictor's term from
    the probabilities' sum of ``z^V`` -> ``[B, HQ, HD]``."""
    ops = cuda.layer_operands(codec)
    b, t = block.keys.codes.shape[:2]
    n = b * t
    kunits = codec.keys.grid.half().float()[unpack(block.keys.codes.view(n, -1), 4, NG * 32)].view(b, t, NH, 2, GS)
    vunits = codec.values.grid.half().float()[unpack(block.values.codes.view(n, -1), 4, NG * 32)].view(b, t, NH, 2, GS)
    ks, vs = (s.float().view(b, t, NH, 2, 1) for s in (block.keys.scales, block.values.scales))
    z, zs = block.projections.latents.float(), block.projections.scales
    kpred = (z[..., : ops.rk] @ ops.up8t.float().t()) * (zs[..., :1] * ops.up_scale) + ops.key_bias
    k = kpred.to(torch.bfloat16).float().view(b, t, NH, HD)
    c, s_ = (x[..., None, : HD // 2].to(torch.bfloat16).float() for x in (cos, sin))
    k = torch.cat([k[..., :64] * c - k[..., 64:] * s_, k[..., 64:] * c + k[..., :64] * s_], -1)
    qh = q.float().view(b, NH, GQ, HD)
    scores = torch.einsum("bhgd,bthd->bhgt", qh, k)
    qrot = (qh.view(b, NH, GQ, 2, GS) @ ops.key_rotation).half().float()
    scores = (scores + torch.einsum("bhgrd,bthrd->bhgt", qrot, kunits * ks)) / math.sqrt(HD)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
    p = torch.softmax(scores, -1)
    orot = torch.einsum("bhgt,bthrd->bhgrd", p, vunits * vs)
    o = (orot @ ops.value_unrotation).reshape(b, NH, GQ, HD)
    pz = torch.einsum("bhgt,btk->bhgk", p, z[..., ops.rk :] * zs[..., 1:])
    o = o + torch.einsum("bhgk,khd->bhgd", pz, ops.value_up.view(ops.rv, NH, HD)) + ops.value_bias.view(NH, 1, HD)
    return o.reshape(b, HQ, HD)


def check(device: str, rank: int = 64, b: int = 2, t: int = 700, pos0: int = 41) -> dict:
    """Relative error of the kernel (or, off CUDA, :func:`reference`) against attention over the cache's
    reconstruction of a rank-``rank`` stored layer (layer 1 of ``benchmarks/decode.py``'s random codecs); row 1 sees
    other positions than row 0, a tenth of the tokens masked. Also the error when the codes are read in the other
    order (the check can fail)."""
    codec = make_codecs(2, DM, rank, seed=5, device=device)[1]
    rope = llama_rope(device)
    gen = torch.Generator(device=device).manual_seed(7)
    keys, values, prev_k, prev_v = (torch.randn(b, t, DM, device=device, generator=gen) for _ in range(4))
    pos = (torch.arange(t, device=device)[None] + pos0 + 300 * torch.arange(b, device=device)[:, None]).int()
    cos, sin = rope.cos_sin(pos, device)
    rotation = residual_rotation(rope, NH, cos, sin)
    block, _ = encode(keys, values, (prev_k, prev_v), codec, True, rotation)
    k_hat, v_hat = decode(block, None, codec, rotation)
    valid = torch.rand(b, t, device=device, generator=gen) > 0.1
    q = (torch.randn(b, HQ, HD, device=device, generator=gen) * 2.0).to(torch.bfloat16)  # sharp attention
    kr = rope.rotate(k_hat.to(torch.bfloat16).float().view(b, t, NH, HD).transpose(1, 2), cos, sin)
    scores = torch.einsum("bhgd,bhtd->bhgt", q.float().view(b, NH, GQ, HD), kr) / math.sqrt(HD)
    scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
    want = torch.einsum("bhgt,bhtd->bhgd", torch.softmax(scores, -1), v_hat.view(b, t, NH, HD).transpose(1, 2))
    want = want.reshape(b, HQ, HD)

    def attend(blk: EncodedBlock) -> torch.Tensor:
        if device != "cuda":
            return reference(blk, codec, q, cos, sin, valid)
        o, _ = cuda.partials(q[:, :, None], cuda.kernel_order(blk), t, cuda.layer_operands(codec), pos, valid,
                             1 / math.sqrt(HD), cuda.RopeTable(rope, torch.device(device)).ensure(pos, t))
        return o[:, :, 0, 0]

    wrong = cuda.kernel_order(block)  # read in natural order (the reference) / permuted twice (the kernel)
    return {"rel_err": rel_err(attend(block), want), "rel_err_codes_misordered": rel_err(attend(wrong), want)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def random_layer(batch: int, tokens: int, rank: int) -> tuple:
    """A rank-``rank`` stored layer's operands over ``tokens`` random compressed tokens (codes in any order)."""
    codec = make_codecs(2, DM, rank, seed=2)[1]
    block = EncodedBlock(random_block(batch, tokens, DM, codec.keys.config),
                         random_block(batch, tokens, DM, codec.values.config),
                         Projections(random_projections(batch, tokens, 2 * rank),
                                     torch.rand(batch, tokens, 2, device="cuda") * 0.01 + 1e-4, rank))
    pos = torch.arange(4, tokens + 4, dtype=torch.int32, device="cuda")[None].expand(batch, -1)
    q = (torch.randn(batch, HQ, 1, HD, device="cuda") * 0.5).to(torch.bfloat16)
    table = cuda.RopeTable(llama_rope("cuda"), torch.device("cuda")).ensure(pos, tokens)
    return q, block, cuda.layer_operands(codec), pos, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--ranks", type=int, nargs="+", default=[64])
    ap.add_argument("--context", type=int, default=32768)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    rec = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/cuda_kernel.py " + " ".join(sys.argv[1:]), "checks": [], "timings": []}
    for rank in args.ranks:  # first use: NVRTC compiles the kernel for the shape (cached for the process)
        start = time.time()
        cuda.compile_kernel(NH, rank, rank, torch.cuda.get_device_properties(0).shared_memory_per_block_optin)
        rec.setdefault("compile_s", {})[rank] = time.time() - start
        errs = check("cuda", rank)
        rec["checks"].append({"rank": rank, **errs, "ok": errs["rel_err"] < 2e-2})
        print(f"check rank {rank}: {errs}", flush=True)
    for batch in args.batches:
        for rank in args.ranks:
            q, block, ops, pos, table = random_layer(batch, args.context, rank)

            def fn(q=q, block=block, ops=ops, pos=pos, table=table):
                return cuda.partials(q, block, args.context, ops, pos, None, 1 / math.sqrt(HD), table)

            kernels: list = []
            total = gpu_ms(fn, 10, kernels)
            kernel = sum(ms for name, ms, _ in kernels if "aquakv_decode_mma" in name)
            mb = block.nbytes / 1e6
            rec["timings"].append({"batch": batch, "rank": rank, "gpu_ms": total, "kernel_gpu_ms": kernel,
                                   "cache_mbytes": mb, "tile": cuda.tile_tokens(batch, args.context, q.device),
                                   "kernels": [{"name": k, "ms": ms, "calls": c} for k, ms, c in kernels[:12]]})
            print(f"b{batch} rank {rank}: kernel {kernel:.3f} ms, with the merge {total:.3f} ms GPU "
                  f"({mb / kernel / 1e3:.2f} TB/s of cache bytes)", flush=True)
            del q, block
            torch.cuda.empty_cache()
    (args.out / "cuda_kernel.json").write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
