/* Gradient Centralization in one pass over memory: for every row (output unit) of every gradient, sum the
 * row, then subtract its mean while the row is still in L1/L2. Eager PyTorch needs two operator calls per
 * tensor (mean, then subtract), i.e. two reads of each gradient from memory; this reads it once.
 *
 * Plain C with no PyTorch headers, so that it compiles in a fraction of a second with the system compiler
 * (see build.py) and is called through ctypes. Jobs are described by parallel arrays; a zero gradient
 * pointer skips a job. Sums accumulate in double (32 lanes, four independent chains; half precision in
 * float32 lanes within chunks of 256 entries, in double across chunks), the mean is rounded once to float32 (kept in double for
 * float64), and each entry is rounded once into its dtype: the eager route's result up to summation order.
 * Rows are split across threads by element count; every row is done by one thread in a fixed order, so
 * results do not depend on the number of threads.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define LGC_ABI_VERSION 2
#define LGC_MAX_THREADS 256

enum { LGC_FLOAT32 = 0, LGC_FLOAT64 = 1, LGC_BFLOAT16 = 2, LGC_FLOAT16 = 3 };

typedef struct {
  int64_t jobs;
  const int64_t *grad;       /* address of each gradient's first row; 0: skip the job */
  const int64_t *weight;     /* address of the parameter (same layout), or 0: no weight-decay compensation */
  const int64_t *rows;       /* output units */
  const int64_t *cols;       /* contiguous entries per unit */
  const int64_t *row_stride; /* entries between the starts of consecutive units */
  const int32_t *dtype;
  const double *coefficient; /* per job: the weight mean's coefficient (decay times loss scale) */
  int64_t first, last;       /* this thread's share: entries [first, last) of all rows laid end to end */
  int want_grad_sq;          /* also sum the squares of the gradients before GC */
  double removed_sq;         /* out: squared norm of the gradient means removed by this thread */
  double grad_sq;            /* out: squared norm of this thread's rows before GC (if want_grad_sq) */
} lgc_work;

#if defined(__F16C__)
#include <immintrin.h>
#define LGC_HAS_FLOAT16 1
#elif defined(__aarch64__)
#define LGC_HAS_FLOAT16 1
typedef __fp16 lgc_half;
#else
#define LGC_HAS_FLOAT16 0 /* x86 without F16C converts one entry at a time in software: the eager route is faster */
#endif

#define LGC_CHUNK 256 /* half-precision rows are converted this many entries at a time, in L1 */

static inline float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t float_to_bf16(float f) { /* nearest even as c10; NaNs quieted */
  uint32_t bits;
  memcpy(&bits, &f, 4);
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  uint32_t quiet = (bits >> 16) | 0x40u;
  return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* bfloat16 is float32 with the low half cut off: both conversions are shifts the compiler vectorizes in
 * place, so its rows need no float32 staging. Sums run in 16 float32 lanes within chunks of LGC_CHUNK
 * entries (exact for all but extreme spreads of magnitude: 8-bit significands, 16 terms per lane), chunk
 * sums in float64. */
static double sum_bfloat16(const uint16_t *row, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; i += LGC_CHUNK) {
    int64_t m = n - i < LGC_CHUNK ? n - i : LGC_CHUNK;
    float lane[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= m; k += 16)
      for (int l = 0; l < 16; ++l) lane[l] += bf16_to_float(row[i + k + l]);
    double chunk = 0.0;
    for (int l = 0; l < 16; ++l) chunk += lane[l];
    for (; k < m; ++k) chunk += bf16_to_float(row[i + k]);
    total += chunk;
  }
  return total;
}

static void subtract_bfloat16(uint16_t *row, int64_t n, float shift) {
  for (int64_t i = 0; i < n; ++i) row[i] = float_to_bf16(bf16_to_float(row[i]) - shift);
}

#if LGC_HAS_FLOAT16 && !defined(__F16C__)
static void load_float16(const uint16_t *in, float *out, int64_t n) {
  const lgc_half *half = (const lgc_half *)in;
  for (int64_t i = 0; i < n; ++i) out[i] = (float)half[i];
}

