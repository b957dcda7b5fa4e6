// The CUDA decode kernel of stored projections with the key residual kept after RoPE (KernelSettings(
// key_residual="post_rope"), aquakv/kernels/cuda.py builds and launches it, design.md §2 "Post-RoPE key residuals";
// docs/benchmarks/decode.md round 27 measured it). Compiled at run time with NVRTC, per model shape.
//
// One CTA = one tile of BT compressed tokens of one batch row, NH warps = the KV heads; each warp walks its tile in
// 16-token blocks with an online softmax over its query rows (query heads x query tokens of its KV head, <= 8). Every
// operand is formed in the register layout the tensor-core instruction reads (RoPE'd keys, grid lookups,
// probabilities transposed with movmatrix):
//   key prediction   K_pred[16 tok, 128] = (z^K [16, RK] fp8) x (up8^T [RK, 128] fp8)            m16n8k32 e4m3
//   scores           S^T[16 tok, 8 (rows)] = RoPE(K_pred + bias) x Q^T [128, 8]                   m16n8k16 bf16
//   residual         S^T += scale_g * units_g x (Q_g S_g / GS)^T  (the residual is stored rotated)  f16
//   values           O^T[128 (dims), 8] += units^T [128, 16 tok] x (P * scale_g)^T [16, 8]        f16
//   value latents    PZ^T[RV, 8]        += z^V^T [RV, 16 tok] x (P * zs * 256)^T                  f16
// The values are attended in the Hadamard-rotated space and their latent term summed: the un-rotation, the
// up-projection and the bias come after the merge (all linear in P). Code words are in the kernel's order
// (cuda.py: key_order, value_order). The tile's per-token operands are copied to shared memory in stages of STG
// tokens (cp.async, the next while this one is attended); UPS: up8^T and the key bias in shared memory too.
// Compile-time parameters (prepended #defines): NH (KV heads, 4 or 8), RK, RV (multiples of 32 / 16), ZLD (bytes per
// token of the stored latents, RK + RV), MINB (CTAs per SM the registers are sized for), STG, UPS. A CTA's tile
// of BT tokens (a multiple of STG) is a launch argument.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define HD 128
#define DM (NH * HD)
#define NG (DM / 64)

