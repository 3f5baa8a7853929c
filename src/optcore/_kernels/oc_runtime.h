/* Run-time facts about the build and the machine: OpenMP, thread counts, instruction set. */
#ifndef OC_RUNTIME_H
#define OC_RUNTIME_H

#include "oc_common.h"

static inline int oc_openmp_enabled(void) { return OC_HAVE_OPENMP; }

static inline int oc_openmp_version(void) {
#if OC_HAVE_OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}

/* The OpenMP runtime's default team size (what OMP_NUM_THREADS or threadpoolctl set). */
static inline int oc_omp_max_threads(void) {
#if OC_HAVE_OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static inline int oc_num_procs(void) {
#if OC_HAVE_OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

/* The instruction set the OC_CLONES dispatcher selects on this CPU, or the one path the build
 * was made for (OPTCORE_ISA), named alike. */
static inline const char *oc_isa(void) {
#if defined(OPTCORE_ISA)
    return OPTCORE_ISA;
#elif OC_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512cd"))
        return "avx512f";  /* the x86-64-v4 clone */
    if (__builtin_cpu_supports("avx2")) return "avx2";
    return "x86-64";
#elif defined(__aarch64__)
    return "aarch64";
#else
    return "generic";
#endif
}

/* 1 when the loader picks the instruction set per CPU, 0 for a build of one path. */
static inline int oc_isa_dispatch(void) { return OC_ISA_DISPATCH; }

/* Process-wide execution state. Only _runtime.pyx includes this header; the other kernel
 * families reach these through its exported exec_begin/exec_end. */
static int oc_requested_threads = 0;  /* set_num_threads; 0 follows the OpenMP runtime */
static int oc_claimed_threads = 0;    /* threads held by kernels running right now */
static int oc_flush_denormal = 0;

static inline int oc_thread_budget(void) {
    return oc_requested_threads > 0 ? oc_requested_threads : oc_omp_max_threads();
}

/* Claim a team for one call over `total` elements. Kernels started concurrently from several
 * Python threads share the budget: a late one gets what is left, at least its own thread. */
static inline oc_exec oc_exec_begin(int64_t total) {
    oc_exec ex;
    ex.ftz = oc_flush_denormal;
    ex.nthreads = 1;
    int want = oc_thread_budget();
    if (!OC_HAVE_OPENMP || total < OC_SERIAL_BELOW || want <= 1) return ex;
    int before = __atomic_fetch_add(&oc_claimed_threads, want, __ATOMIC_ACQ_REL);
    int take = want - before;
    if (take < 2) {
        /* Not enough left for a team: run serially on the calling thread and claim nothing,
         * since exec_end gives back only what a team (nthreads > 1) holds. */
        __atomic_fetch_sub(&oc_claimed_threads, want, __ATOMIC_ACQ_REL);
        return ex;
    }
    __atomic_fetch_sub(&oc_claimed_threads, want - take, __ATOMIC_ACQ_REL);
    ex.nthreads = take;
    return ex;
}

/* Threads held by kernels running right now (0 when idle); for tests. */
static inline int oc_claimed_now(void) {
    return __atomic_load_n(&oc_claimed_threads, __ATOMIC_ACQUIRE);
}

static inline void oc_exec_end(oc_exec ex) {
    if (ex.nthreads > 1) __atomic_fetch_sub(&oc_claimed_threads, ex.nthreads, __ATOMIC_ACQ_REL);
}

#endif /* OC_RUNTIME_H */