static void store_float16(const float *in, uint16_t *out, int64_t n) {
  lgc_half *half = (lgc_half *)out;
  for (int64_t i = 0; i < n; ++i) half[i] = (lgc_half)in[i];
}
#endif

/* 32 double lanes: four independent chains of 8 (one AVX-512 register each, two AVX2 registers), so the
 * additions' latency overlaps instead of bounding the loop (8 lanes ran at 41 GB/s on rows in cache). */
#define LGC_LANES 32
#define LGC_SUM(NAME, TYPE)                                                                                \
  static double NAME(const TYPE *row, int64_t n) {                                                       \
    double lane[LGC_LANES] = {0};                                                                        \
    int64_t i = 0;                                                                                       \
    for (; i + LGC_LANES <= n; i += LGC_LANES)                                                           \
      for (int k = 0; k < LGC_LANES; ++k) lane[k] += (double)row[i + k];                                 \
    for (int k = 0; k < 16; ++k) lane[k] += lane[k + 16];                                                \
    for (int k = 0; k < 8; ++k) lane[k] += lane[k + 8];                                                  \
    for (; i + 8 <= n; i += 8)                                                                           \
      for (int k = 0; k < 8; ++k) lane[k] += (double)row[i + k];                                         \
    double total = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])); \
    for (; i < n; ++i) total += (double)row[i];                                                          \
    return total;                                                                                        \
  }

LGC_SUM(sum_float32, float)
LGC_SUM(sum_float64, double)

#if defined(__F16C__)
/* float16 on x86: F16C converts 8 entries per instruction, straight from and to the row; 16 float32 lanes
 * (two registers) within chunks of LGC_CHUNK entries, chunk sums in float64, as for bfloat16. */
static double sum_float16(const uint16_t *row, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; i += LGC_CHUNK) {
    int64_t m = n - i < LGC_CHUNK ? n - i : LGC_CHUNK;
    __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= m; k += 16) {
      low = _mm256_add_ps(low, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i + k))));
      high = _mm256_add_ps(high, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i + k + 8))));
    }
    float lane[8];
    _mm256_storeu_ps(lane, _mm256_add_ps(low, high));
    double chunk = ((double)lane[0] + lane[4]) + ((double)lane[1] + lane[5]) + ((double)lane[2] + lane[6]) +
                   ((double)lane[3] + lane[7]);
    for (; k < m; ++k) chunk += _cvtsh_ss(row[i + k]);
    total += chunk;
  }
  return total;
}

static void subtract_float16(uint16_t *row, int64_t n, float shift) {
  __m256 by = _mm256_set1_ps(shift);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 value = _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + i))), by);
    _mm_storeu_si128((__m128i *)(row + i), _mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) row[i] = _cvtss_sh(_cvtsh_ss(row[i]) - shift, _MM_FROUND_TO_NEAREST_INT);
}
#elif LGC_HAS_FLOAT16
/* float16 on ARM: converted a chunk at a time into float32 in L1. */
static double sum_float16(const uint16_t *row, int64_t n) {
  float chunk[LGC_CHUNK];
  double total = 0.0;
  for (int64_t i = 0; i < n; i += LGC_CHUNK) {
    int64_t m = n - i < LGC_CHUNK ? n - i : LGC_CHUNK;
    load_float16(row + i, chunk, m);
    total += sum_float32(chunk, m);
  }
  return total;
}

static void subtract_float16(uint16_t *row, int64_t n, float shift) {
  float chunk[LGC_CHUNK];
  for (int64_t i = 0; i < n; i += LGC_CHUNK) {
    int64_t m = n - i < LGC_CHUNK ? n - i : LGC_CHUNK;
    load_float16(row + i, chunk, m);
    for (int64_t k = 0; k < m; ++k) chunk[k] -= shift;
    store_float16(chunk, row + i, m);
  }
}
#endif

/* Sums of squares of one row in double, for the gradient norm of diagnostics, read while the row is in
 * cache; 32 lanes in four independent chains, as LGC_SUM. */
