/* Fused CPU kernels for the hyper-connection stream mixing (r1/model/hc.py; built and loaded by r1/model/cext.py).

Why: per token the mixing is an n x n (or 1 x n) matrix times an [n, D] one. torch runs it as a batched matmul of
N tiny matrices, several times slower than one pass over the bytes, and the backward needs four such bmms plus
in-place adds, each a pass over the n-times-wider stream tensor. Here each kernel walks the tokens once; a token's
rows (n D floats, a few KB) stay in L1 while every output that needs them is formed.

Vectorisation: the loops over D carry `omp simd`, and each kernel body is inlined with n a compile-time constant
for n = 2, 4, 8 (the loops over the streams unroll; each input element is loaded once per D-vector and feeds all
outputs from registers); other n run the same code with n as a variable (correct, not vectorised).
Tokens are split over torch's OpenMP threads (the library links the libgomp torch loaded).

Layout (all fp32, contiguous, tokens first), per token t:
  x, xr, g_r, dx: [N, n, D]   h, y, g_h, dy: [N, D]   pre, post, dpre, dpost: [N, n]   res, dres: [N, n, n]
Every sum runs in a fixed order, so results do not depend on the thread count.
*/
#include <stddef.h>

#define INLINE static inline __attribute__((always_inline))

/* n as a constant where it is a common one: the body below unrolls over the streams */
#define DISPATCH_N(body)     \
  switch (n) {               \
    case 2: body(2); break;  \
    case 4: body(4); break;  \
    case 8: body(8); break;  \
    default: body(n); break; \
  }

/* o[d] = sum_i w[i] rows[i][d] for n rows of D floats (the rows in L1; with n constant each row element is loaded
   once per D-vector) */
INLINE void weighted_sum(float *restrict o, const float *restrict w, const float *restrict rows, const long n,
                         const long D) {
#pragma omp simd
  for (long d = 0; d < D; d++) {
    float a = 0.0f;
    for (long i = 0; i < n; i++) a += w[i] * rows[i * D + d];
    o[d] = a;
  }
}

/* h = pre x, xr = res x:  h[t] = sum_i pre[t,i] x[t,i];  xr[t,j] = sum_i res[t,j,i] x[t,i] */
INLINE void mix_token(const float *restrict xt, const float *restrict p, const float *restrict r,
                      float *restrict ht, float *restrict xo, const long n, const long D) {
  weighted_sum(ht, p, xt, n, D);
  for (long j = 0; j < n; j++) weighted_sum(xo + j * D, r + j * n, xt, n, D);
}

void hc_mix(const float *restrict x, const float *restrict pre, const float *restrict res, float *restrict h,
            float *restrict xr, long N, long n, long D) {
#define BODY(NN)                                                                                \
  _Pragma("omp parallel for schedule(static)") for (long t = 0; t < N; t++)                     \
      mix_token(x + t * (NN) * D, pre + t * (NN), res + t * (NN) * (NN), h + t * D, xr + t * (NN) * D, NN, D)
  DISPATCH_N(BODY)
#undef BODY
}

/* in place: xr[t,i] += post[t,i] y[t] */
INLINE void write_token(float *restrict xo, const float *restrict p, const float *restrict yt, const long n,
                        const long D) {
#pragma omp simd
  for (long d = 0; d < D; d++) {
    const float yd = yt[d];
    for (long i = 0; i < n; i++) xo[i * D + d] += p[i] * yd;
  }
}

void hc_write(float *restrict xr, const float *restrict post, const float *restrict y, long N, long n, long D) {
#define BODY(NN) \
  _Pragma("omp parallel for schedule(static)") for (long t = 0; t < N; t++) \
      write_token(xr + t * (NN) * D, post + t * (NN), y + t * D, NN, D)
  DISPATCH_N(BODY)
#undef BODY
}

/* out[k] = <a[k], b> over D floats for k < m, four at a time: four independent sums per loop hide the latency of
   the vector adds (one sum at a time is add-latency bound). A fixed summation order for a given build. */
