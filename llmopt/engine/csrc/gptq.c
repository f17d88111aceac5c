/* GPTQ's column loop over one block of columns (llmopt/gptq.py: `_gptq_quantize`), one row at a time.

   Under GPTQ the rows of W are independent: they share the inverse Hessian's Cholesky factor, and each row's
   column-by-column rounding and error feedback touches that row only. So each OpenMP thread takes whole rows and
   runs, for every column i of the block: at a group's first column the group's scale and zero point from the
   row's weights as updated so far (the reference's Quantizer.find_params, scale rounded up to fp16), the code
   of column i, its error divided by the factor's diagonal, and the error fed into the row's later columns.
   The same float operations in the same order as the PyTorch loop in gptq.py, which is the reference the
   tests compare against (built with -ffp-contract=off: no fused multiply-adds). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline float round_up_to_fp16(float x) {  /* the smallest fp16 value >= x, as float */
    return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
}

/* w: [rows, width] the block's weights (updated in place); hinv: [width, width] the factor's block;
   codes, errors: [rows, width]; scales, zeros: [rows, width / group]. width is a multiple of group. */
void gptq_block(float *w, const float *hinv, float *codes, float *errors, float *scales, float *zeros,
                int64_t rows, int64_t width, int64_t group, int64_t max_code, int64_t symmetric) {
    const int64_t groups = width / group;
    const float tiny = 6.103515625e-05f;  /* torch.finfo(torch.float16).tiny */
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *wr = w + r * width;
        float scale = 1.0f, zero = 0.0f;
        for (int64_t i = 0; i < width; i++) {
            if (i % group == 0) {
                float lo = wr[i], hi = wr[i];
                for (int64_t j = i + 1; j < i + group; j++) {
                    lo = wr[j] < lo ? wr[j] : lo;
                    hi = wr[j] > hi ? wr[j] : hi;
                }
                lo = lo > 0.0f ? 0.0f : lo;
                hi = hi < 0.0f ? 0.0f : hi;
                if (symmetric) {
                    hi = fabsf(lo) > hi ? fabsf(lo) : hi;
                    lo = -hi;
                }
                if (lo == 0.0f && hi == 0.0f) {
                    lo = -1.0f;
                    hi = 1.0f;
                }
                scale = (hi - lo) / (float)max_code;
                scale = round_up_to_fp16(scale < tiny ? tiny : scale);
                zero = symmetric ? (float)(max_code + 1) / 2.0f : nearbyintf(-lo / scale);
                scales[r * groups + i / group] = scale;
                zeros[r * groups + i / group] = zero;
            }
            const float x = wr[i];
            float q = nearbyintf(x / scale) + zero;
            q = q < 0.0f ? 0.0f : (q > (float)max_code ? (float)max_code : q);
            codes[r * width + i] = q;
            const float *h = hinv + i * width;
            const float e = (x - (q - zero) * scale) / h[i];
            errors[r * width + i] = e;
            for (int64_t j = i; j < width; j++)
                wr[j] -= e * h[j];
        }
    }
}
