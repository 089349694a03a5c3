// Are ggml's batched dot kernels bit-identical to one column at a time? For each weight type,
// a 64 x 512 matrix times 1..16 activation columns in one mul_mat (and 24, 32, 48 and 63: the
// larger trees the profile probes), against the same matrix times each column alone, on 2
// threads (so the chunking runs as it does in a decode step).
// Lossless speculative decoding needs the two to agree to the bit: verifying a draft of n
// tokens is the batch, plain decoding the columns. Prints one line per type and count,
// "<type> <n> exact" or "<type> <n> DIFFERS ...", and exits 1 if any count differs.
//
// Built against whichever ggml is at hand (the installed wheel's, or a cross-built one run
// under qemu-user) by tests/test_kernels.py; it uses only ggml's public API.

#include "ggml.h"
#include "ggml-cpu.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROWS = 64, MAX_K = 544, MAX_COLS = 63, THREADS = 2 };

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static float uniform(void) { // xorshift64*, in [-1, 1)
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return (float) ((rng * 0x2545F4914F6CDD1Dull) >> 40) / (float) (1 << 23) - 1.0f;
}

// W (type t, ROWS x K) times the first n columns of x (K x n, f32) into out (ROWS x n)
static void mul_mat(enum ggml_type t, int K, const void * w, const float * x, int n, float * out) {
    struct ggml_init_params params = { 64u << 20, NULL, false };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * a = ggml_new_tensor_2d(ctx, t, K, ROWS);
    struct ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, n);
    memcpy(a->data, w, ggml_nbytes(a));
    memcpy(b->data, x, ggml_nbytes(b));
    struct ggml_tensor * c = ggml_mul_mat(ctx, a, b);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, c);
    if (ggml_graph_compute_with_ctx(ctx, gf, THREADS) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "ggml_graph_compute failed\n");
        exit(2);
    }
    memcpy(out, c->data, ggml_nbytes(c));
    ggml_free(ctx);
}

int main(int argc, char ** argv) {
    // the types of the models edgespec runs: Q4_0/Q4_1/Q8_0 files, Q4_K_M's q4_K, q5_0 and q6_K,
    // and f16 (the KV cache, so attention)
    const enum ggml_type types[] = { GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q8_0,
                                     GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K, GGML_TYPE_F16 };
    const int counts[] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 32, 48, MAX_COLS };
    const char * only = argc > 1 ? argv[1] : NULL;
    static float wf[ROWS * MAX_K], x[MAX_K * MAX_COLS], col[MAX_K], batch[ROWS * MAX_COLS], one[ROWS];
    static uint8_t w[ROWS * MAX_K * 4];
    int failed = 0;
    ggml_cpu_init();
    // 512: 16 blocks of 32 (2 of 256); 544: an odd number of blocks of 32, and f16 leftovers
    // after the SIMD steps (the "/odd" lines)
    for (size_t i = 0; i < 2 * sizeof(types) / sizeof(types[0]); ++i) {
        const enum ggml_type t = types[i / 2];
        const int K = i % 2 ? 544 : 512;
        char name[32];
        snprintf(name, sizeof(name), "%s%s", ggml_type_name(t), K == 512 ? "" : "/odd");
        if ((only && strcmp(only, ggml_type_name(t)) != 0) || K % ggml_blck_size(t) != 0) {
            continue;
        }
        for (int j = 0; j < ROWS * K; ++j) wf[j] = uniform();
        for (int j = 0; j < K * MAX_COLS; ++j) x[j] = uniform();
        if (t == GGML_TYPE_F16) {
            ggml_fp32_to_fp16_row(wf, (ggml_fp16_t *) w, ROWS * K);
        } else {
            ggml_quantize_chunk(t, wf, w, 0, ROWS, K, NULL);
        }
        for (size_t k = 0; k < sizeof(counts) / sizeof(counts[0]); ++k) {
            const int n = counts[k];
            mul_mat(t, K, w, x, n, batch);
            int bad = -1;
            for (int c = 0; c < n && bad < 0; ++c) {
                memcpy(col, x + c * K, K * sizeof(float));
                mul_mat(t, K, w, col, 1, one);
                for (int r = 0; r < ROWS; ++r) {
                    if (memcmp(&one[r], &batch[c * ROWS + r], sizeof(float)) != 0) {
                        printf("%s %d DIFFERS column %d row %d: %.9g batched, %.9g alone\n",
                               name, n, c, r, batch[c * ROWS + r], one[r]);
                        bad = c;
                        break;
                    }
                }
            }
            if (bad < 0) {
                printf("%s %d exact\n", name, n);
            }
            failed |= bad >= 0;
        }
    }
    return failed;
}
