/* Batch-1 (and few-row) matrix-vector kernels for the CPU decode step, AVX2 + FMA.

   y[m, n] = sum_k x[m, k] * W[n, k] for x fp32 [M, K] and W stored as fp32, bf16, int8 (group-wise scale) or
   int4 (group-wise scale and offset; x quantized to int8 blocks first, as llama.cpp does); `dequant_*` expand the codes for the many-row (prefill) path. Rows of W
   are split across OpenMP threads (PyTorch's own OpenMP runtime, so torch.set_num_threads applies); each thread
   streams its rows once from memory and reuses them, from L1, for every row of x. Every output is computed the
   same way whatever M is (batch invariant). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 load_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } c = { (uint32_t)h << 16 };
    return c.f;
}

#define ROWS 4

/* Dense weights. Every output is one accumulator over k in steps of 8, its horizontal sum, then the scalar
   tail: the same operations in the same order on every path, so a row's result does not depend on M. Rows of
   W go in blocks of 4 and rows of x in pairs, so a k step loads 4 weight vectors and 2 activation vectors for 8
   FMAs (few-row batches cost little more than one row). */
#define DENSE_GEMV(NAME, WTYPE, LOAD_W, TO_F32)                                                            \
void NAME(const float *x, const WTYPE *w, float *y, int M, int N, int K) {                                 \
    const int K8 = K - K % 8;                                                                              \
    _Pragma("omp parallel for schedule(static)")                                                           \
    for (int n = 0; n < N; n += ROWS) {                                                                    \
        const int rows = N - n < ROWS ? N - n : ROWS;                                                      \
        const WTYPE *wr[ROWS];                                                                             \
        for (int r = 0; r < ROWS; r++) wr[r] = w + (int64_t)(n + (r < rows ? r : 0)) * K;                  \
        int m = 0;                                                                                         \
        for (; m + 2 <= M; m += 2) {                                                                       \
            const float *xa = x + (int64_t)m * K, *xb = xa + K;                                            \
            __m256 acc[ROWS][2];                                                                           \
            for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                    \
            for (int k = 0; k < K8; k += 8) {                                                              \
                __m256 va = _mm256_loadu_ps(xa + k), vb = _mm256_loadu_ps(xb + k);                         \
                for (int r = 0; r < ROWS; r++) {                                                           \
                    __m256 wv = LOAD_W(wr[r] + k);                                                         \
                    _mm_prefetch((const char *)(wr[r] + (int64_t)ROWS * K + k), _MM_HINT_T0);             \
                    acc[r][0] = _mm256_fmadd_ps(va, wv, acc[r][0]);                                        \
                    acc[r][1] = _mm256_fmadd_ps(vb, wv, acc[r][1]);                                        \
                }                                                                                          \
            }                                                                                              \
            for (int r = 0; r < rows; r++) {                                                               \
                float sa = hsum(acc[r][0]), sb = hsum(acc[r][1]);                                          \
                for (int k = K8; k < K; k++) sa += xa[k] * TO_F32(wr[r][k]);                               \
                for (int k = K8; k < K; k++) sb += xb[k] * TO_F32(wr[r][k]);                               \
                y[(int64_t)m * N + n + r] = sa;                                                            \
                y[(int64_t)(m + 1) * N + n + r] = sb;                                                      \
            }                                                                                              \
        }                                                                                                  \
        if (m < M) { /* one row of x: W row by row, a sequential stream for the prefetcher */              \
            const float *xa = x + (int64_t)m * K;                                                          \
            for (int r = 0; r < rows; r++) {                                                               \
                __m256 acc = _mm256_setzero_ps();                                                          \
                for (int k = 0; k < K8; k += 8)                                                            \
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(xa + k), LOAD_W(wr[r] + k), acc);                \
                float sa = hsum(acc);                                                                      \
                for (int k = K8; k < K; k++) sa += xa[k] * TO_F32(wr[r][k]);                               \
                y[(int64_t)m * N + n + r] = sa;                                                            \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
}

static inline float f32_to_f32(float v) { return v; }

DENSE_GEMV(gemv_f32, float, _mm256_loadu_ps, f32_to_f32)
DENSE_GEMV(gemv_bf16, uint16_t, load_bf16, bf16_to_f32)

/* int8 codes, group-wise scales (G = K: one per row): W[n, k] = code * scale[n, k / G]. G is a multiple of 16. */
void gemv_q8(const float *x, const int8_t *w, const float *scales, float *y, int M, int N, int K, int G) {
    int groups = K / G;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n += ROWS) {
        int rows = N - n < ROWS ? N - n : ROWS;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (int64_t)m * K;
            for (int r = 0; r < rows; r++) {
                const int8_t *wr = w + (int64_t)(n + r) * K;
                const float *sr = scales + (int64_t)(n + r) * groups;
                __m256 acc = _mm256_setzero_ps();
                for (int g = 0; g < groups; g++) {
                    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                    for (int k = g * G; k < (g + 1) * G; k += 16) {
                        __m128i q = _mm_loadu_si128((const __m128i *)(wr + k));
                        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), w0, a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), w1, a1);
                    }
                    acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(sr[g]), acc);
                }
                y[(int64_t)m * N + n + r] = hsum(acc);
            }
        }
    }
}

