/* Batch-1 (and few-row) matrix-vector kernels for the CPU decode step, AVX2 + FMA.

   y[m, n] = sum_k x[m, k] * W[n, k] for x fp32 [M, K] and W stored as fp32, bf16, int8 (group-wise scale) or
   int4 (group-wise scale and offset); `dequant_*` expand the codes for the many-row (prefill) path. Rows of W
   are split across OpenMP threads (PyTorch's own OpenMP runtime, so torch.set_num_threads applies); each thread
   streams its rows once from memory and reuses them, from L1, for every row of x. Every output is computed the
   same way whatever M is (batch invariant). */
#include <immintrin.h>
#include <stdint.h>

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

void gemv_f32(const float *x, const float *w, float *y, int M, int N, int K) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n += ROWS) {
        int rows = N - n < ROWS ? N - n : ROWS;
        const float *w0 = w + (int64_t)n * K;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (int64_t)m * K;
            for (int r = 0; r < rows; r++) {
                const float *wr = w0 + (int64_t)r * K;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                int k = 0;
                for (; k + 16 <= K; k += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(wr + k), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), _mm256_loadu_ps(wr + k + 8), a1);
                }
                float s = hsum(_mm256_add_ps(a0, a1));
                for (; k < K; k++) s += xm[k] * wr[k];
                y[(int64_t)m * N + n + r] = s;
            }
        }
    }
}

void gemv_bf16(const float *x, const uint16_t *w, float *y, int M, int N, int K) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n += ROWS) {
        int rows = N - n < ROWS ? N - n : ROWS;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (int64_t)m * K;
            for (int r = 0; r < rows; r++) {
                const uint16_t *wr = w + (int64_t)(n + r) * K;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                int k = 0;
                for (; k + 16 <= K; k += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), load_bf16(wr + k), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), load_bf16(wr + k + 8), a1);
                }
                float s = hsum(_mm256_add_ps(a0, a1));
                for (; k < K; k++) s += xm[k] * bf16_to_f32(wr[k]);
                y[(int64_t)m * N + n + r] = s;
            }
        }
    }
}

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

/* int4 codes, group-wise: W[n, k] = code * scale[n, g] + offset[n, g], g = k / G. Each group's G codes fill G/2
   bytes: byte j holds code j (low nibble) and code j + G/2 (high nibble). G is a multiple of 16.
   y = sum_g scale[g] * sum_{k in g} x[k] * code[k] + offset[g] * sum_{k in g} x[k]. */
void gemv_q4(const float *x, const uint8_t *w, const float *scales, const float *offsets, float *y,
             int M, int N, int K, int G) {
    int groups = K / G, half = G / 2;
    float xsum[M * groups];  /* sum of x over each group, for the offset term */
    for (int m = 0; m < M; m++)
        for (int g = 0; g < groups; g++) {
            __m256 a = _mm256_setzero_ps();
            for (int k = 0; k < G; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(x + (int64_t)m * K + g * G + k));
            xsum[m * groups + g] = hsum(a);
        }
    const __m256i mask = _mm256_set1_epi32(0xF);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n += ROWS) {
        int rows = N - n < ROWS ? N - n : ROWS;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (int64_t)m * K;
            for (int r = 0; r < rows; r++) {
                const uint8_t *wr = w + (int64_t)(n + r) * (K / 2);
                const float *sr = scales + (int64_t)(n + r) * groups, *orow = offsets + (int64_t)(n + r) * groups;
                __m256 acc = _mm256_setzero_ps();
                float off = 0.f;
                for (int g = 0; g < groups; g++) {
                    const uint8_t *wg = wr + g * half;
                    const float *xg = xm + g * G;
                    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                    for (int j = 0; j < half; j += 8) {
                        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wg + j)));
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + j), _mm256_cvtepi32_ps(_mm256_and_si256(b, mask)), a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + half + j), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), a1);
                    }
                    acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(sr[g]), acc);
                    off += orow[g] * xsum[m * groups + g];
                }
                y[(int64_t)m * N + n + r] = hsum(acc) + off;
            }
        }
    }
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
