/* Shared conventions of the optcore kernels.
 *
 * - Work is cut into fixed chunks of OC_CHUNK elements per tensor, independent of the thread
 *   count, so that reductions combine chunk partials in a fixed order: bitwise identical results
 *   for 1 or N threads.
 * - Inside a chunk, element-wise kernels run over tiles of OC_TILE elements: the gradient is
 *   prepared once per tile in a small L1-resident buffer (scale, clamp, weight decay), then the
 *   rule's loop runs branch-free over it. Memory still sees one sweep.
 * - OC_CLONES compiles a driver for AVX-512 (x86-64-v4), AVX2 and baseline x86-64; the loader picks one at
 *   run time (GNU ifunc); OC_ISA_DISPATCH says so. Elsewhere it is empty and the baseline
 *   build is used, and so it is when the build names one x86-64 path (OPTCORE_ISA, the path's
 *   name, set by meson -Disa=... with the flags for it).
 * - OpenMP is optional: without it (OPTCORE_NO_OPENMP) every driver runs on one thread.
 */
#ifndef OC_COMMON_H
#define OC_COMMON_H

#include <stdint.h>
#include <stddef.h>
#include <math.h>

#if !defined(OPTCORE_NO_OPENMP) && defined(_OPENMP)
#include <omp.h>
#define OC_HAVE_OPENMP 1
#else
#define OC_HAVE_OPENMP 0
#endif

#if defined(__x86_64__) && (defined(__clang__) ? (__clang_major__ >= 14) : defined(__GNUC__))
#define OC_X86_DISPATCH 1
#include <xmmintrin.h>
#else
#define OC_X86_DISPATCH 0
#endif

#if OC_X86_DISPATCH && !defined(OPTCORE_ISA)
#define OC_ISA_DISPATCH 1
/* x86-64-v4 = AVX-512 F, BW, DQ, VL, CD: with AVX512BW the 16-bit and 8-bit element formats
 * (oc_lowp.h) vectorize at full width too; AVX512F alone narrows them in 256-bit halves. */
#define OC_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define OC_ISA_DISPATCH 0
#define OC_CLONES
#endif

#define OC_RESTRICT __restrict__

#define OC_CHUNK 16384          /* elements per work item: fixed, so results do not depend on threads */
#define OC_TILE 512             /* elements per L1-resident tile inside a chunk */
#define OC_SERIAL_BELOW 32768   /* below this many elements a parallel region costs more than it saves */

/* Execution settings decided in Python for one kernel call. */
typedef struct {
    int nthreads;  /* >= 1 */
    int ftz;       /* flush denormals to zero inside the kernel threads */
} oc_exec;

/* A table of tensors: slot s of tensor t starts at slots[s][t] and holds lengths[t] elements.
 * Chunk c covers elements [chunk_start[c], min(chunk_start[c] + OC_CHUNK, lengths[t])) of
 * tensor t = chunk_tensor[c]. A slot pointer table may be NULL (an unused optional buffer), and
 * so may one tensor's entry of the update kernels' slots 6 and 7 (no buffer for that tensor).
 * Elements are float32 unless kinds[s] is set: then kinds[s][t] is the format of slot s of
 * tensor t (see oc_lowp.h; only the update kernels read other formats) and, for 8-bit
 * formats, absmax[s][t] holds its per-block scales. */
#define OC_MAX_SLOTS 8
typedef struct {
    int64_t ntensors;
    int64_t nchunks;
    int64_t total;                 /* sum of lengths */
    const int64_t *lengths;
    const int64_t *chunk_tensor;
    const int64_t *chunk_start;
    void *const *slots[OC_MAX_SLOTS];
    const uint8_t *kinds[OC_MAX_SLOTS];
    float *const *absmax[OC_MAX_SLOTS];
} oc_list;

static inline int64_t oc_chunk_len(const oc_list *L, int64_t c) {
    int64_t rest = L->lengths[L->chunk_tensor[c]] - L->chunk_start[c];
    return rest < OC_CHUNK ? rest : OC_CHUNK;
}

/* Slot s of chunk c, for a float32 slot. */
static inline float *oc_slot(const oc_list *L, int s, int64_t c) {
    if (L->slots[s] == NULL) return NULL;
    return (float *)L->slots[s][L->chunk_tensor[c]] + L->chunk_start[c];
}

/* When chunk c + 1 starts a new tensor, prefetch the first cache lines of each of its buffers:
 * the hardware prefetcher needs a few misses to lock onto a new stream, which is most of the
 * cost of a small tensor. Changes no result. */
static inline void oc_prefetch_next(const oc_list *L, int64_t c) {
    if (c + 1 >= L->nchunks || L->chunk_start[c + 1] != 0) return;
    const int64_t t = L->chunk_tensor[c + 1];
    for (int s = 0; s < OC_MAX_SLOTS; s++) {
        if (L->slots[s] == NULL) continue;
        const char *x = (const char *)L->slots[s][t];
        if (x == NULL) continue;  /* no buffer in this slot for this tensor */
        for (int k = 0; k < 8; k++) __builtin_prefetch(x + 64 * k);
    }
}

/* Threads to use for a call over `total` elements. */
static inline int oc_team_size(const oc_exec *ex, int64_t total) {
    return (OC_HAVE_OPENMP && total >= OC_SERIAL_BELOW && ex->nthreads > 1) ? ex->nthreads : 1;
}

/* Flush-to-zero / denormals-are-zero for the calling thread; returns the previous state. */
static inline unsigned int oc_ftz_enter(int on) {
#if OC_X86_DISPATCH
    unsigned int old = _mm_getcsr();
    if (on) _mm_setcsr(old | 0x8040u);  /* FTZ (bit 15) | DAZ (bit 6) */
    return old;
#else
    (void)on;
    return 0u;
#endif
}

static inline void oc_ftz_leave(unsigned int old) {
#if OC_X86_DISPATCH
    _mm_setcsr(old);
#else
    (void)old;
#endif
}

static inline int oc_ftz_supported(void) { return OC_X86_DISPATCH; }

/* Run the body (the variadic part) for i in [0, n): statically split over a team of `nt`
 * threads when nt > 1, else on the calling thread without entering a parallel region; each
 * thread with flush-to-zero as `ex` asks, restored afterwards. */
#define OC_PARALLEL_FOR(nt, ex, i, n, ...)                                         \
    do {                                                                           \
        int oc_nt_ = (nt);                                                         \
        if (oc_nt_ > 1) {                                                          \
            _Pragma("omp parallel num_threads(oc_nt_)")                            \
            {                                                                      \
                unsigned int oc_csr_ = oc_ftz_enter((ex)->ftz);                    \
                _Pragma("omp for schedule(static)")                                \
                for (int64_t i = 0; i < (n); i++) { __VA_ARGS__; }                 \
                oc_ftz_leave(oc_csr_);                                             \
            }                                                                      \
        } else {                                                                   \
            unsigned int oc_csr_ = oc_ftz_enter((ex)->ftz);                        \
            for (int64_t i = 0; i < (n); i++) { __VA_ARGS__; }                     \
            oc_ftz_leave(oc_csr_);                                                 \
        }                                                                          \
    } while (0)

/* Run the body for every chunk c of L, in parallel when the table is large enough. */
#define OC_FOR_EACH_CHUNK(L, ex, c, ...) \
    OC_PARALLEL_FOR(oc_team_size((ex), (L)->total), ex, c, (L)->nchunks, __VA_ARGS__)

#endif /* OC_COMMON_H */