INLINE void dots(const float *const *a, long m, const float *restrict b, float *out, const long D) {
  long k = 0;
  for (; k + 4 <= m; k += 4) {
    const float *restrict a0 = a[k], *restrict a1 = a[k + 1], *restrict a2 = a[k + 2], *restrict a3 = a[k + 3];
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (long d = 0; d < D; d++) {
      s0 += a0[d] * b[d];
      s1 += a1[d] * b[d];
      s2 += a2[d] * b[d];
      s3 += a3[d] * b[d];
    }
    out[k] = s0, out[k + 1] = s1, out[k + 2] = s2, out[k + 3] = s3;
  }
  for (; k < m; k++) {
    const float *restrict ak = a[k];
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long d = 0; d < D; d++) s += ak[d] * b[d];
    out[k] = s;
  }
}

#define MAX_N 16 /* streams supported by the kernels (cext.MAX_STREAMS; cext.fits checks it) */

/* the write-back's backward, one read of g: dpost[t,i] = <g[t,i], y[t]>;  dy[t] = sum_i post[t,i] g[t,i] */
INLINE void write_bwd_token(const float *restrict gt, const float *restrict p, const float *restrict yt,
                            float *restrict dp, float *restrict dyt, const long n, const long D) {
  weighted_sum(dyt, p, gt, n, D);
  const float *rows[MAX_N];
  for (long i = 0; i < n; i++) rows[i] = gt + i * D;
  dots(rows, n, yt, dp, D); /* rows still in L1 */
}

void hc_write_bwd(const float *restrict g, const float *restrict post, const float *restrict y,
                  float *restrict dpost, float *restrict dy, long N, long n, long D) {
#define BODY(NN)                                                                                        \
  _Pragma("omp parallel for schedule(static)") for (long t = 0; t < N; t++)                             \
      write_bwd_token(g + t * (NN) * D, post + t * (NN), y + t * D, dpost + t * (NN), dy + t * D, NN, D)
  DISPATCH_N(BODY)
#undef BODY
}

/* the mixing's backward, one read of x and g_r:
     dx[t,i] = sum_j res[t,j,i] g_r[t,j] + pre[t,i] g_h[t]  (+ coef[t] x[t,i] + dx[t,i] as it is, for _into)
     dpre[t,i] = <g_h[t], x[t,i]>,   dres[t,j,i] = <g_r[t,j], x[t,i]>   */
INLINE void mix_dx_token(const float *restrict xt, const float *restrict p, const float *restrict r,
                         const float *restrict ght, const float *restrict gt, const float coef, float *restrict dxt,
                         const int accumulate, const long n, const long D) {
#pragma omp simd
  for (long d = 0; d < D; d++) {
    const float gh = ght[d];
    for (long i = 0; i < n; i++) {
      float s = p[i] * gh + coef * xt[i * D + d];
      for (long j = 0; j < n; j++) s += r[j * n + i] * gt[j * D + d];
      dxt[i * D + d] = accumulate ? dxt[i * D + d] + s : s;
    }
  }
}

INLINE void mix_dots_token(const float *restrict xt, const float *restrict ght, const float *restrict gt,
                           float *restrict dp, float *restrict dr, const long n, const long D) {
  const float *rows[MAX_N + 1]; /* g_h, then g_r's rows: all dotted with x[t,i] */
  float out[MAX_N + 1];
  rows[0] = ght;
  for (long j = 0; j < n; j++) rows[1 + j] = gt + j * D;
  for (long i = 0; i < n; i++) {
    dots(rows, n + 1, xt + i * D, out, D);
    dp[i] = out[0];
    for (long j = 0; j < n; j++) dr[j * n + i] = out[1 + j];
  }
}

