/* Merge kernels for the CPU, built and called by evomerge/kernels/native.py: topk_merge (below), count_ties,
 * observe_brackets, ta_merge and histogram_keys (each described where it is defined).
 *
 * topk_merge: top-k (TIES) merging of one tensor in a single pass over its inputs.
 *
 * Inputs are the flat sources x_1..x_m and the base b (float32, bfloat16 or float16 each). For every
 * entry: t_i = x_i - b; keep t_i when |t_i| > thr_i, or when |t_i| == thr_i and fewer than wanted_i
 * earlier entries (counting from seen_i) equalled thr_i: the lowest positions win ties, so exactly k_i
 * entries are kept. Then t_i *= w_i, and with sign election: elected = sign(sum_i t_i) (0 counts as +),
 * out = sum of the t_i agreeing with it, divided by the sum of their w_i when normalizing (a zero sum
 * divides by 1); without: out = sum_i t_i / divisor. Finally b + lam * out, and depth scaling
 * (r - b) * scale + b when scale_on. The arithmetic is the fused kernels' (kernels/fused.py pipe_body),
 * in the same order and in float32 without contraction, so results agree with them bit for bit. A
 * NaN or inf input yields a NaN or inf result (it is multiplied, never selected away); the return
 * value says where the first non-finite result is.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLK 256 /* entries per block: every stage of a block works in L1-resident float32 buffers */

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void load(const void* p, int32_t dt, int64_t s, int64_t len, float* restrict dst) {
    if (dt == F32) {
        memcpy(dst, (const float*)p + s, (size_t)len * 4);
    } else if (dt == BF16) {
        const uint16_t* restrict q = (const uint16_t*)p + s;
        for (int64_t j = 0; j < len; j++) dst[j] = from_bf16(q[j]);
    } else {
        const _Float16* restrict q = (const _Float16*)p + s;
        for (int64_t j = 0; j < len; j++) dst[j] = (float)q[j];
    }
}

enum { RAW, COUNT, ABOVE, AT_LEAST };

/* t = x - b over [s, s + len), then by mode: RAW leaves it; COUNT also returns how many |t| equal th;
 * ABOVE and AT_LEAST sparsify and weight: t *= w where |t| > th (>= th), else 0 */
#define DELTA_LOOP(LOAD)                                                                     \
    if (mode == RAW) {                                                                       \
        for (int64_t j = 0; j < len; j++) t[j] = LOAD - b[j];                                \
    } else if (mode == COUNT) {                                                              \
        for (int64_t j = 0; j < len; j++) {                                                  \
            const float d = LOAD - b[j];                                                     \
            t[j] = d;                                                                        \
            c += fabsf(d) == th ? 1 : 0;                                                     \
        }                                                                                    \
    } else if (mode == ABOVE) {                                                              \
        for (int64_t j = 0; j < len; j++) {                                                  \
            const float d = LOAD - b[j];                                                     \
            t[j] = d * (fabsf(d) > th ? w : 0.0f);                                           \
        }                                                                                    \
    } else {                                                                                 \
        for (int64_t j = 0; j < len; j++) {                                                  \
            const float d = LOAD - b[j];                                                     \
            t[j] = d * (fabsf(d) >= th ? w : 0.0f);                                          \
        }                                                                                    \
    }

static inline int32_t delta(const void* p, int32_t dt, int64_t s, int64_t len, const float* restrict b,
                            float* restrict t, float th, float w, int mode) {
    int32_t c = 0;
    if (dt == BF16) {
        const uint16_t* restrict q = (const uint16_t*)p + s;
        DELTA_LOOP(from_bf16(q[j]))
    } else if (dt == F32) {
        const float* restrict q = (const float*)p + s;
        DELTA_LOOP(q[j])
    } else {
        const _Float16* restrict q = (const _Float16*)p + s;
        DELTA_LOOP((float)q[j])
    }
    return c;
}

/* round to nearest even, NaN to the canonical quiet NaN: torch's float -> bfloat16 */
static inline void store(void* p, int32_t dt, int64_t s, int64_t len, const float* restrict src) {
    if (dt == F32) {
        memcpy((float*)p + s, src, (size_t)len * 4);
    } else if (dt == BF16) {
        uint16_t* restrict q = (uint16_t*)p + s;
        for (int64_t j = 0; j < len; j++) {
            uint32_t u;
            memcpy(&u, &src[j], 4);
            uint32_t r = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16;
            q[j] = src[j] != src[j] ? (uint16_t)0x7FC0 : (uint16_t)r;
        }
    } else {
        _Float16* restrict q = (_Float16*)p + s;
        for (int64_t j = 0; j < len; j++) q[j] = (_Float16)src[j];
    }
}

