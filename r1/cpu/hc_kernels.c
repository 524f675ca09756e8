/* Fused CPU kernels for hyper-connections (r1/cpu/hc.py; built and loaded by r1/cpu/cext.py).

Why: around each sub-block HC reads the n-times-wider stream tensor x [N, n, D] to form its maps H (an RMSNorm and a
rank-M projection, M = 2n + n^2, then sigmoids and Sinkhorn per token) and to mix it (H_pre x, H_res x), and the
backward reads it again for every gradient. torch runs that as ~10 kernels each way, batched matmuls of N tiny
matrices and skinny GEMMs ([N, nD] x [nD, 24], which MKL runs at a fifth of the CPU's peak), each a pass over x.
Here the read side is one pass over x forward (hc_read_fwd) and one backward (hc_read_bwd, plus hc_proj_wgrad for
the projection's weight gradient); the write-back, x_next = H_res x + H_post^T y, is one pass each way (hc_combine,
hc_write_bwd).

Per block of 8 tokens, the rows (a few KB each) stay in L1/L2 while every output that needs them is formed:
the projection as 4 x 24 register tiles (vector loads of W, broadcasts of x), the norm, the maps of the 8 tokens
side by side in vector lanes (Sinkhorn's chain of dependent divisions is latency-bound one token at a time), and
per token the mixing. Vectors are GCC's vector extensions (8 floats; AVX2 with -march=native, and whatever
the target has elsewhere); the build contracts a * b + c into FMAs (-ffp-contract=fast). The bodies are inlined
with n a compile-time constant for n = 2, 4, 8 (the loops over the streams unroll); other n run the same code with
n as a variable (correct, slower). Tokens are split over torch's OpenMP threads (the library links the libgomp
torch loaded). Every sum runs in a fixed order, so results do not depend on the thread count.

Layout (all fp32, contiguous, tokens first), per token t; X = n D, Mp = M rounded up to a multiple of 8:
  x, out, g_r, dx: [N, n, D]   h, y, g_h, dy: [N, D]   pre, post, dpre, dpost: [N, n]   res, dres: [N, n, n]
  nw: [X]   phi, dphi: [X, M]   w = nw phi: [X, Mp] (columns past M zero)   dwT: [Mp, X]   u, dz, gp: [N, Mp]   r: [N]
  b, a: [M] (formed from b_pre, b_post, b_res and alpha [3])   wp: [X Mp] (scratch)
*/
#include <math.h>
#include <stddef.h>

#define INLINE static inline __attribute__((always_inline))
#define MAX_N 16                               /* streams supported (cext.MAX_STREAMS; cext.fits checks it) */
#define MAX_SQ (MAX_N * MAX_N)
#define MAX_MP (2 * MAX_N + MAX_SQ)            /* M for MAX_N, a multiple of 8 */
#define TB 4                                   /* tokens per register tile: the forward's projection */
#define TBB 6                                  /* and the backward's dx (12 accumulators) */

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads and stores */
INLINE v8 ld8(const float *p) { return *(const v8u *)p; }
INLINE void st8(float *p, const v8 v) { *(v8u *)p = v; }
INLINE v8 bc8(const float a) { return (v8){a, a, a, a, a, a, a, a}; }

/* n as a constant where it is a common one: the body below unrolls over the streams */
#define DISPATCH_N(body)     \
  switch (n) {               \
    case 2: body(2); break;  \
    case 4: body(4); break;  \
    case 8: body(8); break;  \
    default: body(n); break; \
  }