/* Activations for the int4 kernel, as llama.cpp quantizes them for its Q4 x Q8 dot products: blocks of 32
   values, each block one scale d = max|x| / 127 and codes round(x / d) in -127..127 (d = 0: all codes 0).
   The rounding is to nearest even (the default mode), the same as torch.round. */
static void quantize_q8_blocks(const float *x, int8_t *xq, float *xd, int K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < K / 32; b++) {
        const float *xb = x + b * 32;
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < 32; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float d = _mm_cvtss_f32(m4) / 127.0f;
        xd[b] = d;
        if (d == 0.0f) {
            for (int i = 0; i < 32; i++) xq[b * 32 + i] = 0;
            continue;
        }
        __m256 dv = _mm256_set1_ps(d);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xb + 8 * i), dv));
        __m256i q01 = _mm256_packs_epi32(q[0], q[1]), q23 = _mm256_packs_epi32(q[2], q[3]);
        __m256i q8 = _mm256_packs_epi16(q01, q23);  /* lanes interleaved by the packs: put them back in order */
        q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        q8 = _mm256_max_epi8(q8, _mm256_set1_epi8(-127));
        _mm256_storeu_si256((__m256i *)(xq + b * 32), q8);
    }
}

static inline __m256 dot_u4_s8(__m256i codes, const int8_t *xq, float d, __m256 acc) {
    __m256i p16 = _mm256_maddubs_epi16(codes, _mm256_loadu_si256((const __m256i *)xq));
    __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(d), acc);
}

/* int4 codes, group-wise: W[n, k] = code * scale[n, g] + offset[n, g], g = k / G. Each group's G codes fill G/2
   bytes: byte j holds code j (low nibble) and code j + G/2 (high nibble). G and K are multiples of 32.
   x is first quantized to int8 blocks (quantize_q8_blocks: x^ = code * d), so the products are integer dot
   products (maddubs), llama.cpp's Q4_1 x Q8 scheme; the result is W x^ in fp32 arithmetic:
   y = sum_g scale[g] * sum_{blocks b in g} d_b * sum_{k in b} code_w[k] * code_x[k] + offset[g] * sum_{k in g} x^[k]. */