__device__ __forceinline__ void mma_bf16(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_f16(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_e4m3(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// an 8x8 b16 matrix held as mma fragments (row lane/4, columns 2(lane%4), +1) -> its transpose, held the same way
__device__ __forceinline__ u32 trans8x8(u32 x) {
    u32 r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
    return r;
}

__device__ __forceinline__ u32 e4m3x2_to_f16x2(u16 v) {
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h2) : "h"(v));
    return h2;
}

__device__ __forceinline__ u32 fma_bf16x2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float h2f(u16 v) {
    float f;
    asm("{.reg .f16 t;\n mov.b16 t, %1;\n cvt.f32.f16 %0, t;\n}\n" : "=f"(f) : "h"(v));
    return f;
}

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u32 ld32(const void* p) { return __ldg(reinterpret_cast<const u32*>(p)); }
__device__ __forceinline__ u32 ldu32(const void* p) { return *reinterpret_cast<const u32*>(p); }

// UPS: the key predictor's up^T (rows padded) and the key bias in shared memory, after the two stages
#if UPS
#define UP_LD (RK + 16)
#else
#define UP_LD RK
#endif

// One stage of STG tokens of a batch row in shared memory (rows padded against bank conflicts; RoPE rows per token)
#define KC_LD (NG * 4 + 4)
#define ZK_LD (RK + 16)
#define ZV_LD (RV + 16)
#define CS_LD (HD / 4 + 2)
struct StageRows {
    u32 kc[STG * KC_LD];
    u32 vc[STG * KC_LD];
    u16 ks[STG * NG];
    u16 vs[STG * NG];
    u8 zk[STG * ZK_LD];
    u8 zv[STG * ZV_LD];
    float zs[STG * 2];
    uint2 cs[STG * CS_LD];
    __device__ u32 kw(int r, int w) const { return kc[r * KC_LD + w]; }
    __device__ u32 vw(int r, int w) const { return vc[r * KC_LD + w]; }
    __device__ u32 ks2(int r, int j) const { return *reinterpret_cast<const u32*>(ks + r * NG + j); }
    __device__ u32 vs2(int r, int j) const { return *reinterpret_cast<const u32*>(vs + r * NG + j); }
    __device__ u32 zk4(int r, int o) const { return *reinterpret_cast<const u32*>(zk + r * ZK_LD + o); }
    __device__ u16 zv2(int r, int o) const { return *reinterpret_cast<const u16*>(zv + r * ZV_LD + o); }
    __device__ float zsk(int r) const { return zs[2 * r]; }
    __device__ float zsv(int r) const { return zs[2 * r + 1]; }
    __device__ const uint2* csr(int r) const { return cs + r * CS_LD; }
};

__device__ __forceinline__ void cp16(void* dst, const void* src, int bytes) {
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp8(void* dst, const void* src, int bytes) {
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(d), "l"(src), "r"(bytes) : "memory");
}

// Copy tokens t .. t + STG of one batch row (its first row of the cache: rowbase; its positions: prow) into a stage,
// rows past C zero-filled, as one cp.async group.
__device__ __forceinline__ void issue_stage(StageRows& st, const u32* kc, const u32* vc, const u16* ks, const u16* vs,
                                            const u8* zk, const u8* zv, const float* zs, const uint2* cs,
                                            const int* prow, const int rowbase, const int t, const int C) {
    for (int k = threadIdx.x; k < STG * NG; k += blockDim.x) {  // code words: NG chunks a token
        const int tok = k / NG, part = k % NG;
        const bool ok = t + tok < C;
        const int row = rowbase + (ok ? t + tok : 0);
        cp16(st.kc + tok * KC_LD + 4 * part, kc + row * (NG * 4) + 4 * part, ok ? 16 : 0);
        cp16(st.vc + tok * KC_LD + 4 * part, vc + row * (NG * 4) + 4 * part, ok ? 16 : 0);
    }
    for (int k = threadIdx.x; k < STG * 16; k += blockDim.x) {  // RoPE rows at the tokens' positions: 16 chunks
        const int tok = k >> 4, part = k & 15;
        const bool ok = t + tok < C;
        cp16(st.cs + tok * CS_LD + 2 * part, cs + prow[ok ? t + tok : 0] * (HD / 4) + 2 * part, ok ? 16 : 0);
    }
    for (int k = threadIdx.x; k < STG * (NG / 8); k += blockDim.x) {  // scales: NG / 8 chunks a token
        const int tok = k / (NG / 8), part = k % (NG / 8);
        const bool ok = t + tok < C;
        const int row = rowbase + (ok ? t + tok : 0);
        cp16(st.ks + tok * NG + 8 * part, ks + row * NG + 8 * part, ok ? 16 : 0);
        cp16(st.vs + tok * NG + 8 * part, vs + row * NG + 8 * part, ok ? 16 : 0);
    }
    for (int k = threadIdx.x; k < STG * (RK / 16); k += blockDim.x) {
        const int tok = k / (RK / 16), part = k % (RK / 16);
        const bool ok = t + tok < C;
        const int row = rowbase + (ok ? t + tok : 0);
        cp16(st.zk + tok * ZK_LD + 16 * part, zk + (long)row * ZLD + 16 * part, ok ? 16 : 0);
    }
    for (int k = threadIdx.x; k < STG * (RV / 16); k += blockDim.x) {
        const int tok = k / (RV / 16), part = k % (RV / 16);
        const bool ok = t + tok < C;
        const int row = rowbase + (ok ? t + tok : 0);
        cp16(st.zv + tok * ZV_LD + 16 * part, zv + (long)row * ZLD + 16 * part, ok ? 16 : 0);
    }
    for (int k = threadIdx.x; k < STG; k += blockDim.x) {  // z scales: 8 bytes a token
        const bool ok = t + k < C;
        cp8(st.zs + 2 * k, zs + (rowbase + (ok ? t + k : 0)) * 2, ok ? 8 : 0);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Attention of this warp's query rows to 16 tokens: rows ra, rb (= tokens ta, ta + 8 of the batch row) of the key
// operands and of the scores S^T [16 tokens, 8 query rows]; rows rcol (tokens 2c, 2c+1, 8+2c, 9+2c of the block) of
// the value operands. vrow: the batch row's token validity (or null: all valid). The online-softmax state (per
// query row 2c, 2c+1) and accumulators are updated in place.
__device__ __forceinline__ void attend16(const StageRows& src, const int ra, const int rb, const int ta, const int (&rcol)[4],
                                         const int C, const u8* vrow, const int h, const int lane, const u32 (&qb)[8][2],
                                         const u32 (&qr)[8][2], const u32* s_ktab, const u32* s_vtab,
                                         const u8* up8t, const float* kbias, const float kup_scale,
                                         const float scale_log2, float (&m_i)[2], float (&l_i)[2],
                                         float (&oacc)[8][4], float (&pacc)[RV / 16][4]) {
    const int gid = lane >> 2, c = lane & 3;
    const float zka = src.zsk(ra) * kup_scale, zkb = src.zsk(rb) * kup_scale;
    const uint2* csa = src.csr(ra);
    const uint2* csb = src.csr(rb);
    u32 za[RK / 32][4];
#pragma unroll
    for (int s = 0; s < RK / 32; ++s) {
        za[s][0] = src.zk4(ra, 32 * s + 4 * c);
        za[s][1] = src.zk4(rb, 32 * s + 4 * c);
        za[s][2] = src.zk4(ra, 32 * s + 16 + 4 * c);
        za[s][3] = src.zk4(rb, 32 * s + 16 + 4 * c);
    }
    // this head's key code words (word c of each of its two groups) for rows a, b
    const u32 kwa0 = src.kw(ra, 8 * h + c), kwa1 = src.kw(ra, 8 * h + 4 + c);
    const u32 kwb0 = src.kw(rb, 8 * h + c), kwb1 = src.kw(rb, 8 * h + 4 + c);
    const u32 ksa = src.ks2(ra, 2 * h), ksb = src.ks2(rb, 2 * h);
    const float sa[2] = {h2f((u16)(ksa & 0xFFFF)), h2f((u16)(ksa >> 16))};
    const float sb[2] = {h2f((u16)(ksb & 0xFFFF)), h2f((u16)(ksb >> 16))};

    float s[4] = {0.f, 0.f, 0.f, 0.f};  // S^T: (token a | b) x (query rows 2c, 2c + 1)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float acc[4][4];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
            const int n = (jj < 2 ? 2 * i + jj : 8 + 2 * i + jj - 2);
            acc[jj][0] = acc[jj][1] = acc[jj][2] = acc[jj][3] = 0.f;
#if UPS
            const u32 row = (u32)__cvta_generic_to_shared(up8t + (h * HD + 8 * n + (lane & 7)) * UP_LD + 16 * (lane >> 3));
#pragma unroll
            for (int s4 = 0; s4 < RK / 64; ++s4) {
                u32 b0, b1, b2, b3;
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                             : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(row + 64 * s4));
                mma_e4m3(acc[jj], za[2 * s4][0], za[2 * s4][1], za[2 * s4][2], za[2 * s4][3], b0, b1);
                mma_e4m3(acc[jj], za[2 * s4 + 1][0], za[2 * s4 + 1][1], za[2 * s4 + 1][2], za[2 * s4 + 1][3], b2, b3);
            }
#else
            const u8* up = up8t + (h * HD + 8 * n + gid) * UP_LD + 4 * c;
#pragma unroll
            for (int s2 = 0; s2 < RK / 32; ++s2)
                mma_e4m3(acc[jj], za[s2][0], za[s2][1], za[s2][2], za[s2][3], ldu32(up + 32 * s2),
                         ldu32(up + 32 * s2 + 16));
#endif
            const float2 bias = *reinterpret_cast<const float2*>(kbias + h * HD + 8 * n + 2 * c);
            acc[jj][0] = fmaf(acc[jj][0], zka, bias.x);
            acc[jj][1] = fmaf(acc[jj][1], zka, bias.y);
            acc[jj][2] = fmaf(acc[jj][2], zkb, bias.x);
            acc[jj][3] = fmaf(acc[jj][3], zkb, bias.y);
        }
        // RoPE in bf16 on (dim d, d + 64) pairs: the results are the scores' A operands (rows = tokens) directly
        u32 lo[2][2], hi[2][2];  // [jj][row a/b]
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
            const int fp = 4 * (2 * i + jj) + c;  // frequency pair of dims 8n + 2c, 8n + 2c + 1
            const uint2 ca = csa[fp], cb = csb[fp];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const uint2 cr = r ? cb : ca;
                const u32 kl = pack_bf16(acc[jj][2 * r], acc[jj][2 * r + 1]);
                const u32 kh = pack_bf16(acc[jj + 2][2 * r], acc[jj + 2][2 * r + 1]);
                const u32 nsin = cr.y ^ 0x80008000u;
                lo[jj][r] = fma_bf16x2(kh, nsin, fma_bf16x2(kl, cr.x, 0x80008000u));
                hi[jj][r] = fma_bf16x2(kl, cr.y, fma_bf16x2(kh, cr.x, 0x80008000u));
            }
        }
        mma_bf16(s, lo[0][0], lo[0][1], lo[1][0], lo[1][1], qb[i][0], qb[i][1]);
        mma_bf16(s, hi[0][0], hi[0][1], hi[1][0], hi[1][1], qb[4 + i][0], qb[4 + i][1]);
    }

    // residual scores in the rotated space, per group, times each token's scale