/* the combining stage of one block for M models (a constant where inlined, so the model loop unrolls) */
static inline __attribute__((always_inline)) int32_t combine(const int M, int64_t len, const float* restrict ts,
                                                             const float* restrict b, float* restrict r,
                                                             const float* restrict w, const float* restrict fp,
                                                             int sign) {
    const float lam = fp[0], divisor = fp[1], scale = fp[2], scale_on = fp[3], normalize = fp[4];
    int32_t bad = 0;
    for (int64_t j = 0; j < len; j++) {
        float out;
        if (sign) {
            float total = ts[j];
            for (int i = 1; i < M; i++) total = total + ts[i * BLK + j];
            const float elected = total >= 0.0f ? 1.0f : -1.0f;
            float agree = ts[j] * elected > 0.0f ? 1.0f : 0.0f;
            out = ts[j] * agree;
            float d = agree * w[0];
            for (int i = 1; i < M; i++) {
                agree = ts[i * BLK + j] * elected > 0.0f ? 1.0f : 0.0f;
                out = out + ts[i * BLK + j] * agree;
                d = d + agree * w[i];
            }
            d = d == 0.0f ? 1.0f : d;
            out = normalize != 0.0f ? out / d : out;
        } else {
            out = ts[j];
            for (int i = 1; i < M; i++) out = out + ts[i * BLK + j];
            out = out / divisor;
        }
        float v = b[j] + lam * out;
        v = scale_on != 0.0f ? (v - b[j]) * scale + b[j] : v;
        bad += (v - v) != 0.0f ? 1 : 0; /* inf - inf and NaN - NaN are NaN */
        r[j] = v;
    }
    return bad;
}

/* 1 + the lowest position s + j of a non-finite r[j] in a block starting at s, or ``first`` if that is lower */
static int64_t first_nonfinite(const float* r, int64_t len, int64_t s, int64_t first) {
    for (int64_t j = 0; j < len && (!first || s + j + 1 < first); j++)
        if ((r[j] - r[j]) != 0.0f) return s + j + 1; /* inf - inf and NaN - NaN are NaN */
    return first;
}

/* Merge entries [0, n) of the m sources xs[0..m-1] over the base xs[m] into out. fp = [lam, divisor,
 * scale, scale_on, normalize]; per model: w, thr, wanted and seen (in and out). Forward: ties are kept
 * while fewer than wanted[i] were seen, counting from seen[i] (the ties before entry 0). Backward (the
 * last range of a tensor, walked from its end): ties are dropped while fewer than wanted[i] were, counting
 * from seen[i]: wanted[i] is how many of the tensor's ties lie past the last kept one. Returns 1 + the
 * position of the first non-finite result, 0 if all are finite, -1 if out of memory. */
int64_t topk_merge(int64_t n, int32_t m, const void* const* xs, const int32_t* dts, void* out, int32_t out_dt,
                   const float* fp, const float* w, const float* thr, const int64_t* wanted, int64_t* seen,
                   int32_t sign, int32_t backward) {
    float* buf = malloc(sizeof(float) * BLK * (size_t)(m + 2));
    if (!buf) return -1;
    float *b = buf + (size_t)m * BLK, *r = b + BLK;
    int64_t first = 0;
    const int64_t blocks = (n + BLK - 1) / BLK;
    for (int64_t q = 0; q < blocks; q++) {
        const int64_t s = (backward ? blocks - 1 - q : q) * BLK;
        const int64_t len = n - s < BLK ? n - s : BLK;
        load(xs[m], dts[m], s, len, b);
        for (int i = 0; i < m; i++) {
            float* restrict t = buf + (size_t)i * BLK;
            const float th = thr[i], wi = w[i];
            if (seen[i] >= wanted[i]) { /* forward: every tie to keep is behind; backward: every one to drop */
                delta(xs[i], dts[i], s, len, b, t, th, wi, backward ? AT_LEAST : ABOVE);
                continue;
            }
            const int32_t ties = delta(xs[i], dts[i], s, len, b, t, th, wi, COUNT);
            if (seen[i] + ties <= wanted[i]) { /* every tie of the block is kept (forward) or dropped */
                const int keep_ties = !backward;
                for (int64_t j = 0; j < len; j++) {
                    const float a = fabsf(t[j]);
                    t[j] = t[j] * ((keep_ties ? a >= th : a > th) ? wi : 0.0f);
                }
                seen[i] += ties;
            } else { /* the kept ties stop in this block */
                int64_t k = seen[i];
                for (int64_t jj = 0; jj < len; jj++) {
                    const int64_t j = backward ? len - 1 - jj : jj;
                    const float a = fabsf(t[j]);
                    int keep = a > th;
                    if (a == th && backward) { /* dropped while fewer than wanted were */
                        keep = k >= wanted[i];
                        k += !keep;
                    } else if (a == th) { /* kept while fewer than wanted were */
                        keep = k++ < wanted[i];
                    }
                    t[j] = t[j] * (keep ? wi : 0.0f);
                }
                seen[i] = k;
            }
        }
        int32_t bad;
        switch (m) {
            case 1: bad = combine(1, len, buf, b, r, w, fp, sign); break;
            case 2: bad = combine(2, len, buf, b, r, w, fp, sign); break;
            case 3: bad = combine(3, len, buf, b, r, w, fp, sign); break;
            case 4: bad = combine(4, len, buf, b, r, w, fp, sign); break;
            default: bad = combine(m, len, buf, b, r, w, fp, sign); break;
        }
        if (bad) first = first_nonfinite(r, len, s, first);
        store(out, out_dt, s, len, r);
    }
    free(buf);
    return first;
}

