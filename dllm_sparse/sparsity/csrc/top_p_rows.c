/* Per-token top-p on CPU, fused: each row's threshold, its masked output and its zero count, in one call.
 *
 * Bit-identical to the reference rule (sort |v| descending, float64 running sum, tau = the first sorted entry
 * whose running sum reaches p * total, keep |v| >= tau, never a zero), without sorting the row:
 *
 *   1. A row's |v| lying within SPAN octaves of its maximum (the "exact range") have every partial sum, in any
 *      order, exactly representable in float64: they are integer multiples of the smallest one's last bit,
 *      and d of them stay below 2^53 such units when SPAN = 52 - 23 - ceil(log2 d) (float32 has 24
 *      significant bits). So the reference's running sums over the exact range are exact sums, and its tau is
 *      the largest entry t whose exact mass sum(|v| >= t) reaches the target.
 *   2. Entries below the exact range (the "tail") are where the reference's running sum rounds. It adds them
 *      last, in descending order: the tail is sorted (it is a few entries, when any) and added one by one to
 *      the exact sum, which gives the reference's total bit for bit; if the target falls inside the tail, the
 *      same walk finds tau.
 *   3. Otherwise tau lies in the exact range: a mass histogram (2^SUB buckets per octave; the bucket is a
 *      shift of the float32 bit pattern, which is monotone in the value for non-negative floats) finds the
 *      bucket where the running mass from the top reaches the target, and only that bucket's entries (about
 *      1 % of a row) are sorted.
 *
 * Special rows, as the reference and the project's rule contract treat them: a row holding a NaN keeps every
 * non-zero entry; a row holding an infinity keeps its infinite entries (tau = inf); an all-zero row keeps
 * nothing. The output is x * keep as PyTorch computes it (a dropped entry becomes a zero with x's sign), so
 * the keep-mask is exactly out != 0 and is not written.
 *
 * Rows are shared among OpenMP threads (the caller passes PyTorch's intra-op thread count).
 *
 * Two entry points with one body: top_p_rows_f32 and top_p_rows_bf16. A bfloat16 is the top half of a float32,
 * so its bits shifted left by 16 are the float32 bits of the same value (exact): the bf16 kernel reads and
 * writes bf16 directly, with no float32 copy of its input or output.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SUB 5  /* 2^SUB buckets per octave: about 1 % of a row's entries share the boundary bucket */
#define ABS_MASK 0x7FFFFFFFu
#define INF_BITS 0x7F800000u

#define INLINE static inline __attribute__((always_inline))  /* each entry point gets its own copy */

enum { F32, BF16 };  /* the element type a body is compiled for */

static inline float float_of(uint32_t b) { float v; memcpy(&v, &b, 4); return v; }

/* |x[i]| as a float32 bit pattern. */
INLINE uint32_t abs_bits(const void *x, int64_t i, int kind) {
    return kind == BF16 ? ((uint32_t)((const uint16_t *)x)[i] << 16) & ABS_MASK : ((const uint32_t *)x)[i] & ABS_MASK;
}
static inline uint32_t bits_of(float v) { uint32_t b; memcpy(&b, &v, 4); return b; }

static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

static void sort_desc(float *v, int64_t n) {
    if (n > 32) { qsort(v, (size_t)n, sizeof(float), cmp_desc); return; }
    for (int64_t i = 1; i < n; i++) {  /* insertion sort: the boundary bucket and the tail are this small */
        float t = v[i];
        int64_t j = i - 1;
        while (j >= 0 && v[j] < t) { v[j + 1] = v[j]; j--; }
        v[j + 1] = t;
    }
}

/* The entries with |v| >= threshold reach the target first in the sorted run `v` (descending) starting from
 * mass `start`: the reference's tau is the entry at which start + running sum first reaches the target. */