void hc_mix_bwd(const float *restrict x, const float *restrict pre, const float *restrict res,
                const float *restrict gh, const float *restrict gr, float *restrict dx, float *restrict dpre,
                float *restrict dres, long N, long n, long D) {
#define BODY(NN)                                                                                                  \
  _Pragma("omp parallel for schedule(static)") for (long t = 0; t < N; t++) {                                     \
    mix_dx_token(x + t * (NN) * D, pre + t * (NN), res + t * (NN) * (NN), gh + t * D, gr + t * (NN) * D, 0.0f,    \
                 dx + t * (NN) * D, 0, NN, D);                                                                    \
    mix_dots_token(x + t * (NN) * D, gh + t * D, gr + t * (NN) * D, dpre + t * (NN), dres + t * (NN) * (NN), NN, \
                   D); /* the rows still in L1 */                                                                 \
  }
  DISPATCH_N(BODY)
#undef BODY
}

/* The two halves, for an HC whose norm-projection backward forms dx (r1/model/hc.py, _Link): the dots first
   (dpre, dres feed the maps' backward), then dx += the mixing's terms + coef x, into the projection's dx. */
void hc_mix_dots(const float *restrict x, const float *restrict gh, const float *restrict gr, float *restrict dpre,
                 float *restrict dres, long N, long n, long D) {
#define BODY(NN)                                                                                           \
  _Pragma("omp parallel for schedule(static)") for (long t = 0; t < N; t++)                                \
      mix_dots_token(x + t * (NN) * D, gh + t * D, gr + t * (NN) * D, dpre + t * (NN), dres + t * (NN) * (NN), \
                     NN, D)
  DISPATCH_N(BODY)
#undef BODY
}

void hc_mix_bwd_into(const float *restrict x, const float *restrict pre, const float *restrict res,
                     const float *restrict gh, const float *restrict gr, const float *restrict coef,
                     float *restrict dx, long N, long n, long D) {
#define BODY(NN)                                                                                                \
  _Pragma("omp parallel for schedule(static)") for (long t = 0; t < N; t++)                                     \
      mix_dx_token(x + t * (NN) * D, pre + t * (NN), res + t * (NN) * (NN), gh + t * D, gr + t * (NN) * D, coef[t], \
                   dx + t * (NN) * D, 1, NN, D)
  DISPATCH_N(BODY)
#undef BODY
}

/* ---------------------------------------------------------------------------------------------------------------
   The maps H from their logits z [M, N] (tokens last; rows: n of H_pre, n of H_post, n*n of H_res row-major),
   written tokens first as pre [N, n], post [N, n], res [N, n, n]. iters > 0 (mHC): pre = sigmoid, post = 2 sigmoid,
   res = Sinkhorn-Knopp(exp(.)) with `iters` iterations and the rounding, as r1.model.hc.sinkhorn does in torch;
   iters = 0 (HC): the logits as they are. Per token the n x n matrix lives on the stack: what torch runs as ~100
   dispatches over [n, n, N] tensors (each a few microseconds) is here one pass over the tokens. */
#define MAX_SQ (MAX_N * MAX_N)

INLINE float sigmoidf_(float v) { return 1.0f / (1.0f + __builtin_expf(-v)); }