#pragma unroll
    for (int g = 0; g < 2; ++g) {
        const u32 wa = g ? kwa1 : kwa0, wb = g ? kwb1 : kwb0;
        float sr[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kb = 0; kb < 4; ++kb)
            mma_f16(sr, s_ktab[(wa >> (8 * kb)) & 15], s_ktab[(wb >> (8 * kb)) & 15], s_ktab[(wa >> (8 * kb + 4)) & 15],
                    s_ktab[(wb >> (8 * kb + 4)) & 15], qr[4 * g + kb][0], qr[4 * g + kb][1]);
        s[0] = fmaf(sr[0], sa[g], s[0]);
        s[1] = fmaf(sr[1], sa[g], s[1]);
        s[2] = fmaf(sr[2], sb[g], s[2]);
        s[3] = fmaf(sr[3], sb[g], s[3]);
    }

    // online softmax down the columns (query rows 2c, 2c + 1) over this block's 16 tokens (rows)
    const bool va = ta < C && (vrow == nullptr || vrow[ta]), vb = ta + 8 < C && (vrow == nullptr || vrow[ta + 8]);
    float sv[4] = {va ? s[0] * scale_log2 : NEG_INF, va ? s[1] * scale_log2 : NEG_INF,
                   vb ? s[2] * scale_log2 : NEG_INF, vb ? s[3] * scale_log2 : NEG_INF};
    float p[4];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        float mx = fmaxf(sv[e], sv[e + 2]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float m_new = fmaxf(m_i[e], mx);
        const float alpha = ex2(m_i[e] - m_new);
        p[e] = ex2(sv[e] - m_new);
        p[e + 2] = ex2(sv[e + 2] - m_new);
        l_i[e] = l_i[e] * alpha + p[e] + p[e + 2];
        m_i[e] = m_new;
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            oacc[m][e] *= alpha;
            oacc[m][e + 2] *= alpha;
        }