#define LGC_SQUARE_SUM(NAME, TYPE)                                                                         \
  static double NAME(const TYPE *row, int64_t n) {                                                       \
    double lane[LGC_LANES] = {0};                                                                        \
    int64_t i = 0;                                                                                       \
    for (; i + LGC_LANES <= n; i += LGC_LANES)                                                           \
      for (int k = 0; k < LGC_LANES; ++k) lane[k] += (double)row[i + k] * (double)row[i + k];            \
    for (int k = 0; k < 16; ++k) lane[k] += lane[k + 16];                                                \
    for (int k = 0; k < 8; ++k) lane[k] += lane[k + 8];                                                  \
    double total = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])); \
    for (; i < n; ++i) total += (double)row[i] * (double)row[i];                                         \
    return total;                                                                                        \
  }

LGC_SQUARE_SUM(square_sum_float32, float)
LGC_SQUARE_SUM(square_sum_float64, double)

static double square_sum(const void *row, int64_t n, int32_t dtype) {
  if (dtype == LGC_FLOAT64) return square_sum_float64(row, n);
  if (dtype == LGC_FLOAT32) return square_sum_float32(row, n);
  double lane[8] = {0};
  int64_t i = 0;
  if (dtype == LGC_BFLOAT16) {
    const uint16_t *g = row;
    for (; i < n; ++i) {
      double v = bf16_to_float(g[i]);
      lane[i & 7] += v * v;
    }
#if LGC_HAS_FLOAT16
  } else if (dtype == LGC_FLOAT16) {
    float chunk[LGC_CHUNK];
    const uint16_t *g = row;
    for (; i < n; i += LGC_CHUNK) {
      int64_t m = n - i < LGC_CHUNK ? n - i : LGC_CHUNK;
#if defined(__F16C__)
      for (int64_t k = 0; k < m; ++k) chunk[k] = _cvtsh_ss(g[i + k]);
#else
      load_float16(g + i, chunk, m);
#endif
      for (int64_t k = 0; k < m; ++k) lane[k & 7] += (double)chunk[k] * (double)chunk[k];
    }
#endif
  }
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

/* Centralize one row; return its gradient mean (in the accumulation precision: float32, float64 for float64). */
static double centralize_row(void *grad, const void *weight, int64_t n, int32_t dtype, double coefficient) {
  if (dtype == LGC_FLOAT64) {
    double *g = grad;
    double mean = sum_float64(g, n) / (double)n;
    double shift = weight ? mean + coefficient * (sum_float64(weight, n) / (double)n) : mean;
    for (int64_t i = 0; i < n; ++i) g[i] -= shift;
    return mean;
  }
  if (dtype == LGC_FLOAT32) {
    float *g = grad;
    float mean = (float)(sum_float32(g, n) / (double)n);
    float shift = weight ? (float)((double)mean + coefficient * (sum_float32(weight, n) / (double)n)) : mean;
    for (int64_t i = 0; i < n; ++i) g[i] -= shift;
    return mean;
  }
  if (dtype == LGC_BFLOAT16) {
    float mean = (float)(sum_bfloat16(grad, n) / (double)n);
    float shift = weight ? (float)((double)mean + coefficient * (sum_bfloat16(weight, n) / (double)n)) : mean;
    subtract_bfloat16(grad, n, shift);
    return mean;
  }
#if LGC_HAS_FLOAT16
  if (dtype == LGC_FLOAT16) {
    float mean = (float)(sum_float16(grad, n) / (double)n);
    float shift = weight ? (float)((double)mean + coefficient * (sum_float16(weight, n) / (double)n)) : mean;
    subtract_float16(grad, n, shift);
    return mean;
  }
#endif
  return 0.0;
}

static int64_t element_size(int32_t dtype) {
  return dtype == LGC_FLOAT64 ? 8 : dtype == LGC_FLOAT32 ? 4 : 2;
}

static void *run_share(void *arg) {
  lgc_work *work = arg;
  int64_t offset = 0; /* entries of all earlier jobs' rows */
  double removed_sq = 0.0, grad_sq = 0.0;
  for (int64_t j = 0; j < work->jobs && offset < work->last; ++j) {
    int64_t rows = work->rows[j], cols = work->cols[j];
    int64_t size = rows * cols;
    if (work->grad[j] != 0 && cols > 0 && offset + size > work->first) {
      /* the rows whose first entry lies in [first, last) */
      int64_t begin = work->first > offset ? (work->first - offset + cols - 1) / cols : 0;
      int64_t end = (work->last - offset + cols - 1) / cols;
      if (end > rows) end = rows;
      int64_t step = work->row_stride[j] * element_size(work->dtype[j]);
      char *grad = (char *)(intptr_t)work->grad[j];
      const char *weight = (const char *)(intptr_t)work->weight[j];
      for (int64_t r = begin; r < end; ++r) {
        if (work->want_grad_sq) grad_sq += square_sum(grad + r * step, cols, work->dtype[j]);
        double mean = centralize_row(grad + r * step, weight ? weight + r * step : 0, cols, work->dtype[j],
                                     work->coefficient[j]);
        removed_sq += mean * mean * (double)cols;
      }
    }
    offset += size;
  }
  work->removed_sq = removed_sq;
  work->grad_sq = grad_sq;
  return 0;
}

#ifdef _OPENMP
/* OpenMP, when the compiler has it: the library then binds to the libgomp that PyTorch has already loaded
 * (same soname), so its threads are ATen's own pool instead of a second set competing for the cores while
 * ATen's workers spin between parallel regions. */
static void run_shares(lgc_work *work, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t t = 0; t < threads; ++t) run_share(&work[t]);
}
#else
/* A share whose thread cannot be started is done on the calling thread. */
static void run_shares(lgc_work *work, int64_t threads) {
  pthread_t handle[LGC_MAX_THREADS];
  int started[LGC_MAX_THREADS];
  for (int64_t t = 1; t < threads; ++t) started[t] = pthread_create(&handle[t], 0, run_share, &work[t]) == 0;
  run_share(&work[0]);
  for (int64_t t = 1; t < threads; ++t) {
    if (started[t]) pthread_join(handle[t], 0);
    else run_share(&work[t]);
  }
}
#endif