INLINE void sinkhorn_token(float *k, const long n, const long iters) {
  /* k [n, n] row-major (i: row, j: column). The first step in the log domain: log_softmax over j, softmax over i */
  for (long i = 0; i < n; i++) {
    float mx = k[i * n];
    for (long j = 1; j < n; j++) mx = k[i * n + j] > mx ? k[i * n + j] : mx;
    float s = 0.0f;
    for (long j = 0; j < n; j++) s += __builtin_expf(k[i * n + j] - mx);
    const float lse = mx + __builtin_logf(s);
    for (long j = 0; j < n; j++) k[i * n + j] -= lse;
  }
  for (long j = 0; j < n; j++) {
    float mx = k[j];
    for (long i = 1; i < n; i++) mx = k[i * n + j] > mx ? k[i * n + j] : mx;
    float s = 0.0f;
    for (long i = 0; i < n; i++) s += (k[i * n + j] = __builtin_expf(k[i * n + j] - mx));
    for (long i = 0; i < n; i++) k[i * n + j] /= s;
  }
  for (long it = 1; it < iters; it++) { /* times the reciprocal: one division a row / column (torch: n), ~1 ulp */
    for (long i = 0; i < n; i++) {
      float s = 0.0f;
      for (long j = 0; j < n; j++) s += k[i * n + j];
      const float inv = 1.0f / s;
      for (long j = 0; j < n; j++) k[i * n + j] *= inv;
    }
    for (long j = 0; j < n; j++) {
      float s = 0.0f;
      for (long i = 0; i < n; i++) s += k[i * n + j];
      const float inv = 1.0f / s;
      for (long i = 0; i < n; i++) k[i * n + j] *= inv;
    }
  }
  /* the rounding (Altschuler, Weed, Rigollet 2017, Alg. 2): exactly doubly stochastic */
  float r[MAX_N], c[MAX_N], rs = 0.0f;
  for (long i = 0; i < n; i++) {
    float s = 0.0f;
    for (long j = 0; j < n; j++) s += k[i * n + j];
    s = s > 1.0f ? s : 1.0f;
    for (long j = 0; j < n; j++) k[i * n + j] /= s;
  }
  for (long j = 0; j < n; j++) {
    float s = 0.0f;
    for (long i = 0; i < n; i++) s += k[i * n + j];
    s = s > 1.0f ? s : 1.0f;
    for (long i = 0; i < n; i++) k[i * n + j] /= s;
  }
  for (long i = 0; i < n; i++) {
    float s = 0.0f;
    for (long j = 0; j < n; j++) s += k[i * n + j];
    r[i] = 1.0f - s > 0.0f ? 1.0f - s : 0.0f;
    rs += r[i];
  }
  for (long j = 0; j < n; j++) {
    float s = 0.0f;
    for (long i = 0; i < n; i++) s += k[i * n + j];
    c[j] = 1.0f - s > 0.0f ? 1.0f - s : 0.0f;
  }
  rs = rs > 1e-12f ? rs : 1e-12f;
  for (long i = 0; i < n; i++)
    for (long j = 0; j < n; j++) k[i * n + j] += r[i] * c[j] / rs;
}

INLINE void maps_token(const float *restrict z, float *restrict pre, float *restrict post, float *restrict res,
                       const long t, const long N, const long n, const long iters) {
  float k[MAX_SQ];
  for (long i = 0; i < n; i++) {
    const float a = z[i * N + t], b = z[(n + i) * N + t];
    pre[t * n + i] = iters ? sigmoidf_(a) : a;
    post[t * n + i] = iters ? 2.0f * sigmoidf_(b) : b;
  }
  for (long q = 0; q < n * n; q++) k[q] = z[(2 * n + q) * N + t];
  if (iters) sinkhorn_token(k, n, iters);
  for (long q = 0; q < n * n; q++) res[t * n * n + q] = k[q];
}

void hc_maps(const float *restrict z, float *restrict pre, float *restrict post, float *restrict res, long N, long n,
             long iters) {
#define BODY(NN) \
  _Pragma("omp parallel for schedule(static)") for (long t = 0; t < N; t++) maps_token(z, pre, post, res, t, N, NN, iters)
  DISPATCH_N(BODY) /* n constant: the n x n matrix lives in registers, the loops unroll */
#undef BODY
}