/* For each model i with wanted[i] > 0: how many entries of [0, n) have |x_i - b| == thr[i], into ties[i]
 * (what a later range's merge must know of the ties before it). Returns -1 if out of memory, else 0. */
int64_t count_ties(int64_t n, int32_t m, const void* const* xs, const int32_t* dts, const float* thr,
                   const int64_t* wanted, int64_t* ties) {
    float* buf = malloc(sizeof(float) * BLK * 2);
    if (!buf) return -1;
    float *b = buf, *t = buf + BLK;
    for (int i = 0; i < m; i++) ties[i] = 0;
    for (int64_t s = 0; s < n; s += BLK) {
        const int64_t len = n - s < BLK ? n - s : BLK;
        load(xs[m], dts[m], s, len, b);
        for (int i = 0; i < m; i++)
            if (wanted[i] > 0) ties[i] += delta(xs[i], dts[i], s, len, b, t, thr[i], 1.0f, COUNT);
    }
    free(buf);
    return 0;
}

/* The counting pass of brackets (kernels/bracket.py) for S selections: selection s orders |x_owner[s] - b|
 * against its bracket [lo[s], hi[s]]: counts[4s .. 4s+3] = how many lie above hi, equal hi, equal lo, below
 * lo; the positions and values of those strictly inside go to pos[s] and val[s], which have room for
 * cap[s] entries, and found[s] says how many there were (at least cap[s]: call again with found[s] + 1 of
 * room; a block's writes may reach one entry past its last one inside). Returns -1 if out of memory,
 * else 0. */
int64_t observe_brackets(int64_t n, int32_t m, const void* const* xs, const int32_t* dts, int32_t S,
                         const int32_t* owner, const float* lo, const float* hi, int64_t* counts,
                         int64_t* const* pos, float* const* val, const int64_t* cap, int64_t* found) {
    float* buf = malloc(sizeof(float) * BLK * 2);
    if (!buf) return -1;
    float *b = buf, *t = buf + BLK;
    for (int s = 0; s < S; s++) {
        found[s] = 0;
        for (int c = 0; c < 4; c++) counts[4 * s + c] = 0;
    }
    for (int64_t s0 = 0; s0 < n; s0 += BLK) {
        const int64_t len = n - s0 < BLK ? n - s0 : BLK;
        load(xs[m], dts[m], s0, len, b);
        for (int s = 0; s < S; s++) {
            const int i = owner[s];
            delta(xs[i], dts[i], s0, len, b, t, 0.0f, 1.0f, RAW);
            const float l = lo[s], h = hi[s];
            int32_t above = 0, at_hi = 0, at_lo = 0, below = 0, inside = 0;
            for (int64_t j = 0; j < len; j++) {
                const float v = fabsf(t[j]);
                above += v > h ? 1 : 0;
                at_hi += v == h ? 1 : 0;
                at_lo += v == l ? 1 : 0;
                below += v < l ? 1 : 0;
                inside += (v > l) & (v < h) ? 1 : 0;
            }
            counts[4 * s] += above;
            counts[4 * s + 1] += at_hi;
            counts[4 * s + 2] += at_lo;
            counts[4 * s + 3] += below;
            if (inside && found[s] + inside < cap[s]) { /* room for every write below, one past the last too */
                int64_t f = found[s];
                int64_t* restrict p = pos[s];
                float* restrict q = val[s];
                for (int64_t j = 0; j < len; j++) { /* branch-free: write each entry, advance past those inside */
                    const float v = fabsf(t[j]);
                    p[f] = s0 + j;
                    q[f] = v;
                    f += (v > l) & (v < h);
                }
            }
            found[s] += inside; /* more than cap[s]: the caller makes room and calls again */
        }
    }
    free(buf);
    return 0;
}