#pragma unroll
        for (int m = 0; m < RV / 16; ++m) {
            pacc[m][e] *= alpha;
            pacc[m][e + 2] *= alpha;
        }
    }

    // P^T operands (k = tokens, n = query heads): P times the value scale of each group / z^V's scale (x 256, in
    // f16's normal range), transposed from the rows-are-tokens layout (movmatrix)
    u32 pv[2][2], pz[2];
    {
        const u32 vsa = src.vs2(ra, 2 * h), vsb = src.vs2(rb, 2 * h);
        const float zsa = src.zsv(ra) * 256.f, zsb = src.zsv(rb) * 256.f;
#pragma unroll
        for (int g = 0; g < 2; ++g) {
            const float s0 = h2f((u16)(vsa >> (16 * g))), s1 = h2f((u16)(vsb >> (16 * g)));
            pv[g][0] = trans8x8(pack_f16(p[0] * s0, p[1] * s0));
            pv[g][1] = trans8x8(pack_f16(p[2] * s1, p[3] * s1));
        }
        pz[0] = trans8x8(pack_f16(p[0] * zsa, p[1] * zsa));
        pz[1] = trans8x8(pack_f16(p[2] * zsb, p[3] * zsb));
    }

    // values in the rotated space: m-tile m = dims 16m + 2 gid (row gid) and + 1 (row gid + 8)
    u32 vw[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) vw[e] = src.vw(rcol[e], 8 * h + gid);