/* o[d] = sum_i w[i] rows[i][d] for n rows of D floats (with n constant each row element is loaded once per D-vector) */
INLINE void weighted_sum(float *restrict o, const float *restrict w, const float *restrict rows, const long n,
                         const long D) {
#pragma omp simd
  for (long d = 0; d < D; d++) {
    float a = 0.0f;
    for (long i = 0; i < n; i++) a += w[i] * rows[i * D + d];
    o[d] = a;
  }
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

/* ---------------------------------------------------------------------------------------------- the write-back */

/* out[t,j] = sum_i res[t,j,i] x[t,i] + post[t,j] y[t]: the write-back with H_res x formed here, in one pass over x
   (the read side does not write H_res x, a second n-times-wide tensor to write and read back); D % 8 == 0 */
INLINE void combine_token(const float *restrict xt, const float *restrict res, const float *restrict post,
                          const float *restrict yt, float *restrict out, const long n, const long D) {
  for (long d = 0; d < D; d += 8) {
    v8 xi[MAX_N];
    for (long i = 0; i < n; i++) xi[i] = ld8(xt + i * D + d);
    const v8 yv = ld8(yt + d);
    for (long j = 0; j < n; j++) {
      v8 s = bc8(post[j]) * yv;
      for (long i = 0; i < n; i++) s += bc8(res[j * n + i]) * xi[i];
      st8(out + j * D + d, s);
    }
  }
}

void hc_combine(const float *restrict x, const float *restrict res, const float *restrict post,
                const float *restrict y, float *restrict out, long N, long n, long D) {
#define BODY(NN)                                                                                                  \
  _Pragma("omp parallel for schedule(static)") for (long t = 0; t < N; t++)                                       \
      combine_token(x + t * (NN) * D, res + t * (NN) * (NN), post + t * (NN), y + t * D, out + t * (NN) * D, NN, D)
  DISPATCH_N(BODY)
#undef BODY
}

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

/* ---------------------------------------------------------------------------------------------------------------
   The maps H of one token from its logits z [M] (n of H_pre, n of H_post, n*n of H_res row-major). iters > 0 (mHC):
   pre = sigmoid, post = 2 sigmoid, res = Sinkhorn-Knopp(exp(.)) with `iters` iterations and the rounding, as
   r1.model.hc.sinkhorn does in torch; iters = 0 (HC): the logits as they are. The n x n matrix lives on the stack. */

INLINE float sigmoidf_(float v) { return 1.0f / (1.0f + __builtin_expf(-v)); }

#define LN 8 /* tokens whose maps run side by side, one per vector lane */
#define LANES for (int l = 0; l < LN; l++) /* the lane loop: GCC vectorises it (fixed count, contiguous) */

/* Sinkhorn for LN tokens at once: k[q][l] is entry q (row-major [n, n]) of token l. Per token the same map as
   r1.model.hc.sinkhorn: a log-domain row and column normalisation, iters - 1 plain iterations, the rounding. Why
   lanes: one token's iterations are a chain of dependent adds and divisions (latency-bound, ~2 us a token); eight
   tokens side by side fill the vector units. zc: the logits, for the rare column the fast first step cannot do. */
INLINE void sinkhorn_lanes(float (*restrict k)[LN], const long n, const long iters) {
  float zc[MAX_SQ][LN], mx[MAX_N][LN], sr[MAX_N][LN], s[LN];
  /* rows: exp(log_softmax_j z) = e / sum_j e with e = exp(z - max_j z) in (0, 1] */
  for (long i = 0; i < n; i++) {
    LANES mx[i][l] = k[i * n][l];
    for (long j = 1; j < n; j++) LANES mx[i][l] = fmaxf(mx[i][l], k[i * n + j][l]);
    LANES sr[i][l] = 0.0f;
    for (long j = 0; j < n; j++)
      for (int l = 0; l < LN; l++) {
        zc[i * n + j][l] = k[i * n + j][l];
        sr[i][l] += (k[i * n + j][l] = expf(k[i * n + j][l] - mx[i][l]));
      }
    for (long j = 0; j < n; j++) LANES k[i * n + j][l] /= sr[i][l];
  }
  /* columns: softmax over i of the log_softmax above = k / sum_i k, the same number as torch's exp(L - max_i L) /
     sum, unless every entry of the column underflowed: then in the log domain, L = z - max_j z - log sum_j e */
  for (long j = 0; j < n; j++) {
    LANES s[l] = 0.0f;
    for (long i = 0; i < n; i++) LANES s[l] += k[i * n + j][l];
    for (int l = 0; l < LN; l++)
      if (!(s[l] >= 1e-30f)) {
        float L[MAX_N], top = -INFINITY, t = 0.0f;
        for (long i = 0; i < n; i++) top = fmaxf(top, L[i] = zc[i * n + j][l] - mx[i][l] - logf(sr[i][l]));
        for (long i = 0; i < n; i++) t += (k[i * n + j][l] = expf(L[i] - top));
        s[l] = t;
      }
    for (long i = 0; i < n; i++) LANES k[i * n + j][l] /= s[l];
  }
  for (long it = 1; it < iters; it++) { /* times the reciprocal: one division a row / column (torch: n), ~1 ulp */
    for (long i = 0; i < n; i++) {
      LANES s[l] = 0.0f;
      for (long j = 0; j < n; j++) LANES s[l] += k[i * n + j][l];
      LANES s[l] = 1.0f / s[l];
      for (long j = 0; j < n; j++) LANES k[i * n + j][l] *= s[l];
    }
    for (long j = 0; j < n; j++) {
      LANES s[l] = 0.0f;
      for (long i = 0; i < n; i++) LANES s[l] += k[i * n + j][l];
      LANES s[l] = 1.0f / s[l];
      for (long i = 0; i < n; i++) LANES k[i * n + j][l] *= s[l];
    }
  }
  /* the rounding (Altschuler, Weed, Rigollet 2017, Alg. 2): exactly doubly stochastic */
  float r[MAX_N][LN], c[MAX_N][LN], rs[LN];
  for (long i = 0; i < n; i++) {
    LANES s[l] = 0.0f;
    for (long j = 0; j < n; j++) LANES s[l] += k[i * n + j][l];
    LANES s[l] = fmaxf(s[l], 1.0f);
    for (long j = 0; j < n; j++) LANES k[i * n + j][l] /= s[l];
  }
  for (long j = 0; j < n; j++) {
    LANES s[l] = 0.0f;
    for (long i = 0; i < n; i++) LANES s[l] += k[i * n + j][l];
    LANES s[l] = fmaxf(s[l], 1.0f);
    for (long i = 0; i < n; i++) LANES k[i * n + j][l] /= s[l];
  }
  LANES rs[l] = 0.0f;
  for (long i = 0; i < n; i++) {
    LANES s[l] = 0.0f;
    for (long j = 0; j < n; j++) LANES s[l] += k[i * n + j][l];
    LANES r[i][l] = fmaxf(1.0f - s[l], 0.0f);
    LANES rs[l] += r[i][l];
  }
  for (long j = 0; j < n; j++) {
    LANES s[l] = 0.0f;
    for (long i = 0; i < n; i++) LANES s[l] += k[i * n + j][l];
    LANES c[j][l] = fmaxf(1.0f - s[l], 0.0f);
  }
  LANES rs[l] = fmaxf(rs[l], 1e-12f);
  for (long i = 0; i < n; i++)
    for (long j = 0; j < n; j++) LANES k[i * n + j][l] += r[i][l] * c[j][l] / rs[l];
}

/* The maps for LN tokens, in place: z[m][l] = token l's logit m (n of H_pre, n of H_post, n*n of H_res row-major)
   on entry, its H on return. iters > 0 (mHC): pre = sigmoid, post = 2 sigmoid, res = Sinkhorn-Knopp(exp(.)) with
   `iters` iterations and the rounding, as r1.model.hc.sinkhorn does in torch; iters = 0 (HC): the logits as they are. */
INLINE void maps_lanes(float (*restrict z)[LN], const long n, const long iters) {
  if (!iters) return;
  for (long i = 0; i < n; i++) LANES z[i][l] = sigmoidf_(z[i][l]);
  for (long i = n; i < 2 * n; i++) LANES z[i][l] = 2.0f * sigmoidf_(z[i][l]);
  sinkhorn_lanes(z + 2 * n, n, iters);
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

/* The maps' backward for one token: dz [M] from the gradients of pre, post, res and the maps themselves.
   mHC's Sinkhorn: the implicit-function gradient of the exact projection, as r1.model.hc._Sinkhorn.backward:
     r, c = row, column sums of P * G;  (I - P^T P + 1 1^T + ridge) beta = c - P^T r;  alpha = r - P beta
     dz = P * (G - alpha 1^T - 1 beta^T)                                                                     */
INLINE void maps_bwd_token(const float *restrict pre, const float *restrict post, const float *restrict P,
                           const float *restrict gpre, const float *restrict gpost, const float *restrict G,
                           float *restrict dz, const long n, const long iters) {
  const float ridge = 10.0f * 1.1920929e-07f; /* 10 fp32 eps, as in torch */
  for (long i = 0; i < n; i++) {
    const float s = pre[i], h = 0.5f * post[i];
    dz[i] = iters ? gpre[i] * s * (1.0f - s) : gpre[i];
    dz[n + i] = iters ? gpost[i] * 2.0f * h * (1.0f - h) : gpost[i];
  }
  if (!iters) {
    for (long q = 0; q < n * n; q++) dz[2 * n + q] = G[q];
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
    for (long j = 0; j < n; j++) dz[2 * n + i * n + j] = P[i * n + j] * (G[i * n + j] - al - beta[j]);
  }
}

/* ---------------------------------------------------------------------------------------------------------------
   The read side, forward (r1/cpu/hc.py, _FusedRead), per token t:
     r = rsqrt(sum_k x[t,k]^2 / X + eps),  u = r x[t] w,  z = b + a u (HC: b + a tanh u),  (pre, post, res) = maps(z)
     h[t] = sum_i pre[t,i] x[t,i]   (H_res x is formed by hc_combine, with the write-back)                         */

/* p[i Mp + m0 + c] = sum_k xrow[i][k] w[k Mp + m0 + c] for the TB rows and the 8 VB columns from m0: TB VB
   accumulators in registers, per k VB vector loads of w (a row of w is contiguous) and TB broadcasts of x */
INLINE void proj_tile(const float *const *xrow, const float *restrict w, float *restrict p, const long X,
                      const long Mp, const long m0, const int VB) {
  v8 acc[TB][3];
  for (int i = 0; i < TB; i++)
    for (int j = 0; j < VB; j++) acc[i][j] = bc8(0.0f);
  for (long k = 0; k < X; k++) {
    v8 wv[3];
    for (int j = 0; j < VB; j++) wv[j] = ld8(w + k * Mp + m0 + 8 * j);
    for (int i = 0; i < TB; i++) {
      const v8 bx = bc8(xrow[i][k]);
      for (int j = 0; j < VB; j++) acc[i][j] += bx * wv[j];
    }
  }
  for (int i = 0; i < TB; i++)
    for (int j = 0; j < VB; j++) st8(p + i * Mp + m0 + 8 * j, acc[i][j]);
}

INLINE float sumsq(const float *restrict v, const long X) {
  v8 acc[4] = {bc8(0.0f), bc8(0.0f), bc8(0.0f), bc8(0.0f)}; /* four sums in flight: the adds' latency */
  long k = 0;
  for (; k + 32 <= X; k += 32)
    for (int q = 0; q < 4; q++) {
      const v8 e = ld8(v + k + 8 * q);
      acc[q] += e * e;
    }
  for (; k + 8 <= X; k += 8) {
    const v8 e = ld8(v + k);
    acc[0] += e * e;
  }
  const v8 s8 = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float s = 0.0f;
  for (int l = 0; l < 8; l++) s += s8[l];
  for (; k < X; k++) s += v[k] * v[k];
  return s;
}

INLINE void read_fwd_block(const float *restrict x, const float *restrict w, const float *restrict b,
                           const float *restrict a, float *restrict h, float *restrict pre, float *restrict post,
                           float *restrict res, float *restrict u, float *restrict r, const float eps, const long t0, const long N, const long n, const long D,
                           const long iters) {
  const long X = n * D, M = 2 * n + n * n, Mp = (M + 7) / 8 * 8;
  const float *xrow[LN];
  for (int i = 0; i < LN; i++) xrow[i] = x + (t0 + i < N ? t0 + i : N - 1) * X; /* past N: a row again, not stored */
  float p[LN * MAX_MP], z[MAX_MP][LN];
  for (int half = 0; half < LN; half += TB) {
    long m0 = 0;
    for (; m0 + 24 <= Mp; m0 += 24) proj_tile(xrow + half, w, p + half * Mp, X, Mp, m0, 3);
    if (Mp - m0 == 16) proj_tile(xrow + half, w, p + half * Mp, X, Mp, m0, 2);
    if (Mp - m0 == 8) proj_tile(xrow + half, w, p + half * Mp, X, Mp, m0, 1);
  }
  for (int i = 0; i < LN; i++) {
    const float rt = 1.0f / sqrtf(sumsq(xrow[i], X) / (float)X + eps);
    for (long m = 0; m < M; m++) {
      const float v = p[i * Mp + m] * rt;
      if (t0 + i < N) u[(t0 + i) * Mp + m] = v;
      z[m][i] = b[m] + a[m] * (iters ? v : tanhf(v));
    }
    if (t0 + i < N) {
      r[t0 + i] = rt;
      for (long m = M; m < Mp; m++) u[(t0 + i) * Mp + m] = 0.0f;
    }
  }
  maps_lanes(z, n, iters);
  for (long i = 0; i < LN && t0 + i < N; i++) {
    const long t = t0 + i;
    for (long q = 0; q < n; q++) pre[t * n + q] = z[q][i], post[t * n + q] = z[n + q][i];
    for (long q = 0; q < n * n; q++) res[t * n * n + q] = z[2 * n + q][i];
    weighted_sum(h + t * D, pre + t * n, xrow[i], n, D); /* the row in L1/L2 still */
  }
}

/* The parameters as they are: nw [X] (the RMSNorm weight), phi [X, M], b_pre, b_post [n], b_res [n, n], alpha [3];
   w = nw phi (padded to Mp columns, in wbuf), b and a (alpha per row of z) are formed here. */
/* which alpha (0: pre, 1: post, 2: res) scales row m of z */
INLINE int alpha_of(const long m, const long n) { return m < n ? 0 : m < 2 * n ? 1 : 2; }

INLINE void bias_alpha(const float *restrict b_pre, const float *restrict b_post, const float *restrict b_res,
                       const float *restrict alpha, float *restrict b, float *restrict a, const long n) {
  for (long m = 0; m < 2 * n + n * n; m++) {
    b[m] = m < n ? b_pre[m] : m < 2 * n ? b_post[m - n] : b_res[m - 2 * n];
    a[m] = alpha[alpha_of(m, n)];
  }
}

void hc_read_fwd(const float *restrict x, const float *restrict nw, const float *restrict phi,
                 const float *restrict b_pre, const float *restrict b_post, const float *restrict b_res,
                 const float *restrict alpha, float *restrict wbuf, float *restrict h, float *restrict pre,
                 float *restrict post, float *restrict res, float *restrict u, float *restrict r, const float eps,
                 long N, long n, long D, long iters) {
  const long X = n * D, M = 2 * n + n * n, Mp = (M + 7) / 8 * 8;
  float b[MAX_MP], a[MAX_MP];
  bias_alpha(b_pre, b_post, b_res, alpha, b, a, n);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (long k = 0; k < X; k++)
      for (long m = 0; m < Mp; m++) wbuf[k * Mp + m] = m < M ? nw[k] * phi[k * M + m] : 0.0f;
#define BODY(NN)                                                                                                 \
  _Pragma("omp for schedule(static)") for (long t0 = 0; t0 < N; t0 += LN)                                       \
      read_fwd_block(x, wbuf, b, a, h, pre, post, res, u, r, eps, t0, N, NN, D, iters)
    DISPATCH_N(BODY)
#undef BODY
  }
}

/* ---------------------------------------------------------------------------------------------------------------
   The read side, backward, per token t (g_h, g_r, g_post: the gradients of h, xr, post; dx formed once):
     dpre[i] = <g_h, x[t,i]>,  dres[j,i] = <g_r[t,j], x[t,i]>,  dz = maps' backward (dpre, g_post, dres)
     g_u = a dz (HC: a dz (1 - tanh^2 u)),  gp = r g_u,  coef = -(r^2 / X) sum_m g_u[m] u[m]
     dx[t,i] = sum_m gp[m] w[i,:,m] + pre[t,i] g_h[t] + sum_j res[t,j,i] g_r[t,j] + coef x[t,i]
   Per token, the dot products and the mixing's part of dx come from one read of its rows (mix_bwd_token); then
   the projection's and the norm's terms are added, one store (dx_tile).
   The projection's term is a TBB x 16 register tile over the M rows of w, which hc_read_bwd first packs into wp in
   8-column panels (wp[k/8][m][8]: each panel's M x 8 floats contiguous; the rows of w^T lie X floats apart, and
   24 such streams alias in L1). The sums over tokens run in token order, each on one thread, so that none depends on
   the thread count: db = sum_t dz and da = sum_t dz u (HC: tanh u) per row of z after the token loop, and
   dw = x^T gp in hc_proj_wgrad.                                     */

INLINE float hsum8(const v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

/* One token's mixing backward from one read of its rows: dpre[s] = <g_h, x[s]>, dres[j,s] = <g_r[j], x[s]>, and the
   mixing's part of dx, dx[s] = pre[s] g_h + sum_j res[j,s] g_r[j], written for dx_tile to complete (D % 8 == 0) */
INLINE void mix_bwd_token(const float *restrict xt, const float *restrict ght, const float *restrict grt,
                          const float *restrict pre, const float *restrict res, float *restrict dpre,
                          float *restrict dres, float *restrict dxt, const long n, const long D) {
  for (long s = 0; s < n; s++) {
    v8 acc[MAX_N + 1];
    for (long q = 0; q <= n; q++) acc[q] = bc8(0.0f);
    for (long d = 0; d < D; d += 8) {
      const v8 xv = ld8(xt + s * D + d), gv = ld8(ght + d);
      v8 m = bc8(pre[s]) * gv;
      acc[0] += gv * xv;
      for (long j = 0; j < n; j++) {
        const v8 rv = ld8(grt + j * D + d);
        acc[1 + j] += rv * xv;
        m += bc8(res[j * n + s]) * rv;
      }
      st8(dxt + s * D + d, m);
    }
    dpre[s] = hsum8(acc[0]);
    for (long j = 0; j < n; j++) dres[j * n + s] = hsum8(acc[1 + j]);
  }
}

/* dx[t, k] += sum_m g[t, m] w[k, m] + coef[t] x[t, k] for the block's tokens and 8 KV columns from k0: the
   projection's and the norm's terms on top of the mixing's (mix_bwd_token), one store */
INLINE void dx_tile(const float *restrict wp, const float *restrict g, const float *restrict coef,
                    const float *restrict x, float *restrict dx, const long t0, const long N, const long k0,
                    const long X, const long M, const long Mp, const int KV) {
  v8 acc[TBB][2];
  for (int i = 0; i < TBB; i++)
    for (int j = 0; j < KV; j++) acc[i][j] = bc8(0.0f);
  for (long m = 0; m < M; m++) {
    v8 wv[2];
    for (int j = 0; j < KV; j++) wv[j] = ld8(wp + ((k0 / 8 + j) * M + m) * 8);
    for (int i = 0; i < TBB; i++) {
      const v8 bg = bc8(g[i * Mp + m]);
      for (int j = 0; j < KV; j++) acc[i][j] += bg * wv[j];
    }
  }
  for (long i = 0; i < TBB && t0 + i < N; i++)
    for (int j = 0; j < KV; j++) {
      float *o = dx + (t0 + i) * X + k0 + 8 * j;
      st8(o, ld8(o) + acc[i][j] + bc8(coef[i]) * ld8(x + (t0 + i) * X + k0 + 8 * j));
    }
}

INLINE void read_bwd_block(const float *restrict x, const float *restrict wp, const float *restrict r,
                           const float *restrict u, const float *restrict pre, const float *restrict post,
                           const float *restrict res, const float *restrict a, const float *restrict gh,
                           const float *restrict gr, const float *restrict gpost, float *restrict dx,
                           float *restrict dz, float *restrict dzd, float *restrict gp, const long t0,
                           const long N, const long n, const long D, const long iters) {
  const long X = n * D, M = 2 * n + n * n, Mp = (M + 7) / 8 * 8;
  float g[TBB * MAX_MP], coef[TBB];
  for (long i = 0; i < TBB; i++) {
    const long t = t0 + i;
    if (t >= N) { /* a row past the end: no gradient, nothing stored */
      for (long m = 0; m < Mp; m++) g[i * Mp + m] = 0.0f;
      coef[i] = 0.0f;
      continue;
    }
    float dpre[MAX_N], dres[MAX_SQ], dzt[MAX_MP];
    mix_bwd_token(x + t * X, gh + t * D, gr + t * X, pre + t * n, res + t * n * n, dpre, dres, dx + t * X, n, D);
    maps_bwd_token(pre + t * n, post + t * n, res + t * n * n, dpre, gpost + t * n, dres, dzt, n, iters);
    const float rt = r[t];
    float s = 0.0f;
    for (long m = 0; m < Mp; m++) {
      float gu = 0.0f;
      if (m < M) {
        const float v = u[t * Mp + m], th = iters ? 0.0f : tanhf(v);
        gu = a[m] * dzt[m] * (iters ? 1.0f : 1.0f - th * th);
        s += gu * v;
        dz[t * Mp + m] = dzt[m];
        dzd[t * Mp + m] = dzt[m] * (iters ? v : th); /* dz dyn: for alpha's gradient */
      }
      g[i * Mp + m] = gp[t * Mp + m] = gu * rt;
    }
    coef[i] = -rt * rt * s / (float)X;
  }
  long k0 = 0;
  for (; k0 + 16 <= X; k0 += 16) dx_tile(wp, g, coef, x, dx, t0, N, k0, X, M, Mp, 2);
  if (k0 < X) dx_tile(wp, g, coef, x, dx, t0, N, k0, X, M, Mp, 1);
}

void hc_read_bwd(const float *restrict x, const float *restrict nw, const float *restrict phi,
                 const float *restrict alpha, float *restrict wp, const float *restrict r, const float *restrict u,
                 const float *restrict pre, const float *restrict post, const float *restrict res,
                 const float *restrict gh, const float *restrict gr, const float *restrict gpost, float *restrict dx,
                 float *restrict dz, float *restrict dzd, float *restrict gp, float *restrict db,
                 float *restrict dalpha, long N, long n, long D, long iters) {
  const long X = n * D, M = 2 * n + n * n, Mp = (M + 7) / 8 * 8;
  float a[MAX_MP], da[MAX_MP];
  for (long m = 0; m < M; m++) a[m] = alpha[alpha_of(m, n)];
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (long k = 0; k < X; k++) /* the panels of w = nw phi: wp[k/8][m][k%8] = w[k][m] */
      for (long m = 0; m < M; m++) wp[((k / 8) * M + m) * 8 + k % 8] = nw[k] * phi[k * M + m];
#define BODY(NN)                                                                                                 \
  _Pragma("omp for schedule(static)") for (long t0 = 0; t0 < N; t0 += TBB)                                       \
      read_bwd_block(x, wp, r, u, pre, post, res, a, gh, gr, gpost, dx, dz, dzd, gp, t0, N, NN, D, iters)
    DISPATCH_N(BODY)
#undef BODY
#pragma omp for schedule(static)
    for (long m = 0; m < M; m++) { /* the biases' and alphas' sums over the tokens, each in token order */
      float sb = 0.0f, sa = 0.0f;
      for (long t = 0; t < N; t++) sb += dz[t * Mp + m], sa += dzd[t * Mp + m];
      db[m] = sb, da[m] = sa;
    }
  }
  for (int q = 0; q < 3; q++) dalpha[q] = 0.0f;
  for (long m = 0; m < M; m++) dalpha[alpha_of(m, n)] += da[m];
}

/* dw^T[m, k] = sum_t x[t, k] gp[t, m] (dwT [Mp, X], scratch), then the parameters' gradients through w = nw phi:
   dphi[k, m] = nw[k] dw[k, m], dnw[k] = sum_m phi[k, m] dw[k, m]. Each thread owns 16-column panels of x (k; the
   same ones for every token block: schedule(static) over the same bounds) and sums over the tokens in order. The
   tokens go in blocks of 64, all of a thread's panels per block: a block's rows are read as contiguous runs (a
   panel-at-a-time sweep over all tokens touches a new 4 KB page per token, with no prefetching and a TLB miss
   each). A 6 x 16 register tile: per token two vector loads of x and six broadcasts of gp. */
void hc_proj_wgrad(const float *restrict x, const float *restrict gp, const float *restrict nw,
                   const float *restrict phi, float *restrict dwT, float *restrict dphi, float *restrict dnw, long N,
                   long n, long D) {
  const long X = n * D, M = 2 * n + n * n, Mp = (M + 7) / 8 * 8, P = (X + 15) / 16; /* the last panel may be 8 wide */
#pragma omp parallel
  {
    for (long tb = 0; tb < N; tb += 64) {
      const long te = tb + 64 < N ? tb + 64 : N;
#pragma omp for schedule(static) nowait
      for (long c = 0; c < P; c++) {
        const long k0 = 16 * c;
        const int KV = k0 + 16 <= X ? 2 : 1;
        for (long m0 = 0; m0 < Mp; m0 += 6) {
          const long mb = Mp - m0 < 6 ? Mp - m0 : 6;
          v8 acc[6][2];
          for (long j = 0; j < mb; j++)
            for (int q = 0; q < KV; q++) acc[j][q] = tb ? ld8(dwT + (m0 + j) * X + k0 + 8 * q) : bc8(0.0f);
          if (mb == 6 && KV == 2) /* the common case, fully unrolled */
            for (long t = tb; t < te; t++) {
              const v8 x0 = ld8(x + t * X + k0), x1 = ld8(x + t * X + k0 + 8);
              for (int j = 0; j < 6; j++) {
                const v8 bg = bc8(gp[t * Mp + m0 + j]);
                acc[j][0] += bg * x0;
                acc[j][1] += bg * x1;
              }
            }
          else
            for (long t = tb; t < te; t++)
              for (long j = 0; j < mb; j++)
                for (int q = 0; q < KV; q++) acc[j][q] += bc8(gp[t * Mp + m0 + j]) * ld8(x + t * X + k0 + 8 * q);
          for (long j = 0; j < mb; j++)
            for (int q = 0; q < KV; q++) st8(dwT + (m0 + j) * X + k0 + 8 * q, acc[j][q]);
        }
      }
    }
#pragma omp for schedule(static)
    for (long c = 0; c < P; c++) /* the same panels, so no barrier was needed before this loop */
      for (long k = 16 * c; k < X && k < 16 * c + 16; k++) {
        float s = 0.0f;
        for (long m = 0; m < M; m++) {
          const float dw = dwT[m * X + k];
          s += phi[k * M + m] * dw;
          dphi[k * M + m] = nw[k] * dw;
        }
        dnw[k] = s;
      }
  }
}