/* Task arithmetic in one pass, as fused.ta_body computes it: r = b * coef[0], then r = r + x_i * coef[1 + i]
 * for each source, then (r - b) * scale + b when scale_on. Returns 1 + the position of the first
 * non-finite result, 0 if all are finite, -1 if out of memory. */
int64_t ta_merge(int64_t n, int32_t m, const void* const* xs, const int32_t* dts, void* out, int32_t out_dt,
                 const float* coef, float scale, int32_t scale_on) {
    float* buf = malloc(sizeof(float) * BLK * 2);
    if (!buf) return -1;
    float *b = buf, *r = buf + BLK;
    int64_t first = 0;
    for (int64_t s = 0; s < n; s += BLK) {
        const int64_t len = n - s < BLK ? n - s : BLK;
        load(xs[m], dts[m], s, len, b);
        const float c0 = coef[0];
        for (int64_t j = 0; j < len; j++) r[j] = b[j] * c0;
        for (int i = 0; i < m; i++) {
            const float c = coef[1 + i];
            if (dts[i] == BF16) {
                const uint16_t* restrict q = (const uint16_t*)xs[i] + s;
                for (int64_t j = 0; j < len; j++) r[j] = r[j] + from_bf16(q[j]) * c;
            } else if (dts[i] == F32) {
                const float* restrict q = (const float*)xs[i] + s;
                for (int64_t j = 0; j < len; j++) r[j] = r[j] + q[j] * c;
            } else {
                const _Float16* restrict q = (const _Float16*)xs[i] + s;
                for (int64_t j = 0; j < len; j++) r[j] = r[j] + (float)q[j] * c;
            }
        }
        if (scale_on)
            for (int64_t j = 0; j < len; j++) r[j] = (r[j] - b[j]) * scale + b[j];
        int32_t bad = 0;
        for (int64_t j = 0; j < len; j++) bad += (r[j] - r[j]) != 0.0f ? 1 : 0; /* inf - inf and NaN are NaN */
        if (bad) first = first_nonfinite(r, len, s, first);
        store(out, out_dt, s, len, r);
    }
    free(buf);
    return first;
}

/* Histogram keys (kernels/histogram.py) of v = |x_owner[s] - b| (NaN as +inf) for S sources over [0, n):
 * keys[s][j] = the top 16 bits of v's float32 pattern, marks[s][j] = 0x4000 where the low 16 bits are not
 * all 0 (v is not a bfloat16 value: "impure") and 0 elsewhere; impure[s] counts those, largest[s] is the
 * largest v. Returns -1 if out of memory, else 0. */
int64_t histogram_keys(int64_t n, int32_t m, const void* const* xs, const int32_t* dts, int32_t S,
                       const int32_t* owner, int16_t* const* keys, int16_t* const* marks, int64_t* impure,
                       float* largest) {
    float* buf = malloc(sizeof(float) * BLK * 2);
    if (!buf) return -1;
    float *b = buf, *t = buf + BLK;
    uint32_t top[64];
    for (int s = 0; s < S && s < 64; s++) top[s] = 0, impure[s] = 0;
    for (int64_t s0 = 0; s0 < n; s0 += BLK) {
        const int64_t len = n - s0 < BLK ? n - s0 : BLK;
        load(xs[m], dts[m], s0, len, b);
        for (int s = 0; s < S && s < 64; s++) {
            const int i = owner[s];
            delta(xs[i], dts[i], s0, len, b, t, 0.0f, 1.0f, RAW);
            int16_t* restrict k = keys[s] + s0;
            int16_t* restrict mk = marks[s] + s0;
            uint32_t hi = top[s];
            int32_t inexact = 0;
            for (int64_t j = 0; j < len; j++) {
                float v = fabsf(t[j]);
                v = v != v ? INFINITY : v;
                uint32_t u;
                memcpy(&u, &v, 4);
                k[j] = (int16_t)(u >> 16);
                const int low = (u & 0xFFFFu) != 0;
                mk[j] = low ? (int16_t)0x4000 : (int16_t)0;
                inexact += low;
                hi = u > hi ? u : hi; /* non-negative floats order as their patterns */
            }
            top[s] = hi;
            impure[s] += inexact;
        }
    }
    for (int s = 0; s < S && s < 64; s++) memcpy(&largest[s], &top[s], 4);
    free(buf);
    return 0;
}