static uint32_t first_reaching(const float *v, int64_t n, double start, double target) {
    double c = start;
    for (int64_t i = 0; i < n; i++) {
        c += (double)v[i];
        if (c >= target) return bits_of(v[i]);
    }
    return 1u;  /* not reached (only when p * total > total, which p <= 1 excludes): keep every non-zero */
}

/* tau of one finite row with a positive maximum, as a float32 bit pattern. */
/* The row's total mass: the exact range's sum, then the tail entries (scratch[0..n_tail)) sorted descending and
 * added one by one, as the reference adds them. */
static double total_with_tail(double exact, float *tail, int64_t n_tail) {
    double total = exact;
    if (n_tail) {
        sort_desc(tail, n_tail);
        for (int64_t k = 0; k < n_tail; k++) total += (double)tail[k];
    }
    return total;
}

/* The bucket holding the target: octaves first, then the 2^log2_per_octave buckets of that octave, the masses added
 * in descending order; *reach ends as the mass of the buckets above it. */
static int64_t boundary_bucket(const double *oct, const double *bucket, int64_t n_oct, int log2_per_octave,
                               double target, double *reach) {
    double r = 0.0;
    int64_t o = 0;
    while (o < n_oct - 1 && !(oct[o] > 0.0 && r + oct[o] >= target)) r += oct[o++];
    int64_t b = o << log2_per_octave;
    while (b < ((o + 1) << log2_per_octave) - 1 && !(bucket[b] > 0.0 && r + bucket[b] >= target)) r += bucket[b++];
    *reach = r;
    return b;
}

INLINE uint32_t row_tau(const void *x, int kind, int64_t d, uint32_t max_bits, double p, int span, double *hist,
                       float *scratch) {
    const int64_t n_oct = span + 1, n_exact = n_oct << SUB;
    /* Bucket 0 = the top 2^-SUB octave of the maximum's octave, then one per 2^-SUB octave down; bucket
     * n_exact gathers the tail. Zeros land in a bucket too but add no mass. */
    const int64_t top = (int64_t)(((max_bits >> 23) + 1) << SUB) - 1;
    /* Four interleaved histograms: consecutive entries often share a bucket, and one histogram would wait on
     * its own last store. Exact in any order (point 1 above). */
    const int64_t stride = n_exact + 1;
    memset(hist, 0, 4 * (size_t)stride * sizeof(double));
    double *h0 = hist, *h1 = h0 + stride, *h2 = h1 + stride, *h3 = h2 + stride;
#define BUCKET(b) ((size_t)(top - (int64_t)((b) >> (23 - SUB)) < n_exact ? top - (int64_t)((b) >> (23 - SUB)) : n_exact))
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) {
        uint32_t b0 = abs_bits(x, i, kind), b1 = abs_bits(x, i + 1, kind), b2 = abs_bits(x, i + 2, kind),
                 b3 = abs_bits(x, i + 3, kind);
        h0[BUCKET(b0)] += (double)float_of(b0);
        h1[BUCKET(b1)] += (double)float_of(b1);
        h2[BUCKET(b2)] += (double)float_of(b2);
        h3[BUCKET(b3)] += (double)float_of(b3);
    }
    for (; i < d; i++) { uint32_t b = abs_bits(x, i, kind); h0[BUCKET(b)] += (double)float_of(b); }
