/* One whole decode step (one token, batch 1) of the Llama / Qwen2 decoder in a single call, as llama.cpp runs a
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

/* y = W x (+ bias) for one activation row, on the kernel of W's format. `scratch` holds in_features floats. */
static void linear(const Linear *l, const float *x, float *y, float *scratch) {
    if (l->input_order) {
        for (int64_t i = 0; i < l->in_features; i++) scratch[i] = x[l->input_order[i]];
        x = scratch;
    }
    const int n = (int)l->out_features, k = (int)l->in_features, g = (int)l->group_size;
    switch (l->kind) {
        case W_F32: gemv_f32(x, (const float *)l->weight, y, 1, n, k); break;
        case W_BF16: gemv_bf16(x, (const uint16_t *)l->weight, y, 1, n, k); break;
        case W_Q8: gemv_q8(x, (const int8_t *)l->weight, l->scales, y, 1, n, k, g); break;
        default: gemv_q4(x, (const uint8_t *)l->weight, l->scales, l->offsets, y, 1, n, k, g); break;
    }
    if (l->bias)
        for (int i = 0; i < n; i++) y[i] += l->bias[i];
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

/* One query per head against keys/values 0..length-1 of its KV head (grouped-query attention): softmax(q k^T /
   sqrt(D)) v, heads split across threads. `scores` holds num_heads * length floats. */
static void attend(const float *q, const float *keys, const float *values, float *out, float *scores,
                   int heads, int kv_heads, int d, int max_length, int length) {
    const int group = heads / kv_heads;
    const float scale = 1.0f / sqrtf((float)d);
    #pragma omp parallel for schedule(static)
    for (int h = 0; h < heads; h++) {
        const float *qh = q + h * d;
        const float *kh = keys + (int64_t)(h / group) * max_length * d, *vh = values + (int64_t)(h / group) * max_length * d;
        float *s = scores + (int64_t)h * length, *oh = out + h * d;
        float top = -INFINITY, total = 0.f;
        for (int t = 0; t < length; t++) {
            s[t] = dot(qh, kh + (int64_t)t * d, d) * scale;
            top = s[t] > top ? s[t] : top;
        }
        for (int t = 0; t < length; t++) total += (s[t] = expf(s[t] - top));
        for (int i = 0; i < d; i++) oh[i] = 0.f;
        for (int t = 0; t < length; t++) {
            const __m256 p = _mm256_set1_ps(s[t] / total);
            const float *vt = vh + (int64_t)t * d;
            int i = 0;
            for (; i + 8 <= d; i += 8)
                _mm256_storeu_ps(oh + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + i), _mm256_loadu_ps(oh + i)));
            for (; i < d; i++) oh[i] += s[t] / total * vt[i];
        }
    }
}

/* The logits [vocab] for `token` at RoPE position `position`, its keys/values written at cache index `slot`
   (attention then covers cache entries 0..slot). */
void decode_token(const Model *m, int64_t token, int64_t position, int64_t slot, float *logits) {
    const int d = (int)m->hidden, hd = (int)m->head_dim, heads = (int)m->num_heads, kvh = (int)m->num_kv_heads;
    const int inter = (int)m->intermediate, widest = inter > heads * hd ? inter : heads * hd;
    const int length = (int)slot + 1;
    float *x = malloc(sizeof(float) * d), *xn = malloc(sizeof(float) * d), *tmp = malloc(sizeof(float) * d);
    float *q = malloc(sizeof(float) * heads * hd), *k = malloc(sizeof(float) * kvh * hd);
    float *v = malloc(sizeof(float) * kvh * hd), *att = malloc(sizeof(float) * heads * hd);
    float *gate = malloc(sizeof(float) * inter), *up = malloc(sizeof(float) * inter);
    float *scratch = malloc(sizeof(float) * (widest > d ? widest : d));
    float *scores = malloc(sizeof(float) * (int64_t)heads * length);
    const float *cos = m->rope_cos + position * hd, *sin = m->rope_sin + position * hd;

    if (m->embed_kind == W_BF16) {
        const uint16_t *row = (const uint16_t *)m->embed + token * d;
        for (int i = 0; i < d; i++) {
            union { uint32_t u; float f; } c = { (uint32_t)row[i] << 16 };
            x[i] = c.f;
        }
    } else {
        memcpy(x, (const float *)m->embed + token * d, sizeof(float) * d);
    }
    for (int64_t layer = 0; layer < m->num_layers; layer++) {
        const Layer *L = m->layers + layer;
        rms_norm(x, L->input_norm, xn, d, m->eps);
        linear(&L->q, xn, q, scratch);
        linear(&L->k, xn, k, scratch);
        linear(&L->v, xn, v, scratch);
        rope(q, heads, hd, cos, sin);
        rope(k, kvh, hd, cos, sin);
        for (int h = 0; h < kvh; h++) {
            memcpy(L->keys + ((int64_t)h * m->max_length + slot) * hd, k + h * hd, sizeof(float) * hd);
            memcpy(L->values + ((int64_t)h * m->max_length + slot) * hd, v + h * hd, sizeof(float) * hd);
        }
        attend(q, L->keys, L->values, att, scores, heads, kvh, hd, (int)m->max_length, length);
        linear(&L->o, att, tmp, scratch);
        for (int i = 0; i < d; i++) x[i] += tmp[i];
        rms_norm(x, L->post_attention_norm, xn, d, m->eps);
        linear(&L->gate, xn, gate, scratch);
        linear(&L->up, xn, up, scratch);
        for (int i = 0; i < inter; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        linear(&L->down, gate, tmp, scratch);
        for (int i = 0; i < d; i++) x[i] += tmp[i];
    }
    rms_norm(x, m->final_norm, xn, d, m->eps);
    linear(&m->lm_head, xn, logits, scratch);
    free(x); free(xn); free(tmp); free(q); free(k); free(v); free(att); free(gate); free(up); free(scratch);
    free(scores);
}
