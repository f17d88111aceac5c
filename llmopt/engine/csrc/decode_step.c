/* One whole decode step (one token, or a few consecutive ones, batch 1) of the Llama / Qwen2 decoder in a single call, as llama.cpp runs a
   token: embedding row, per layer RMSNorm -> q/k/v GEMVs -> RoPE -> K/V written into the static cache ->
   attention over the cache -> o GEMV + residual -> RMSNorm -> gate/up GEMVs -> SiLU * up -> down GEMV + residual,
   then the final norm and the vocabulary GEMV. The math is the PyTorch model's (llmopt/model.py), in fp32; the
   matrix products are the GEMV kernels of gemv.c, so every weight format they take runs here too.

   Why: in PyTorch a decode step of this 30-layer model is ~2,700 operator calls of a few microseconds each,
   10-17 ms per token on this CPU around 10-30 ms of matrix products; here the same work is one call. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void gemv_f32(const float *x, const float *w, float *y, int M, int N, int K);
void gemv_bf16(const float *x, const uint16_t *w, float *y, int M, int N, int K);
void gemv_q8(const float *x, const int8_t *w, const float *scales, float *y, int M, int N, int K, int G);
void gemv_q4(const float *x, const uint8_t *w, const float *scales, const float *offsets, float *y,
             int M, int N, int K, int G);

enum { W_F32 = 0, W_BF16 = 1, W_Q8 = 2, W_Q4 = 3 };

typedef struct {
    int64_t kind, out_features, in_features, group_size;
    const void *weight;
    const float *scales, *offsets, *bias;  /* scales/offsets: quantized kinds only; bias may be NULL */
    const int64_t *input_order;            /* GPTQ act-order permutation of the input, or NULL */
} Linear;

typedef struct {
    const float *input_norm, *post_attention_norm;
    Linear q, k, v, o, gate, up, down;
    float *keys, *values;  /* the static cache's [num_kv_heads, max_length, head_dim] for this layer */
} Layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, vocab, max_length, embed_kind;
    double eps;
    const void *embed;  /* [vocab, hidden], fp32 or bf16 (embed_kind) */
    const float *final_norm, *rope_cos, *rope_sin;  /* rope tables [positions, head_dim], sin signed */
    Linear lm_head;
    Layer *layers;
} Model;

/* y = W x (+ bias) for `rows` activation rows x [rows, in], y [rows, out], on the kernel of W's format.
   `scratch` holds rows * in_features floats. */
static void linear(const Linear *l, const float *x, float *y, int rows, float *scratch) {
    const int n = (int)l->out_features, k = (int)l->in_features, g = (int)l->group_size;
    if (l->input_order) {
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < k; i++) scratch[(int64_t)r * k + i] = x[(int64_t)r * k + l->input_order[i]];
        x = scratch;
    }
    switch (l->kind) {
        case W_F32: gemv_f32(x, (const float *)l->weight, y, rows, n, k); break;
        case W_BF16: gemv_bf16(x, (const uint16_t *)l->weight, y, rows, n, k); break;
        case W_Q8: gemv_q8(x, (const int8_t *)l->weight, l->scales, y, rows, n, k, g); break;
        default: gemv_q4(x, (const uint8_t *)l->weight, l->scales, l->offsets, y, rows, n, k, g); break;
    }
    if (l->bias)
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < n; i++) y[(int64_t)r * n + i] += l->bias[i];
}

/* out = x * rsqrt(mean(x^2) + eps) * weight */
static void rms_norm(const float *x, const float *weight, float *out, int n, double eps) {
    float sum = 0.f;
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    const float inv = 1.0f / sqrtf(sum / n + (float)eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

/* x * cos + roll(x, D/2) * signed_sin for each head of x [heads, D] (model.apply_rope). */
static void rope(float *x, int heads, int d, const float *cos, const float *sin) {
    float rotated[512];
    for (int h = 0; h < heads; h++) {
        float *xh = x + h * d;
        for (int i = 0; i < d; i++) rotated[i] = xh[(i + d / 2) % d];
        for (int i = 0; i < d; i++) xh[i] = xh[i] * cos[i] + rotated[i] * sin[i];
    }
}

static inline float dot(const float *a, const float *b, int d) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    float s = _mm_cvtss_f32(lo);
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

/* Queries of T consecutive tokens, each head against keys/values 0..first_length-1+t of its KV head
   (grouped-query attention, causal within the new tokens): softmax(q k^T / sqrt(D)) v, (token, head) pairs split
   across threads. q and out are [T, heads, D]; `scores` holds T * heads * (first_length + T - 1) floats. */
static void attend(const float *q, const float *keys, const float *values, float *out, float *scores, int T,
                   int heads, int kv_heads, int d, int max_length, int first_length) {
    const int group = heads / kv_heads, span = first_length + T - 1;
    const float scale = 1.0f / sqrtf((float)d);
    #pragma omp parallel for schedule(static)
    for (int th = 0; th < T * heads; th++) {
        const int t = th / heads, h = th % heads, length = first_length + t;
        const float *qh = q + (int64_t)th * d;
        const float *kh = keys + (int64_t)(h / group) * max_length * d, *vh = values + (int64_t)(h / group) * max_length * d;
        float *s = scores + (int64_t)th * span, *oh = out + (int64_t)th * d;
        float top = -INFINITY, total = 0.f;
        for (int j = 0; j < length; j++) {
            s[j] = dot(qh, kh + (int64_t)j * d, d) * scale;
            top = s[j] > top ? s[j] : top;
        }
        for (int j = 0; j < length; j++) total += (s[j] = expf(s[j] - top));
        for (int i = 0; i < d; i++) oh[i] = 0.f;
        for (int j = 0; j < length; j++) {
            const __m256 p = _mm256_set1_ps(s[j] / total);
            const float *vt = vh + (int64_t)j * d;
            int i = 0;
            for (; i + 8 <= d; i += 8)
                _mm256_storeu_ps(oh + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + i), _mm256_loadu_ps(oh + i)));
            for (; i < d; i++) oh[i] += s[j] / total * vt[i];
        }
    }
}