#undef BUCKET
    const double tail_mass = h0[n_exact] + h1[n_exact] + h2[n_exact] + h3[n_exact];
    /* Per-octave masses, then their sum: exact in any order, so independent accumulators. */
    for (int64_t j = 0; j < n_exact; j++) h0[j] += h1[j] + h2[j] + h3[j];
    double *oct = h1;  /* h1.. are spent once folded into h0 */
    double exact = 0.0;
    for (int64_t o = 0; o < n_oct; o++) {
        const double *h = h0 + (o << SUB);
        double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
        for (int j = 0; j < (1 << SUB); j += 4) { a0 += h[j]; a1 += h[j + 1]; a2 += h[j + 2]; a3 += h[j + 3]; }
        oct[o] = (a0 + a1) + (a2 + a3);
        exact += oct[o];
    }
    int64_t n_tail = 0;
    if (tail_mass > 0.0) {  /* point 2: the tail, in descending order, added one by one */
        const uint32_t exact_floor = (uint32_t)(top - n_exact + 1) << (23 - SUB);  /* smallest exact-range bits */
        for (int64_t k = 0; k < d; k++) {
            uint32_t b = abs_bits(x, k, kind);
            if (b != 0 && b < exact_floor) scratch[n_tail++] = float_of(b);
        }
    }
    const double target = p * total_with_tail(exact, scratch, n_tail);
    if (target > exact) return first_reaching(scratch, n_tail, exact, target);
    /* Point 3: the boundary bucket, octave first. */
    double reach;
    const int64_t boundary = boundary_bucket(oct, h0, n_oct, SUB, target, &reach);
    /* The boundary bucket's entries: bit patterns in [lo, lo + width). */
    const uint32_t lo = (uint32_t)(top - boundary) << (23 - SUB), width = 1u << (23 - SUB);
    int64_t n = 0, k = 0;
    for (; k + 16 <= d; k += 16) {  /* 16 at a time (vectorised); few blocks hold one */
        uint32_t nearest = UINT32_MAX;  /* min of |v| bits - lo, wrapping: below width iff the block has one */
        for (int j = 0; j < 16; j++) {
            uint32_t off = abs_bits(x, k + j, kind) - lo;
            nearest = off < nearest ? off : nearest;
        }
        if (nearest < width)
            for (int j = 0; j < 16; j++)
                if (abs_bits(x, k + j, kind) - lo < width) scratch[n++] = float_of(abs_bits(x, k + j, kind));
    }
    for (; k < d; k++)
        if (abs_bits(x, k, kind) - lo < width) scratch[n++] = float_of(abs_bits(x, k, kind));
    sort_desc(scratch, n);
    return first_reaching(scratch, n, reach, target);
}

/* tau of one finite bf16 row with a positive maximum, as a float32 bit pattern: the same steps with one bucket per
 * bf16 value (a bf16 has 7 fraction bits: 2^7 buckets per octave). The boundary bucket then holds equal values
 * only, so its value is tau: no second pass over the row and no sort. One histogram (consecutive entries rarely
 * share one of these finer buckets); the tail is gathered in the same pass. */
INLINE uint32_t row_tau_bf16(const uint16_t *x, int64_t d, uint32_t max_bits, double p, int span, double *hist,
                             float *scratch) {
    const int64_t n_oct = span + 1, n_exact = n_oct << 7;
    const int64_t top = (int64_t)(((max_bits >> 23) + 1) << 7) - 1;  /* bucket 0: the top of the max's octave */
    memset(hist, 0, (size_t)n_exact * sizeof(double));
    int64_t n_tail = 0;
    for (int64_t i = 0; i < d; i++) {
        const uint32_t h = x[i] & 0x7FFFu;
        const int64_t b = top - (int64_t)h;
        if (b < n_exact) hist[b] += (double)float_of(h << 16);
        else if (h) scratch[n_tail++] = float_of(h << 16);  /* below the exact range (rare; zeros add nothing) */
    }
    /* Per-octave masses and their sum: exact in any order (point 1), so independent accumulators. */
    double oct[64], exact = 0.0;  /* n_oct <= 30 (span <= 29) */
    for (int64_t o = 0; o < n_oct; o++) {
        const double *h = hist + (o << 7);
        double a[8] = {0};
        for (int j = 0; j < 128; j += 8)
            for (int k = 0; k < 8; k++) a[k] += h[j + k];
        oct[o] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        exact += oct[o];
    }
    const double target = p * total_with_tail(exact, scratch, n_tail);  /* point 2: the tail, in order */
    if (target > exact) return first_reaching(scratch, n_tail, exact, target);
    double reach;
    return (uint32_t)(top - boundary_bucket(oct, hist, n_oct, 7, target, &reach)) << 16;
}