int lgc_abi_version(void) { return LGC_ABI_VERSION; }

int lgc_supports_float16(void) { return LGC_HAS_FLOAT16; }

/* Centralize every job's rows in place with up to `threads` threads, each given at least `min_per_thread`
 * entries; return the squared norm of the removed gradient means, and store the squared norm of the
 * gradients before GC in `*grad_sq` unless it is null (then nothing extra is read). */
double lgc_centralize(int64_t jobs, const int64_t *grad, const int64_t *weight, const int64_t *rows,
                      const int64_t *cols, const int64_t *row_stride, const int32_t *dtype,
                      const double *coefficient, int64_t threads, int64_t min_per_thread, double *grad_sq) {
  int64_t live = 0, all = 0; /* shares are cut on all entries, as run_share counts them */
  for (int64_t j = 0; j < jobs; ++j) {
    all += rows[j] * cols[j];
    if (grad[j] != 0) live += rows[j] * cols[j];
  }
  if (min_per_thread < 1) min_per_thread = 1;
  if (threads > live / min_per_thread) threads = live / min_per_thread;
  if (threads > LGC_MAX_THREADS) threads = LGC_MAX_THREADS;
  if (threads < 1) threads = 1;
  lgc_work work[LGC_MAX_THREADS];
  for (int64_t t = 0; t < threads; ++t) {
    lgc_work share = {jobs, grad, weight, rows, cols, row_stride, dtype, coefficient,
                      all / threads * t + (all % threads) * t / threads,
                      all / threads * (t + 1) + (all % threads) * (t + 1) / threads, grad_sq != 0, 0.0, 0.0};
    work[t] = share;
  }
  if (threads == 1) {
    run_share(&work[0]);
  } else {
    run_shares(work, threads);
  }
  double removed_sq = 0.0, grad_total = 0.0;
  for (int64_t t = 0; t < threads; ++t) {
    removed_sq += work[t].removed_sq;
    grad_total += work[t].grad_sq;
  }
  if (grad_sq) *grad_sq = grad_total;
  return removed_sq;
}
