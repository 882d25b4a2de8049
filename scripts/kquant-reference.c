/* Runs llama.cpp's reference K-quantizers (ggml-quants.c quantize_row_q{4,5,6}_K_ref) for
 * scripts/make-kquant-fixture.py: reads little-endian f32 values (whole super-blocks of 256) on
 * stdin, writes their Q4_K, then Q5_K, then Q6_K blocks on stdout.
 * Built against ggml's sources: cc -DGGML_COMMON_DECL_C -I ggml/include -I ggml/src ... */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "ggml-common.h"

void quantize_row_q4_K_ref(const float * x, block_q4_K * y, int64_t k);
void quantize_row_q5_K_ref(const float * x, block_q5_K * y, int64_t k);
void quantize_row_q6_K_ref(const float * x, block_q6_K * y, int64_t k);

/* ggml.c functions ggml-quants.c links against; the reference quantizers never call them. */
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    (void) fmt;
    fprintf(stderr, "ggml_abort at %s:%d\n", file, line);
    abort();
}
size_t ggml_row_size(int type, int64_t ne) { (void) type; (void) ne; abort(); }
const char * ggml_type_name(int type) { (void) type; abort(); }
size_t ggml_type_size(int type) { (void) type; abort(); }

int main(void) {
    size_t cap = 1 << 16, n = 0, got;
    float * x = malloc(cap * sizeof(float));
    while ((got = fread(x + n, sizeof(float), cap - n, stdin)) > 0) {
        n += got;
        if (n == cap) {
            cap *= 2;
            x = realloc(x, cap * sizeof(float));
        }
    }
    if (n % QK_K != 0) {
        fprintf(stderr, "%zu values are not whole super-blocks of %d\n", n, QK_K);
        return 1;
    }
    size_t blocks = n / QK_K;
    block_q4_K * q4 = calloc(blocks, sizeof(block_q4_K));
    block_q5_K * q5 = calloc(blocks, sizeof(block_q5_K));
    block_q6_K * q6 = calloc(blocks, sizeof(block_q6_K));
    quantize_row_q4_K_ref(x, q4, (int64_t) n);
    quantize_row_q5_K_ref(x, q5, (int64_t) n);
    quantize_row_q6_K_ref(x, q6, (int64_t) n);
    fwrite(q4, sizeof(block_q4_K), blocks, stdout);
    fwrite(q5, sizeof(block_q5_K), blocks, stdout);
    fwrite(q6, sizeof(block_q6_K), blocks, stdout);
    return 0;
}