/* `count` consecutive tokens (1: a decode step; more: speculative decoding's verification of a draft) at RoPE
   positions position.., their keys/values written at cache indices slot.. (token t attends to entries
   0..slot+t). Logits for every token ([count, vocab]) when `all_logits`, else for the last one only. */
void decode_tokens(const Model *m, const int64_t *tokens, int64_t count, int64_t position, int64_t slot,
                   float *logits, int64_t all_logits) {
    const int d = (int)m->hidden, hd = (int)m->head_dim, heads = (int)m->num_heads, kvh = (int)m->num_kv_heads;
    const int inter = (int)m->intermediate, widest = inter > heads * hd ? inter : heads * hd;
    const int T = (int)count, span = (int)slot + T;  /* cache entries the last token sees */
    float *x = malloc(sizeof(float) * T * d), *xn = malloc(sizeof(float) * T * d), *tmp = malloc(sizeof(float) * T * d);
    float *q = malloc(sizeof(float) * T * heads * hd), *k = malloc(sizeof(float) * T * kvh * hd);
    float *v = malloc(sizeof(float) * T * kvh * hd), *att = malloc(sizeof(float) * T * heads * hd);
    float *gate = malloc(sizeof(float) * T * inter), *up = malloc(sizeof(float) * T * inter);
    float *scratch = malloc(sizeof(float) * T * (widest > d ? widest : d));
    float *scores = malloc(sizeof(float) * (int64_t)T * heads * span);

    for (int t = 0; t < T; t++) {
        if (m->embed_kind == W_BF16) {
            const uint16_t *row = (const uint16_t *)m->embed + tokens[t] * d;
            for (int i = 0; i < d; i++) {
                union { uint32_t u; float f; } c = { (uint32_t)row[i] << 16 };
                x[t * d + i] = c.f;
            }
        } else {
            memcpy(x + t * d, (const float *)m->embed + tokens[t] * d, sizeof(float) * d);
        }
    }
    for (int64_t layer = 0; layer < m->num_layers; layer++) {
        const Layer *L = m->layers + layer;
        for (int t = 0; t < T; t++) rms_norm(x + t * d, L->input_norm, xn + t * d, d, m->eps);
        linear(&L->q, xn, q, T, scratch);
        linear(&L->k, xn, k, T, scratch);
        linear(&L->v, xn, v, T, scratch);
        for (int t = 0; t < T; t++) {
            const float *cos = m->rope_cos + (position + t) * hd, *sin = m->rope_sin + (position + t) * hd;
            rope(q + t * heads * hd, heads, hd, cos, sin);
            rope(k + t * kvh * hd, kvh, hd, cos, sin);
            for (int h = 0; h < kvh; h++) {
                memcpy(L->keys + ((int64_t)h * m->max_length + slot + t) * hd, k + (t * kvh + h) * hd, sizeof(float) * hd);
                memcpy(L->values + ((int64_t)h * m->max_length + slot + t) * hd, v + (t * kvh + h) * hd, sizeof(float) * hd);
            }
        }
        attend(q, L->keys, L->values, att, scores, T, heads, kvh, hd, (int)m->max_length, (int)slot + 1);
        linear(&L->o, att, tmp, T, scratch);
        for (int i = 0; i < T * d; i++) x[i] += tmp[i];
        for (int t = 0; t < T; t++) rms_norm(x + t * d, L->post_attention_norm, xn + t * d, d, m->eps);
        linear(&L->gate, xn, gate, T, scratch);
        linear(&L->up, xn, up, T, scratch);
        for (int i = 0; i < T * inter; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        linear(&L->down, gate, tmp, T, scratch);
        for (int i = 0; i < T * d; i++) x[i] += tmp[i];
    }
    const int first = all_logits ? 0 : T - 1;
    for (int t = first; t < T; t++) rms_norm(x + t * d, m->final_norm, xn + t * d, d, m->eps);
    linear(&m->lm_head, xn + first * d, logits, T - first, scratch);
    free(x); free(xn); free(tmp); free(q); free(k); free(v); free(att); free(gate); free(up); free(scratch);
    free(scores);
}