void gemv_q4(const float *x, const uint8_t *w, const float *scales, const float *offsets, float *y,
             int M, int N, int K, int G) {
    int groups = K / G, half = G / 2, blocks = K / 32;
    const int pairs = G == 32 ? groups / 2 : 0;  /* G = 32: two groups per 32-byte load (see below) */
    int8_t *xq = malloc((size_t)M * K), *xp = malloc((size_t)M * K + 1);
    float *xd = malloc(sizeof(float) * (size_t)M * blocks), *xsum = malloc(sizeof(float) * (size_t)M * groups);
    for (int m = 0; m < M; m++) {
        quantize_q8_blocks(x + (int64_t)m * K, xq + (int64_t)m * K, xd + m * blocks, K);
        /* For G = 32 the 32 bytes of groups 2p and 2p+1 hold codes 0-15 of each (low nibbles) and 16-31 (high):
           lay the activations out to match, [x_2p[0:16], x_2p+1[0:16]] then [x_2p[16:32], x_2p+1[16:32]]. */
        for (int p = 0; p < pairs; p++) {
            const int8_t *src = xq + (int64_t)m * K + p * 64;
            int8_t *dst = xp + (int64_t)m * K + p * 64;
            for (int i = 0; i < 16; i++) {
                dst[i] = src[i];
                dst[16 + i] = src[32 + i];
                dst[32 + i] = src[16 + i];
                dst[48 + i] = src[48 + i];
            }
        }
        for (int g = 0; g < groups; g++) {
            float s = 0.f;
            for (int b = g * G / 32; b < (g + 1) * G / 32; b++) {
                int codes = 0;
                for (int i = 0; i < 32; i++) codes += xq[(int64_t)m * K + b * 32 + i];
                s += xd[m * blocks + b] * (float)codes;
            }
            xsum[m * groups + g] = s;
        }
    }
    const __m256i low = _mm256_set1_epi8(0x0F);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n += ROWS) {  /* blocks of 4 rows side by side: independent FMA chains */
        const int rows = N - n < ROWS ? N - n : ROWS;
        const uint8_t *wr[ROWS];
        const float *sr[ROWS], *orow[ROWS];
        for (int r = 0; r < ROWS; r++) {
            const int64_t row = n + (r < rows ? r : 0);
            wr[r] = w + row * (K / 2);
            sr[r] = scales + row * groups;
            orow[r] = offsets + row * groups;
        }
        for (int m = 0; m < M; m++) {
            const int8_t *xm = xq + (int64_t)m * K;
            const float *dm = xd + m * blocks, *sm = xsum + m * groups;
            __m256 acc[ROWS];
            float off[ROWS];
            for (int r = 0; r < ROWS; r++) {
                acc[r] = _mm256_setzero_ps();
                off[r] = 0.f;
            }
            for (int p = 0; p < pairs; p++) {  /* G = 32, groups 2p and 2p+1: lanes 0-3 and 4-7 */
                const int8_t *xa = xp + (int64_t)m * K + p * 64;
                const __m256i va = _mm256_loadu_si256((const __m256i *)xa);
                const __m256i vb = _mm256_loadu_si256((const __m256i *)(xa + 32));
                const __m256 d = _mm256_set_m128(_mm_set1_ps(dm[2 * p + 1]), _mm_set1_ps(dm[2 * p]));
                for (int r = 0; r < ROWS; r++) {
                    __m256i b = _mm256_loadu_si256((const __m256i *)(wr[r] + p * 32));
                    _mm_prefetch((const char *)(wr[r] + (int64_t)ROWS * (K / 2) + p * 32), _MM_HINT_T0);
                    __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(b, low), va),
                                                   _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), low), vb));
                    __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
                    __m256 s = _mm256_set_m128(_mm_set1_ps(sr[r][2 * p + 1]), _mm_set1_ps(sr[r][2 * p]));
                    acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, s), acc[r]);
                    off[r] += orow[r][2 * p] * sm[2 * p] + orow[r][2 * p + 1] * sm[2 * p + 1];
                }
            }
            for (int g = 2 * pairs; g < groups; g++) {
                const int k0 = g * G;
                __m256 a[ROWS];
                for (int r = 0; r < ROWS; r++) a[r] = _mm256_setzero_ps();
                if (G == 32) {
                    for (int r = 0; r < ROWS; r++) {
                        __m128i b = _mm_loadu_si128((const __m128i *)(wr[r] + g * half));
                        __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), _mm256_castsi256_si128(low)),
                                                         _mm_and_si128(b, _mm256_castsi256_si128(low)));
                        a[r] = dot_u4_s8(codes, xm + k0, dm[k0 / 32], a[r]);
                    }
                } else {
                    for (int j = 0; j < half; j += 32) {
                        for (int r = 0; r < ROWS; r++) {
                            __m256i b = _mm256_loadu_si256((const __m256i *)(wr[r] + g * half + j));
                            _mm_prefetch((const char *)(wr[r] + (int64_t)ROWS * (K / 2) + g * half + j), _MM_HINT_T0);
                            a[r] = dot_u4_s8(_mm256_and_si256(b, low), xm + k0 + j, dm[(k0 + j) / 32], a[r]);
                            a[r] = dot_u4_s8(_mm256_and_si256(_mm256_srli_epi16(b, 4), low), xm + k0 + half + j,
                                             dm[(k0 + half + j) / 32], a[r]);
                        }
                    }
                }
                for (int r = 0; r < ROWS; r++) {
                    acc[r] = _mm256_fmadd_ps(a[r], _mm256_set1_ps(sr[r][g]), acc[r]);
                    off[r] += orow[r][g] * sm[g];
                }
            }
            for (int r = 0; r < rows; r++) y[(int64_t)m * N + n + r] = hsum(acc[r]) + off[r];
        }
    }
    free(xq);
    free(xp);
    free(xd);
    free(xsum);
}

/* The activations the int4 kernel computes with (x^ = code * d per block of 32), for its many-row path and tests. */
void fake_quantize_q8(const float *x, float *out, int M, int K) {
    int8_t *xq = malloc((size_t)K);
    float *xd = malloc(sizeof(float) * (size_t)(K / 32));
    for (int m = 0; m < M; m++) {
        quantize_q8_blocks(x + (int64_t)m * K, xq, xd, K);
        for (int k = 0; k < K; k++) out[(int64_t)m * K + k] = (float)xq[k] * xd[k / 32];
    }
    free(xq);
    free(xd);
}

/* Dequantize to fp32 (the prefill path: dequantize, then one GEMM). */
void dequant_q8(const int8_t *w, const float *scales, float *out, int N, int K, int G) {
    int groups = K / G;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            out[(int64_t)n * K + k] = (float)w[(int64_t)n * K + k] * scales[(int64_t)n * groups + k / G];
}

void dequant_q4(const uint8_t *w, const float *scales, const float *offsets, float *out, int N, int K, int G) {
    int groups = K / G, half = G / 2;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int g = 0; g < groups; g++) {
            const uint8_t *wg = w + (int64_t)n * (K / 2) + g * half;
            float s = scales[(int64_t)n * groups + g], o = offsets[(int64_t)n * groups + g];
            float *dst = out + (int64_t)n * K + g * G;
            for (int j = 0; j < half; j++) {
                dst[j] = (float)(wg[j] & 0xF) * s + o;
                dst[half + j] = (float)(wg[j] >> 4) * s + o;
            }
        }
}
