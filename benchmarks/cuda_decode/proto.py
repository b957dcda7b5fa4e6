"""The CUDA decode-kernel prototype (``decode.cu``, docs/benchmarks/decode.md round 27): compiled with NVRTC, checked
against a float32 reference of the same math, then timed at 32k (Llama-3.1-8B shape: 8 KV heads, 32 query heads,
head 128, groups of 64, d=2 grids at 2 bits, stored float8 projections).

Random codes and factors: this times the kernel and checks its fragments; it says nothing about quality (that is
``aquakv bench quality --key-residual post_rope``). ``KROT=1``: the key residual kept after RoPE
(``KernelSettings.key_residual="post_rope"``); ``KROT=0``: the shipped format (residual before RoPE, un-rotated per
token on tensor cores). Variants are ``KROT,BT,MINB[,STAGED[,UPS]]`` (tile tokens, CTAs per SM the registers are
sized for, operands staged in shared memory, ``up8^T`` in shared memory). Needs a CUDA GPU with float8 tensor
cores (sm_89+).

    python benchmarks/cuda_decode/proto.py --out DIR [--batches 8 32 82] [--ranks 64] [--variants 1,1024,1,1,1] [--post]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch

from aquakv.kernels.host import hadamard_pm1

NH, GQ, HD, GS = 8, 4, 128, 64
DM, NG, HQ = NH * HD, NH * HD // GS, NH * GQ
SRC = (pathlib.Path(__file__).parent / "decode.cu").read_text()


STG = 64  # tokens per staged copy


def parse_variant(v: str) -> tuple[int, int, int, int, int]:
    """'KROT,BT,MINB[,STAGED[,UPS]]' -> the five integers."""
    f = [int(a) for a in v.split(",")] + [0, 0]
    return tuple(f[:5])


def smem_bytes(rk: int, rv: int, staged: int, ups: int) -> int:
    """Dynamic shared memory of a staged variant: two stages, then up^T and the key bias (UPS)."""
    if not staged:
        return 0
    stage = STG * ((NG * 4 + 4) * 4 * 2 + NG * 2 * 2 + (rk + 16) + (rv + 16) + 8 + (HD // 4 + 2) * 8)
    return 2 * stage + (DM * (rk + 16) + DM * 4 if ups else 0)


def compile_variant(krot: int, rk: int, rv: int, bt: int, minb: int, staged: int = 0, ups: int = 0):
    head = (f"#define KROT {krot}\n#define RK {rk}\n#define RV {rv}\n#define BT {bt}\n#define MINB {minb}\n"
            f"#define STAGED {staged}\n#define STG {STG}\n#define UPS {ups}\n")
    kern = torch.cuda._compile_kernel(head + SRC, "aquakv_decode_mma")
    smem = smem_bytes(rk, rv, staged, ups)
    if smem:
        kern.set_shared_memory_config(smem)
    kern.smem = smem
    return kern


def pack_keys(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, NG, 32] (0..15) -> [N, NG*4] int32: word c, nibble 2i+j = code 8i + 4j + c."""
    n = codes.shape[0]
    words = torch.zeros(n, NG, 4, dtype=torch.int64, device=codes.device)
    for c in range(4):
        for i in range(4):
            for j in range(2):
                words[:, :, c] |= codes[:, :, 8 * i + 4 * j + c].long() << (4 * (2 * i + j))
    return to_words(words.view(n, NG * 4))


def pack_values(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, NG, 32] -> [N, NH*8] int32: head h, word g, nibble 4*gr + m = code 8m + g of group 2h + gr."""
    n = codes.shape[0]
    cg = codes.view(n, NH, 2, 4, 8)  # [n, head, group in head, m, g]: code 8m + g
    words = torch.zeros(n, NH, 8, dtype=torch.int64, device=codes.device)
    for gr in range(2):
        for m in range(4):
            words |= cg[:, :, gr, m, :].long() << (4 * (4 * gr + m))
    return to_words(words.view(n, NH * 8))


def half_pairs(pts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grid points [16, 2] -> [16] int32 holding the pair in ``dtype`` (low half = coordinate 0)."""
    return pts.to(dtype).contiguous().view(torch.int32).view(16)


def to_words(w: torch.Tensor) -> torch.Tensor:
    """int64 words < 2**32 -> int32 with the same bits."""
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def inverse_frequencies(device: str) -> torch.Tensor:
    """Llama-3's RoPE frequencies (theta 500000) ``[HD / 2]``."""
    return 1.0 / (500000.0 ** (torch.arange(0, HD, 2, dtype=torch.float32, device=device) / HD))


