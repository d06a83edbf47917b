/* NAMM's streamed spectrogram step, fused: for each row and slot, the windowed DFT of F overlapping frames of
   the slot's attention series (a 34 x 32 matrix product per frame, as features.spectrogram_frames does with
   BLAS), the magnitudes, and their EMA fold (as features.fold_frames), without writing any intermediate.

   rows      (R, L, N) fp32, C-contiguous: query rows (time) x slots; frame j of a row reads rows
             first + j * HOP .. first + j * HOP + NFFT - 1.
   basis     (2 * BINS, NFFT) fp32: windowed cos rows, then windowed -sin rows (features.dft_basis(32)).
   weights   (F) fp32: (1 - a) a^(F - 1 - j), the fold weight of frame j.
   ema_in    (R, BINS, N) fp32, read; ema_out (R, BINS, N) fp32, written (must not alias ema_in):
             ema_out = sum_j weights[j] |DFT_j| + decay * ema_in, decay = a^F.

   Slots are processed in tiles of TILE = 16 * V floats with GCC/Clang vector extensions (AVX-512, AVX2 or NEON,
   whatever the compiler targets), KB frequency bins at a time so that a tile's DFT accumulators stay in
   registers: 2 * KB * V + V 16-float vectors, i.e. 28 of AVX-512's 32 registers with V = 4, and 14 of AVX2's 16
   (or 28 of NEON's 32) with V = 1 (V = 4 there spilled: 2.4x slower on an AVX2 CPU). Every row and slot is
   computed by the same instruction sequence whatever R, N, V and KB are (each output is the same chain of
   multiply-adds over t, then frames j), so a row's result does not depend on the batch it is in, nor on V. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define NFFT 32
#define HOP 16
#define BINS 17
#ifndef V
#if defined(__AVX512F__)
#define V 4
#else
#define V 1
#endif
#endif
#ifndef KB
#define KB 3
#endif
#define TILE (16 * V)

typedef float vec16 __attribute__((vector_size(64)));

static inline vec16 load16(const float *p) {
  vec16 v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline vec16 magnitude16(vec16 re, vec16 im) {
  vec16 sq = re * re + im * im;
  float lanes[16];
  memcpy(lanes, &sq, sizeof lanes);
  for (int i = 0; i < 16; i++) lanes[i] = sqrtf(lanes[i]);
  memcpy(&sq, lanes, sizeof sq);
  return sq;
}

/* acc += w * |DFT| of one frame of one tile: x points at the frame's first row of the tile, ld is the row stride */
static void fold_frame(const float *x, int64_t ld, float weight, const float *basis, vec16 acc[BINS][V]) {
  const vec16 w = (vec16){0} + weight;
  for (int k0 = 0; k0 < BINS; k0 += KB) {
    vec16 re[KB][V], im[KB][V];
    memset(re, 0, sizeof re);
    memset(im, 0, sizeof im);
    for (int t = 0; t < NFFT; t++) {
      vec16 xt[V];
      for (int v = 0; v < V; v++) xt[v] = load16(x + t * ld + 16 * v);
      for (int kk = 0; kk < KB; kk++) {
        const int k = k0 + kk < BINS ? k0 + kk : BINS - 1; /* past the last bin: computed, not used */
        const float c = basis[k * NFFT + t], s = basis[(BINS + k) * NFFT + t];
        for (int v = 0; v < V; v++) {
          re[kk][v] += c * xt[v];
          im[kk][v] += s * xt[v];
        }
      }
    }
    for (int kk = 0; kk < KB && k0 + kk < BINS; kk++)
      for (int v = 0; v < V; v++) acc[k0 + kk][v] += w * magnitude16(re[kk][v], im[kk][v]);
  }
}

void namm_spectrogram_fold(const float *rows, int64_t R, int64_t L, int64_t N, int64_t first, int64_t frames,
                           const float *basis, const float *weights, float decay, const float *ema_in,
                           float *ema_out) {
  float frame_copy[NFFT][TILE]; /* the last, partial tile's frame, zero-padded to TILE slots */
  for (int64_t r = 0; r < R; r++) {
    const float *row = rows + (r * L + first) * N;
    for (int64_t n0 = 0; n0 < N; n0 += TILE) {
      const int64_t width = N - n0 < TILE ? N - n0 : TILE;
      vec16 acc[BINS][V];
      memset(acc, 0, sizeof acc);
      for (int64_t j = 0; j < frames; j++) {
        const float *x = row + j * HOP * N + n0;
        if (width == TILE) {
          fold_frame(x, N, weights[j], basis, acc);
        } else {
          memset(frame_copy, 0, sizeof frame_copy);
          for (int t = 0; t < NFFT; t++) memcpy(frame_copy[t], x + t * N, sizeof(float) * width);
          fold_frame(&frame_copy[0][0], TILE, weights[j], basis, acc);
        }
      }
      float out[TILE];
      for (int k = 0; k < BINS; k++) {
        memcpy(out, &acc[k][0], sizeof out);
        const float *e_in = ema_in + (r * BINS + k) * N + n0;
        float *e_out = ema_out + (r * BINS + k) * N + n0;
        for (int64_t i = 0; i < width; i++) e_out[i] = out[i] + decay * e_in[i];
      }
    }
  }
}