#pragma unroll
    for (int m = 0; m < 8; ++m) {
        const int sh = 4 * m;  // nibble (4 * group + m % 4) = m
        const u32 L0 = s_vtab[(vw[0] >> sh) & 15], L1 = s_vtab[(vw[1] >> sh) & 15];
        const u32 L2 = s_vtab[(vw[2] >> sh) & 15], L3 = s_vtab[(vw[3] >> sh) & 15];
        mma_f16(oacc[m], __byte_perm(L0, L1, 0x5410), __byte_perm(L0, L1, 0x7632), __byte_perm(L2, L3, 0x5410),
                __byte_perm(L2, L3, 0x7632), pv[m >> 2][0], pv[m >> 2][1]);
    }
    // value latents: m-tile m = latents 16m + 2 gid, + 1
#pragma unroll
    for (int m = 0; m < RV / 16; ++m) {
        u32 Z[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) Z[e] = e4m3x2_to_f16x2(src.zv2(rcol[e], 16 * m + 2 * gid));
        mma_f16(pacc[m], __byte_perm(Z[0], Z[1], 0x5410), __byte_perm(Z[0], Z[1], 0x7632),
                __byte_perm(Z[2], Z[3], 0x5410), __byte_perm(Z[2], Z[3], 0x7632), pz[0], pz[1]);
    }
}