def rope_tables(positions: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` bf16 ``[positions, HD / 2]`` (as the model rounds them) and the kernel's table ``cs [positions,
    HD / 4, 2]`` int32: per frequency pair, its two cosines then its two sines as bf16x2."""
    ang = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inverse_frequencies(device)
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    pairs = [t.view(-1, HD // 4, 2).view(torch.int32).squeeze(-1) for t in (cos, sin)]
    return cos, sin, torch.stack(pairs, -1).contiguous()


def rotated_query(q: torch.Tensor, smat: torch.Tensor) -> torch.Tensor:
    """``q [B, HQ, HD]`` per group times ``S / GS`` (f16): what the rotated key residual's units are scored with."""
    return (q.float().view(*q.shape[:-1], 2, GS) @ smat / GS).view(q.shape).half()


def make_inputs(B: int, C: int, rk: int, rv: int, dev: str, seed: int = 0, pos0: int = 0, codes: bool = True) -> dict:
    """Random operands; ``codes``: per-code tensors for the reference (else random code words only, for timing)."""
    torch.manual_seed(seed)
    N = B * C
    kgrid = torch.randn(16, 2, device=dev)
    vgrid = torch.randn(16, 2, device=dev)
    x = {}
    if codes:
        kcode = torch.randint(0, 16, (N, NG, 32), device=dev)
        vcode = torch.randint(0, 16, (N, NG, 32), device=dev)
        x.update(kcode=kcode, vcode=vcode, kc=pack_keys(kcode), vc=pack_values(vcode))
    else:
        x.update(kc=torch.randint(-2**31, 2**31 - 1, (N, NG * 4), dtype=torch.int32, device=dev),
                 vc=torch.randint(-2**31, 2**31 - 1, (N, NG * 4), dtype=torch.int32, device=dev))
    ks = (torch.rand(N, NG, device=dev) * 1.5 + 0.5).half()
    vs = (torch.rand(N, NG, device=dev) * 1.5 + 0.5).half()
    zk = (torch.randn(N, rk, device=dev) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    zv = (torch.randn(N, rv, device=dev) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    zs = torch.rand(N, 2, device=dev) * 0.01 + 0.002
    up8t = (torch.randn(DM, rk, device=dev) * 80).clamp(-448, 448).to(torch.float8_e4m3fn)
    kbias = torch.randn(DM, device=dev) * 0.1
    signs = torch.where(torch.rand(GS, device=dev) < 0.5, -1.0, 1.0)
    smat = signs[:, None] * hadamard_pm1(GS).to(dev)  # S = diag(signs) H: rotate x @ S, un-rotate y @ S.T
    q = (torch.randn(B, HQ, HD, device=dev) * 0.5).to(torch.bfloat16)
    qrot = rotated_query(q, smat)
    pos = (torch.arange(C, device=dev, dtype=torch.int32) + pos0).repeat(B, 1).contiguous()
    cos, sin, cs = rope_tables(C + pos0, dev)
    x.update(B=B, C=C, rk=rk, rv=rv, q=q, qrot=qrot, kgrid=kgrid, vgrid=vgrid, ks=ks, vs=vs, zk=zk, zv=zv, zs=zs,
             up8t=up8t, kup_scale=0.01, kbias=kbias, smat=smat, smat_h=smat.half().contiguous(),
             ktab=half_pairs(kgrid, torch.float16), vtab=half_pairs(vgrid, torch.float16), cs=cs, pos=pos, cos=cos,
             sin=sin)
    return x


def launch(kern, x: dict, bt: int, out: dict | None = None) -> dict:
    B, C = x["B"], x["C"]
    NT = (C + bt - 1) // bt
    if out is None:
        out = dict(orot=torch.empty(B, HQ, NT, HD, device="cuda"), pzo=torch.empty(B, HQ, NT, x["rv"], device="cuda"),
                   lse=torch.empty(B, HQ, NT, device="cuda"), NT=NT)
    kern(grid=(NT, B, 1), block=(256, 1, 1), shared_mem=kern.smem,
         args=[x["q"], x["qrot"], x["kc"], x["ks"], x["vc"], x["vs"], x["zk"], x["zv"], x["zs"], x["up8t"], x["kbias"],
               x["ktab"], x["vtab"], x["smat_h"], x["cs"], x["pos"], out["orot"], out["pzo"], out["lse"], C, NT,
               float(x["kup_scale"]), float(math.log2(math.e) / math.sqrt(HD))])
    return out


def reference(x: dict, krot: int, bt: int) -> dict:
    """float32 per-tile partials of the same math (bf16 where the kernel rounds: K before RoPE, RoPE's tables)."""
    B, C = x["B"], x["C"]
    NT = (C + bt - 1) // bt
    N = B * C
    ku = x["kgrid"].half().float()[x["kcode"]].view(N, NG, GS)  # units, rotated space
    vu = x["vgrid"].half().float()[x["vcode"]].view(N, NG, GS)
    zs = x["zs"]
    kpred = (x["zk"].float() @ x["up8t"].float().t()) * (zs[:, :1] * x["kup_scale"]) + x["kbias"]  # [N, DM]
    if not krot:
        res = (ku @ x["smat"].t()) * (x["ks"].float()[:, :, None] / GS)
        kpred = kpred + res.view(N, DM)
    k = kpred.to(torch.bfloat16).float().view(B, C, NH, HD)
    cos = x["cos"].float()[x["pos"].long()][:, :, None, :]  # [B, C, 1, 64]
    sin = x["sin"].float()[x["pos"].long()][:, :, None, :]
    kl, kh = k[..., :64], k[..., 64:]
    k = torch.cat([kl * cos - kh * sin, kh * cos + kl * sin], -1)  # [B, C, NH, HD]
    q = x["q"].float().view(B, NH, GQ, HD)
    s = torch.einsum("bhgd,bchd->bhgc", q, k)
    if krot:
        qr = x["qrot"].float().view(B, NH, GQ, 2, GS)
        kuv = ku.view(B, C, NH, 2, GS) * x["ks"].float().view(B, C, NH, 2, 1)
        s = s + torch.einsum("bhgrd,bchrd->bhgc", qr, kuv)
    s = s / math.sqrt(HD)
    pad = NT * bt - C
    s = torch.nn.functional.pad(s, (0, pad), value=float("-inf")).view(B, NH, GQ, NT, bt)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])  # [B, NH, GQ, NT, bt]
    vv = (vu * x["vs"].float()[:, :, None]).view(B, C, NH, HD)
    vv = torch.nn.functional.pad(vv, (0, 0, 0, 0, 0, pad)).view(B, NT, bt, NH, HD)
    orot = torch.einsum("bhgnt,bnthd->bhgnd", p, vv)
    zvs = (x["zv"].float() * zs[:, 1:]).view(B, C, -1)
    zvs = torch.nn.functional.pad(zvs, (0, 0, 0, pad)).view(B, NT, bt, -1)
    pz = torch.einsum("bhgnt,bntr->bhgnr", p, zvs)
    return dict(orot=orot.reshape(B, HQ, NT, HD), pzo=pz.reshape(B, HQ, NT, -1), lse=lse.reshape(B, HQ, NT))


def post(x: dict, out: dict) -> torch.Tensor:
    """What the merge would need from the partials: the values' un-rotation (per group, ``S^T / GS``) and the value
    predictor's latent term ``pz @ up^V`` per head (random ``up^V`` here), as plain torch ops: ``[B, HQ, NT, HD]``."""
    B, NT = x["B"], out["NT"]
    o = (out["orot"].view(B, HQ, NT, 2, GS) @ (x["smat"].t() / GS)).view(B, NH, GQ, NT, HD)
    upv = x.setdefault("upv", torch.randn(x["rv"], DM, device=out["orot"].device) * 0.01)
    z = out["pzo"].view(B, NH, GQ * NT, x["rv"])
    return o + torch.einsum("bhmr,rhd->bhmd", z, upv.view(x["rv"], NH, HD)).view(B, NH, GQ, NT, HD)


def codec_check(kern, bt: int, device: str = "cuda", B: int = 2, T: int = 700, pos0: int = 41) -> dict:
    """The kernel on the runtime's own encoding. A rank-64 stored layer (layer 1 of ``benchmarks/decode.py``'s random
    codecs) encodes random keys and values with ``KernelSettings.key_residual="post_rope"``'s rotation
    (:func:`aquakv.codec.encode`). Its codes, scales and projections go to the kernel in its word order (``kern=None``:
    to :func:`reference`, the kernel's math in float32), the tiles are merged and the values un-rotated. The result is
    compared with attention over :func:`aquakv.codec.decode`'s ``K̂, V̂``, RoPE'd in bf16 as the cache does. Returns
    the relative error."""
    from aquakv.codec import decode, encode, key_factor, stored_factors
    from aquakv.family import Rope
    from aquakv.packing import unpack
    from aquakv.rope import apply_rotary_pos_emb, residual_rotation
    from benchmarks.decode import make_codecs

    codec = make_codecs(2, DM, 64, seed=5, device=device)[1]
    rope = Rope(rotary=None, apply=apply_rotary_pos_emb, standard=True)  # Llama's rotate-half
    gen = torch.Generator(device=device).manual_seed(7)
    keys, values, prev_k, prev_v = (torch.randn(B, T, DM, device=device, generator=gen) for _ in range(4))
    pos = (torch.arange(T, device=device, dtype=torch.int32) + pos0).repeat(B, 1).contiguous()
    ang = pos.float()[..., None] * inverse_frequencies(device)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)  # [B, T, HD]
    rotation = residual_rotation(rope, NH, cos, sin)
    block, _ = encode(keys, values, (prev_k, prev_v), codec, True, rotation)
    k_hat, v_hat = decode(block, None, codec, rotation)
    # the reference: attention over the cache's reconstruction (keys rounded to bf16, then RoPE, as _rope_keys does)
    q = (torch.randn(B, HQ, HD, device=device, generator=gen) * 2.0).to(torch.bfloat16)  # sharp attention
    kh = k_hat.to(torch.bfloat16).float().view(B, T, NH, HD).transpose(1, 2)
    kr = rope.rotate(kh, cos, sin)  # [B, NH, T, HD]
    s = torch.einsum("bhgd,bhtd->bhgt", q.float().view(B, NH, GQ, HD), kr) / math.sqrt(HD)
    ref = torch.einsum("bhgt,bhtd->bhgd", torch.softmax(s, -1), v_hat.view(B, T, NH, HD).transpose(1, 2))
    # the kernel's operands, from the block
    n = B * T
    kcode = unpack(block.keys.codes.view(n, -1), 4, NG * 32).view(n, NG, 32)
    vcode = unpack(block.values.codes.view(n, -1), 4, NG * 32).view(n, NG, 32)
    up8, kup_scale = key_factor(codec.key_predictor)
    z = block.projections.latents.view(n, -1)
    smat = codec.keys.signs.float()[:, None] * hadamard_pm1(GS).to(device)
    cb, sb, cs = rope_tables(T + pos0, device)
    x = dict(B=B, C=T, rk=64, rv=64, q=q, kcode=kcode, vcode=vcode, kc=pack_keys(kcode), vc=pack_values(vcode),
             ks=block.keys.scales.reshape(n, NG).half().contiguous(),
             vs=block.values.scales.reshape(n, NG).half().contiguous(), zk=z[:, :64].contiguous(),
             zv=z[:, 64:].contiguous(), zs=block.projections.scales.reshape(n, 2).contiguous(),
             up8t=up8.t().contiguous().to(device), kup_scale=float(kup_scale),
             kbias=codec.key_predictor.bias.float(), kgrid=codec.keys.grid.float(), vgrid=codec.values.grid.float(),
             ktab=half_pairs(codec.keys.grid, torch.float16), vtab=half_pairs(codec.values.grid, torch.float16),
             smat=smat, smat_h=smat.half().contiguous(), pos=pos, cos=cb, sin=sb, cs=cs, qrot=rotated_query(q, smat))
    out = launch(kern, x, bt) if kern is not None else reference(x, 1, bt)
    # merge the tiles, then un-rotate the values (S_v^T / GS per group) and add the value predictor's latent term
    w = torch.softmax(out["lse"], -1)[..., None]  # [B, HQ, NT, 1]
    orot, pz = (w * out["orot"]).sum(-2), (w * out["pzo"]).sum(-2)
    sv = codec.values.signs.float()[:, None] * hadamard_pm1(GS).to(device)
    o = (orot.view(B, HQ, 2, GS) @ sv.t() / GS).view(B, NH, GQ, HD)
    up_v = stored_factors(codec.value_predictor)[1].to(device)  # [RV, DM]
    o = o + torch.einsum("bhgr,rhd->bhgd", pz.view(B, NH, GQ, 64), up_v.view(64, NH, HD))
    o = o + codec.value_predictor.bias.float().view(NH, HD)[None, :, None]
    return {"out": rel_err(o, ref), "max_abs_ref": float(ref.abs().max())}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def gpu_ms(fn, reps: int = 20, name: str | None = "aquakv_decode_mma") -> tuple[float, float]:
    """(wall ms per call from CUDA events, GPU ms per call from the profiler's sums of the kernels whose name holds
    ``name``, or of every kernel)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    torch.cuda.synchronize()
    wall = e0.elapsed_time(e1) / reps
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    tot = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0
              and (name is None or name in e.key)) / 1e3
    return wall, tot / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--variants", nargs="+", default=["1,1024,1,1,1", "1,512,1,1,1", "0,512,1,1,1"],
                    help="KROT,BT,MINB[,STAGED[,UPS]] (UPS only below rank 128)")
    ap.add_argument("--post", action="store_true", help="also time the partials' post-processing in torch")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--codec-check", action="store_true",
                    help="also check the rotated kernel on the runtime's own post-RoPE encoding of one layer")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    rec = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "checks": [], "timings": []}
    kerns = {}
    for rk in args.ranks:
        for v in args.variants:
            krot, bt, minb, staged, ups = parse_variant(v)
            if ups and rk > 128:
                continue
            t = time.time()
            kerns[(rk, v)] = compile_variant(krot, rk, 64, bt, minb, staged, ups)
            print(f"compiled RK={rk} {v} in {time.time() - t:.1f}s", flush=True)
    # correctness: two batch rows, a partial last tile, positions not starting at 0
    for rk in [] if args.no_check else args.ranks:
        x = make_inputs(2, 1000, rk, 64, "cuda", seed=1, pos0=37)
        for v in args.variants:
            if (rk, v) not in kerns:
                continue
            krot, bt = parse_variant(v)[:2]
            out = launch(kerns[(rk, v)], x, bt)
            torch.cuda.synchronize()
            ref = reference(x, krot, bt)
            errs = {k: rel_err(out[k], ref[k]) for k in ("orot", "pzo")}
            errs["lse_abs"] = float((out["lse"] - ref["lse"]).abs().max())
            ok = errs["orot"] < 3e-2 and errs["pzo"] < 3e-2 and errs["lse_abs"] < 5e-2
            rec["checks"].append(dict(rank=rk, variant=v, ok=ok, **errs))
            print(f"check RK={rk} KROT,BT,MINB,STAGED,UPS={v}: {'ok' if ok else 'FAIL'} {errs}", flush=True)
    if args.codec_check:
        for v in args.variants:
            krot, bt = parse_variant(v)[:2]
            if krot and (64, v) in kerns:
                errs = codec_check(kerns[(64, v)], bt)
                rec["checks"].append(dict(rank=64, variant=v, codec=True, ok=errs["out"] < 2e-2, **errs))
                print(f"codec check KROT,BT,MINB,STAGED,UPS={v}: {errs}", flush=True)
    # timings at the context, every variant, both batches
    for B in args.batches:
        for rk in args.ranks:
            x = make_inputs(B, args.context, rk, 64, "cuda", seed=2, codes=False)
            for v in args.variants:
                if (rk, v) not in kerns:
                    continue
                krot, bt = parse_variant(v)[:2]
                out = launch(kerns[(rk, v)], x, bt)
                wall, gpu = gpu_ms(lambda k=kerns[(rk, v)], x=x, bt=bt, out=out: launch(k, x, bt, out))
                kb = (x["kc"].numel() * 4 * 2 + x["ks"].numel() * 2 * 2 + x["zk"].numel() + x["zv"].numel()
                      + x["zs"].numel() * 4) / 1e6
                rec["timings"].append(dict(batch=B, rank=rk, variant=v, wall_ms=wall, gpu_ms=gpu, mbytes=kb))
                if args.post:
                    pw, pg = gpu_ms(lambda x=x, out=out: post(x, out), name=None)
                    rec["timings"][-1].update(post_wall_ms=pw, post_gpu_ms=pg)
                    print(f"  post (un-rotation + latent up-projection, torch): wall {pw:.3f} ms, GPU {pg:.3f} ms",
                          flush=True)
                print(f"time b{B} RK={rk} KROT,BT,MINB,STAGED,UPS={v}: wall {wall:.3f} ms, GPU {gpu:.3f} ms "
                      f"({kb / gpu / 1e3:.2f} TB/s of cache bytes)", flush=True)
            del x
            torch.cuda.empty_cache()
    (args.out / "proto.json").write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