/* One row: tau, then out = x * keep and the row's zero count. hist, scratch: the caller's work space. */
INLINE int64_t one_row(const void *x, void *out, int kind, int64_t d, double p, int span, double *hist,
                      float *scratch) {
    uint32_t max_bits = 0;
    for (int64_t i = 0; i < d; i++) {
        uint32_t b = abs_bits(x, i, kind);
        max_bits = b > max_bits ? b : max_bits;
    }
    uint32_t tau;
    if (max_bits > INF_BITS) tau = 1u;             /* NaN row: keep every non-zero entry */
    else if (max_bits == INF_BITS) tau = INF_BITS;  /* the running sum is inf from the first inf on */
    else if (max_bits == 0) tau = 1u;               /* all zeros: nothing is non-zero, nothing is kept */
    else if (kind == BF16) tau = row_tau_bf16(x, d, max_bits, p, span, hist, scratch);
    else tau = row_tau(x, kind, d, max_bits, p, span, hist, scratch);
    /* A dropped entry is finite (tau <= inf; a NaN row keeps every non-zero), so x * 0 = x's sign bit. */
    int64_t kept = 0;
    if (kind == BF16) {
        const uint16_t *x16 = x;
        uint16_t *out16 = out;
        for (int64_t i = 0; i < d; i++) {
            uint16_t k = ((uint32_t)(x16[i] & 0x7FFFu) << 16) >= tau;
            out16[i] = x16[i] & (uint16_t)(-k | 0x8000u);
            kept += k;
        }
    } else {
        const uint32_t *x32 = x;
        uint32_t *out32 = out;
        for (int64_t i = 0; i < d; i++) {
            uint32_t k = (x32[i] & ABS_MASK) >= tau;
            out32[i] = x32[i] & (-k | 0x80000000u);
            kept += k;
        }
    }
    return d - kept;  /* kept entries are non-zero (tau >= 1): zeros = entries not kept */
}

/* x, out: [rows, d] of the kind's type, contiguous (out may not alias x); zeros: [rows] int64. span: the exact
 * range in octaves, 52 - 23 - ceil(log2 d) >= 0. Rows are shared among n_threads OpenMP threads: built against
 * the libgomp that PyTorch has loaded, these are PyTorch's own intra-op threads (no second pool competing for
 * the cores). Returns 0, or -1 when memory could not be had. */
INLINE int top_p_rows(const void *x, int kind, int64_t rows, int64_t d, double p, int span, void *out,
                      int64_t *zeros, int n_threads) {
    const size_t elem = kind == BF16 ? 2 : 4;
    const size_t hist_len = kind == BF16 ? (size_t)((int64_t)span + 1) << 7 : 4 * (size_t)((((int64_t)span + 1) << SUB) + 1);
    int failed = 0;
#pragma omp parallel num_threads(n_threads > 0 ? n_threads : 1) if (rows > 1 && n_threads > 1) reduction(| : failed)
    {
        double *hist = malloc(hist_len * sizeof(double));
        float *scratch = malloc((size_t)d * sizeof(float));
        failed = !hist || !scratch;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (!failed)
                zeros[r] = one_row((const char *)x + r * d * elem, (char *)out + r * d * elem, kind, d, p, span,
                                   hist, scratch);
        free(hist);
        free(scratch);
    }
    return failed ? -1 : 0;
}

int top_p_rows_f32(const float *x, int64_t rows, int64_t d, double p, int span, float *out, int64_t *zeros,
                   int n_threads) {
    return top_p_rows(x, F32, rows, d, p, span, out, zeros, n_threads);
}

/* x, out: bfloat16 bit patterns. */
int top_p_rows_bf16(const uint16_t *x, int64_t rows, int64_t d, double p, int span, uint16_t *out, int64_t *zeros,
                    int n_threads) {
    return top_p_rows(x, BF16, rows, d, p, span, out, zeros, n_threads);
}