/* Solve A x = b in place (A [n, n] row-major, overwritten), Gaussian elimination with partial pivoting. */
INLINE void solve_small(float *A, float *b, const long n) {
  for (long c = 0; c < n; c++) {
    long p = c;
    for (long i = c + 1; i < n; i++) p = __builtin_fabsf(A[i * n + c]) > __builtin_fabsf(A[p * n + c]) ? i : p;
    if (p != c) {
      for (long j = 0; j < n; j++) {
        const float tmp = A[c * n + j];
        A[c * n + j] = A[p * n + j], A[p * n + j] = tmp;
      }
      const float tb = b[c];
      b[c] = b[p], b[p] = tb;
    }
    const float inv = 1.0f / A[c * n + c];
    for (long i = c + 1; i < n; i++) {
      const float f = A[i * n + c] * inv;
      for (long j = c; j < n; j++) A[i * n + j] -= f * A[c * n + j];
      b[i] -= f * b[c];
    }
  }
  for (long c = n - 1; c >= 0; c--) {
    float s = b[c];
    for (long j = c + 1; j < n; j++) s -= A[c * n + j] * b[j];
    b[c] = s / A[c * n + c];
  }
}

/* The backward of hc_maps: dz [M, N] from the gradients of pre, post, res (tokens first) and the maps themselves.
   mHC's Sinkhorn: the implicit-function gradient of the exact projection, as r1.model.hc._Sinkhorn.backward:
     r, c = row, column sums of P * G;  (I - P^T P + 1 1^T + ridge) beta = c - P^T r;  alpha = r - P beta
     dz = P * (G - alpha 1^T - 1 beta^T)                                                                     */
INLINE void maps_bwd_token(const float *restrict pre, const float *restrict post, const float *restrict res,
                           const float *restrict gpre, const float *restrict gpost, const float *restrict gres,
                           float *restrict dz, const long t, const long N, const long n, const long iters) {
  const float ridge = 10.0f * 1.1920929e-07f; /* 10 fp32 eps, as in torch */
  for (long i = 0; i < n; i++) {
    const float s = pre[t * n + i], h = 0.5f * post[t * n + i];
    dz[i * N + t] = iters ? gpre[t * n + i] * s * (1.0f - s) : gpre[t * n + i];
    dz[(n + i) * N + t] = iters ? gpost[t * n + i] * 2.0f * h * (1.0f - h) : gpost[t * n + i];
  }
  const float *P = res + t * n * n, *G = gres + t * n * n;
  if (!iters) {
    for (long q = 0; q < n * n; q++) dz[(2 * n + q) * N + t] = G[q];
    return;
  }
  float r[MAX_N], c[MAX_N], A[MAX_SQ], beta[MAX_N];
  for (long i = 0; i < n; i++) r[i] = 0.0f;
  for (long j = 0; j < n; j++) c[j] = 0.0f;
  for (long i = 0; i < n; i++)
    for (long j = 0; j < n; j++) {
      const float pg = P[i * n + j] * G[i * n + j];
      r[i] += pg, c[j] += pg;
    }
  for (long a = 0; a < n; a++) {
    float s = c[a];
    for (long i = 0; i < n; i++) s -= P[i * n + a] * r[i];
    beta[a] = s;
    for (long b = 0; b < n; b++) {
      float pp = 0.0f;
      for (long i = 0; i < n; i++) pp += P[i * n + a] * P[i * n + b];
      A[a * n + b] = 1.0f - pp + (a == b ? 1.0f + ridge : 0.0f);
    }
  }
  solve_small(A, beta, n);
  for (long i = 0; i < n; i++) {
    float al = r[i];
    for (long j = 0; j < n; j++) al -= P[i * n + j] * beta[j];
    for (long j = 0; j < n; j++) dz[(2 * n + i * n + j) * N + t] = P[i * n + j] * (G[i * n + j] - al - beta[j]);
  }
}

void hc_maps_bwd(const float *restrict pre, const float *restrict post, const float *restrict res,
                 const float *restrict gpre, const float *restrict gpost, const float *restrict gres,
                 float *restrict dz, long N, long n, long iters) {
#define BODY(NN)                                                                 \
  _Pragma("omp parallel for schedule(static)") for (long t = 0; t < N; t++)      \
      maps_bwd_token(pre, post, res, gpre, gpost, gres, dz, t, N, NN, iters)
  DISPATCH_N(BODY)
#undef BODY
}