extern "C" __global__ void __launch_bounds__(NH * 32, MINB) aquakv_decode_mma(
    const u16* __restrict__ q,      // bf16 [B, NH, rows, HD]: the query rows of each KV head
    const u16* __restrict__ qrot,   // f16 [B, NH, rows, HD]: per group q_g @ S_g / GS (S: the key residual's rotation)
    const u32* __restrict__ kc,     // [B*C, NG*4] key code words (4 per group of 64, kernel order)
    const u16* __restrict__ ks,     // f16 [B*C, NG] key scales
    const u32* __restrict__ vc,     // [B*C, NG*4] value code words (8 per head, kernel order)
    const u16* __restrict__ vs,     // f16 [B*C, NG] value scales
    const u8* __restrict__ zk,      // e4m3 z^K: RK bytes at the start of each token's ZLD
    const u8* __restrict__ zv,      // e4m3 z^V: RV bytes at the start of each token's ZLD
    const float* __restrict__ zs,   // [B*C, 2] scales of z^K, z^V
    const u8* __restrict__ up8t,    // e4m3 [DM, RK]: the key predictor's up^T (K-major)
    const float* __restrict__ kbias,  // [DM]
    const u32* __restrict__ ktab,   // [16] f16x2 key grid points
    const u32* __restrict__ vtab,   // [16] f16x2 value grid points
    const uint2* __restrict__ cs,   // [positions, HD/4] (bf16x2 cos of freqs 2j, 2j+1 | bf16x2 sin)
    const int* __restrict__ pos,    // positions of the tokens: batch row b's at pos + b * pstride
    const u8* __restrict__ valid,   // token validity: batch row b's at valid + b * vstride (has_valid)
    float* __restrict__ orot,       // [B, NH, rows, NT, HD] normalized per tile, values still rotated
    float* __restrict__ pzo,        // [B, NH, rows, NT, RV]
    float* __restrict__ lse,        // [B, NH, rows, NT] natural log
    int C, int NT, int BT, int rows, int pstride, int has_valid, int vstride, double kup_scale_d, double scale_log2_d) {
    const int lane = threadIdx.x & 31, h = threadIdx.x >> 5, gid = lane >> 2, c = lane & 3;
    const int b = blockIdx.y, tile = blockIdx.x;
    const float kup_scale = (float)kup_scale_d, scale_log2 = (float)scale_log2_d;
    const int rowbase = b * C;
    const int* prow = pos + (long)b * pstride;
    const u8* vrow = has_valid ? valid + (long)b * vstride : nullptr;

    __shared__ u32 s_ktab[16], s_vtab[16];
    if (threadIdx.x < 16) s_ktab[threadIdx.x] = ktab[threadIdx.x];
    else if (threadIdx.x < 32) s_vtab[threadIdx.x - 16] = vtab[threadIdx.x - 16];

    // query fragments (rows of this KV head; fragment rows >= rows are zero)
    u32 qa[8][2];
    u32 qr[8][2];
#pragma unroll
    for (int kb = 0; kb < 8; ++kb) {
        const long o = (((long)b * NH + h) * rows + gid) * HD + 16 * kb + 2 * c;
        const bool on = gid < rows;
        qa[kb][0] = on ? ld32(q + o) : 0u;
        qa[kb][1] = on ? ld32(q + o + 8) : 0u;
        qr[kb][0] = on ? ld32(qrot + o) : 0u;
        qr[kb][1] = on ? ld32(qrot + o + 8) : 0u;
    }

    float m_i[2] = {NEG_INF, NEG_INF}, l_i[2] = {0.f, 0.f};  // query rows 2c, 2c + 1
    float oacc[8][4];
    float pacc[RV / 16][4];
#pragma unroll
    for (int m = 0; m < 8; ++m) oacc[m][0] = oacc[m][1] = oacc[m][2] = oacc[m][3] = 0.f;
#pragma unroll
    for (int m = 0; m < RV / 16; ++m) pacc[m][0] = pacc[m][1] = pacc[m][2] = pacc[m][3] = 0.f;

    const int tbeg = tile * BT, tend = min(tile * BT + BT, C);
    // stages of STG tokens copied to shared memory asynchronously (cp.async), the next while this one is attended
    extern __shared__ __align__(16) unsigned char dyn[];
    StageRows* stage = reinterpret_cast<StageRows*>(dyn);
#if UPS
    u8* s_up = dyn + 2 * sizeof(StageRows);
    float* s_kbias = reinterpret_cast<float*>(s_up + DM * UP_LD);
    for (int k = threadIdx.x; k < DM * (RK / 16); k += blockDim.x)
        cp16(s_up + (k / (RK / 16)) * UP_LD + 16 * (k % (RK / 16)), up8t + (k / (RK / 16)) * RK + 16 * (k % (RK / 16)), 16);
    for (int k = threadIdx.x; k < DM / 4; k += blockDim.x) cp16(s_kbias + 4 * k, kbias + 4 * k, 16);
#define UP_SRC s_up
#define KB_SRC s_kbias
#else
#define UP_SRC up8t
#define KB_SRC kbias
#endif
    const int nst = (tend - tbeg + STG - 1) / STG;
    issue_stage(stage[0], kc, vc, ks, vs, zk, zv, zs, cs, prow, rowbase, tbeg, C);
    for (int st = 0; st < nst; ++st) {
        if (st + 1 < nst) {
            issue_stage(stage[(st + 1) & 1], kc, vc, ks, vs, zk, zv, zs, cs, prow, rowbase, tbeg + (st + 1) * STG, C);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        const StageRows& sr = stage[st & 1];
        const int s0 = tbeg + st * STG;
#pragma unroll 1
        for (int j = 0; j < STG && s0 + j < C; j += 16) {
            int rcol[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) rcol[e] = j + (e >> 1) * 8 + 2 * c + (e & 1);
            attend16(sr, j + gid, j + gid + 8, s0 + j + gid, rcol, C, vrow, h, lane, qa, qr, s_ktab, s_vtab, UP_SRC,
                     KB_SRC, kup_scale, scale_log2, m_i, l_i, oacc, pacc);
        }
        __syncthreads();
    }

    // epilogue: each query row's sum down its column; columns 2c, 2c + 1 (those < rows written)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        l_i[e] += __shfl_xor_sync(0xffffffffu, l_i[e], 4);
        l_i[e] += __shfl_xor_sync(0xffffffffu, l_i[e], 8);
        l_i[e] += __shfl_xor_sync(0xffffffffu, l_i[e], 16);
    }
    const float inv[2] = {l_i[0] > 0.f ? 1.f / l_i[0] : 0.f, l_i[1] > 0.f ? 1.f / l_i[1] : 0.f};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int col = 2 * c + e;
        if (col >= rows) continue;
        const long r = ((long)b * NH + h) * rows + col;
        float* o = orot + (r * NT + tile) * HD;
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            o[16 * m + 2 * gid] = oacc[m][e] * inv[e];
            o[16 * m + 2 * gid + 1] = oacc[m][e + 2] * inv[e];
        }
        float* z = pzo + (r * NT + tile) * RV;
        const float zi = inv[e] * (1.f / 256);
#pragma unroll
        for (int m = 0; m < RV / 16; ++m) {
            z[16 * m + 2 * gid] = pacc[m][e] * zi;
            z[16 * m + 2 * gid + 1] = pacc[m][e + 2] * zi;
        }
        if (gid == 0) lse[r * NT + tile] = l_i[e] > 0.f ? (m_i[e] + __log2f(l_i[e])) * 0.6931471805599453f : NEG_INF;
    }
}

// The tiles' merge: one CTA per KV head, batch row and query row; MS slices of HD threads, slice s summing tiles
// s, s + MS, ... for output dim d. The softmax weights of the tiles come from their log-sum-exps; then the weighted
// sums of the rotated outputs and of the latent sums, the values' un-rotation (S_V^T / 64 per group of 64), the value
// predictor's term (P z^V) up^V and its bias. Dynamic shared memory: NT floats (the tiles' weights).
#define MS 4
__device__ __forceinline__ float block_reduce(float v, float* s_red, const bool is_max) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = s_red[0];
#pragma unroll
    for (int w = 1; w < MS * HD / 32; ++w) v = is_max ? fmaxf(v, s_red[w]) : v + s_red[w];
    __syncthreads();
    return v;
}

extern "C" __global__ void __launch_bounds__(MS * HD) aquakv_decode_merge(
    const float* __restrict__ orot,   // [B, NH, rows, NT, HD]
    const float* __restrict__ pzo,    // [B, NH, rows, NT, RV]
    const float* __restrict__ lse,    // [B, NH, rows, NT]
    const float* __restrict__ unrot,  // [64, 64]: S_V^T / 64
    const float* __restrict__ upv,    // [RV, DM]: the value predictor's up
    const float* __restrict__ vbias,  // [DM]
    float* __restrict__ out,          // [B, NH, rows, HD]
    float* __restrict__ lse_out,      // [B, NH, rows]
    int NT, int rows) {
    const int h = blockIdx.x, b = blockIdx.y, r = blockIdx.z;
    const int tid = threadIdx.x, d = tid % HD, sl = tid / HD;
    extern __shared__ float s_w[];
    __shared__ float s_o[MS][HD], s_z[MS][RV], s_red[MS * HD / 32];
    const long row = ((long)b * NH + h) * rows + r;
    const float* l = lse + row * NT;
    float m = NEG_INF;
    for (int t = tid; t < NT; t += MS * HD) m = fmaxf(m, l[t]);
    m = block_reduce(m, s_red, true);
    float sum = 0.f;
    for (int t = tid; t < NT; t += MS * HD) {
        const float w = m == NEG_INF ? 0.f : __expf(l[t] - m);
        s_w[t] = w;
        sum += w;
    }
    sum = block_reduce(sum, s_red, false);  // (its barriers also publish s_w)
    float o = 0.f;
#pragma unroll 4
    for (int t = sl; t < NT; t += MS) o = fmaf(s_w[t], orot[(row * NT + t) * HD + d], o);
    s_o[sl][d] = o;
    if (d < RV) {
        float z = 0.f;
#pragma unroll 4
        for (int t = sl; t < NT; t += MS) z = fmaf(s_w[t], pzo[(row * NT + t) * RV + d], z);
        s_z[sl][d] = z;
    }
    __syncthreads();
    if (sl == 0) {
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
        for (int k = 1; k < MS; ++k) {
            s_o[0][d] += s_o[k][d];
            if (d < RV) s_z[0][d] += s_z[k][d];
        }
        s_o[0][d] *= inv;
        if (d < RV) s_z[0][d] *= inv;
    }
    __syncthreads();
    if (sl == 0) {
        const int g = d & ~63, j = d & 63;
        float v = vbias[h * HD + d];
#pragma unroll 8
        for (int k = 0; k < 64; ++k) v = fmaf(s_o[0][g + k], unrot[k * 64 + j], v);
#pragma unroll 8
        for (int k = 0; k < RV; ++k) v = fmaf(s_z[0][k], upv[(long)k * DM + h * HD + d], v);
        out[row * HD + d] = v;
        if (d == 0) lse_out[row] = m == NEG_INF ? NEG_INF : m + __logf(sum);
    }
}
