// sat_quant's CPU kernel for the 4-bit formats: y = x @ ((T[code] - zero) * absmax)^T, read straight from the
// neutral layout (bitsandbytes' packing: uint8 [N, K/2], even column in the high nibble; fp32 absmax per block of
// G columns). nf4 / fp4: T is their table and there is no zero. int4: T is 0..15 and zero the uint8 zero-point of
// each block (the int4 layout's fp16 scale, widened to fp32, is absmax). Plain C ABI (called through ctypes: no
// torch headers, so it compiles in seconds).
//
// How it works: one 64-byte load holds 128 codes as 16 dwords. vpermps looks up a 16-entry fp32 table using only
// bits 3:0 of each dword lane, so shifting the dwords right by 0, 4, ..., 28 gives, per shift, one code per lane
// (lane l, shift s -> column 8l + (s ^ 1) of the chunk) and its table value in one instruction; no masking, no
// unpacking. x is rearranged once per call into that same order, so each lookup feeds straight into an FMA.
// fp32/fp16 activations (tile_f32): weights are T * absmax in fp32, exactly the reference's dequantized values,
// accumulated in fp32. bf16 activations (tile_bf16): a bf16 copy of the table is looked up 32 codes at a time with
// vpermw and vdpbf16ps multiplies pairs in fp32, scaled by absmax once per chunk (2.5x fewer vector ops); a zero
// point enters there too, as absmax * zero * (the sum of the 8 x values each lane covers), summed once per call.
// Rows of W are split into tasks run by the caller and a small pool of worker threads (see Pool); masked loads
// handle a partial last chunk; a per-call Plan keeps integer division out of the inner loop.

#include <immintrin.h>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SQ_API extern "C" __attribute__((visibility("default")))

enum { SQ_F32 = 0, SQ_BF16 = 1, SQ_F16 = 2 };

#ifndef BF16_TILE
#define BF16_TILE 2  // x rows per pass of tile_bf16: 2 rows of x stay in L1 (more measured slower at K=4096)
#endif

// 1: AVX-512 F/BW/VL + F16C + FMA (fp32 path); 2: and AVX512_BF16 (bf16 dot-product path); 0: unsupported.
SQ_API int sq_lut4_cpu_level(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return 0;
    return __builtin_cpu_supports("avx512bf16") ? 2 : 1;
}

SQ_API int sq_lut4_abi_version(void) { return 2; }

// A worker pool that never waits for a thread that has not started working. OpenMP's end-of-region barrier waits
// for every team thread to arrive: on a busy machine a worker not yet scheduled cost ~4-8 ms per call (measured:
// a 0.4 ms GEMV took 8 ms). Here the caller claims tasks too and, once none are left, waits only for workers that
// joined this job (they hold a claimed task); a worker that wakes late finds the job closed and sleeps again.
namespace {

class Pool {
  public:
    using Fn = void (*)(void*, int64_t);

    void run(int nthreads, int64_t ntasks, Fn fn, void* ctx) {
        if (nthreads > 64) nthreads = 64;
        if (nthreads <= 1 || ntasks <= 1) {
            for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t);
            return;
        }
        std::lock_guard<std::mutex> one_job(run_mu_);  // calls from several Python threads take turns
        {
            std::lock_guard<std::mutex> lk(mu_);
            while (static_cast<int>(workers_.size()) < nthreads - 1) {
                std::thread(&Pool::work, this, static_cast<int>(workers_.size())).detach();
                workers_.push_back(1);
            }
            fn_ = fn, ctx_ = ctx, ntasks_ = ntasks, wanted_ = nthreads - 1, open_ = true;
            next_.store(0, std::memory_order_relaxed);
            ++gen_;
        }
        cv_.notify_all();
        for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < ntasks;) fn(ctx, t);
        {
            std::lock_guard<std::mutex> lk(mu_);
            open_ = false;  // from here no worker joins this job
        }
        while (active_.load(std::memory_order_acquire) > 0) std::this_thread::yield();
    }

  private:
    void work(int index) {
        uint64_t seen = 0;
        for (;;) {
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait(lk, [&] { return gen_ != seen && open_ && index < wanted_; });
            seen = gen_;
            Fn fn = fn_;
            void* ctx = ctx_;
            const int64_t n = ntasks_;
            active_.fetch_add(1, std::memory_order_relaxed);
            lk.unlock();
            for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < n;) fn(ctx, t);
            active_.fetch_sub(1, std::memory_order_release);
        }
    }

    std::mutex run_mu_, mu_;
    std::condition_variable cv_;
    std::vector<char> workers_;
    uint64_t gen_ = 0;
    Fn fn_ = nullptr;
    void* ctx_ = nullptr;
    int64_t ntasks_ = 0;
    int wanted_ = 0;
    bool open_ = false;
    std::atomic<int64_t> next_{0};
    std::atomic<int> active_{0};
};

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: its detached workers may still be asleep at exit
    return *p;
}

template <typename F>
void call_task(void* ctx, int64_t t) { (*static_cast<F*>(ctx))(t); }

// f(t) for t in [0, ntasks) on the caller and up to nthreads - 1 workers.
template <typename F>
void parallel_tasks(int nthreads, int64_t ntasks, F f) { pool().run(nthreads, ntasks, &call_task<F>, &f); }

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")

namespace {

inline float load_scalar(const void* x, int dt, int64_t i) {
    if (dt == SQ_F32) return static_cast<const float*>(x)[i];
    uint16_t h = static_cast<const uint16_t*>(x)[i];
    if (dt == SQ_BF16) {
        uint32_t u = static_cast<uint32_t>(h) << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return _cvtsh_ss(h);
}

inline void store_scalar(void* y, int dt, int64_t i, float v) {
    if (dt == SQ_F32) {
        static_cast<float*>(y)[i] = v;
    } else if (dt == SQ_BF16) {  // round to nearest even, NaN kept quiet (what torch's .to(bfloat16) does)
        uint32_t u;
        memcpy(&u, &v, 4);
        uint16_t h = ((u & 0x7fffffffu) > 0x7f800000u) ? static_cast<uint16_t>((u >> 16) | 0x40)
                                                        : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        static_cast<uint16_t*>(y)[i] = h;
    } else {
        static_cast<uint16_t*>(y)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    }
}

// Column of chunk position (s, l): the order the kernel consumes codes in (see the header comment).
inline int64_t chunk_col(int s, int l) { return 8 * l + (s ^ 1); }

// x [M, K] (row stride ldx) -> xp [M][C][8][16] fp32 in the order of tile_f32, zero past K.
void arrange_f32(const void* x, int dt, int64_t M, int64_t K, int64_t ldx, int64_t C, float* xp) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < C; ++c)
            for (int s = 0; s < 8; ++s)
                for (int l = 0; l < 16; ++l) {
                    int64_t k = c * 128 + chunk_col(s, l);
                    xp[((m * C + c) * 8 + s) * 16 + l] = k < K ? load_scalar(x, dt, m * ldx + k) : 0.0f;
                }
}

struct Chunk {
    __m512i dw;  // 16 dwords = 128 codes
    __m512 av;   // absmax of each lane's block
    __m512 zv;   // zero point of each lane's block (0 without zero points)
};

// Per-call constants, so the inner loop does no integer division: per chunk, its first absmax index and the
// masks for the codes (16 dwords) and absmax values it may read (the row's last chunk may be partial).
struct Plan {
    int64_t K, G, C;
    __m512i gidx;                // lane -> block within the chunk's absmax window
    int32_t* blk;                // [C] first block of chunk c
    __mmask16 *dmask, *bmask;    // [C] each
};

bool make_plan(Plan& p, int64_t K, int64_t G) {
    p.K = K, p.G = G, p.C = (K + 127) / 128;
    alignas(64) int32_t g[16];
    for (int l = 0; l < 16; ++l) g[l] = G >= 128 ? 0 : static_cast<int32_t>((8 * l) / G);
    p.gidx = _mm512_load_si512(g);
    p.blk = static_cast<int32_t*>(malloc(p.C * (sizeof(int32_t) + 2 * sizeof(__mmask16))));
    if (!p.blk) return false;
    p.dmask = reinterpret_cast<__mmask16*>(p.blk + p.C);
    p.bmask = p.dmask + p.C;
    for (int64_t c = 0; c < p.C; ++c) {
        int64_t k0 = c * 128, rem = K - k0 < 128 ? K - k0 : 128;
        int64_t first = k0 / G, last = (k0 + rem - 1) / G;
        p.blk[c] = static_cast<int32_t>(first);
        p.dmask[c] = static_cast<__mmask16>((1u << (rem / 8)) - 1u);
        p.bmask[c] = static_cast<__mmask16>((1u << (last - first + 1)) - 1u);
    }
    return true;
}

// Codes and per-lane absmax of chunk c of one row.
#ifndef SQ_PREFETCH
#define SQ_PREFETCH 2048
#endif
inline Chunk load_chunk(const uint8_t* qr, const float* ar, const uint8_t* zr, int64_t c, const Plan& p) {
    Chunk ch;
    // the hardware prefetcher alone left this stream at ~1/3 of memory bandwidth; reading ahead past the row's
    // end is harmless (prefetches never fault)
    _mm_prefetch(reinterpret_cast<const char*>(qr + c * 64 + SQ_PREFETCH), _MM_HINT_T0);
    if ((c & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(ar + p.blk[c] + SQ_PREFETCH / 8), _MM_HINT_T0);
    ch.dw = _mm512_maskz_loadu_epi32(p.dmask[c], qr + c * 64);
    ch.av = _mm512_permutexvar_ps(p.gidx, _mm512_maskz_loadu_ps(p.bmask[c], ar + p.blk[c]));
    ch.zv = zr ? _mm512_permutexvar_ps(p.gidx, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                     _mm_maskz_loadu_epi8(p.bmask[c], zr + p.blk[c]))))
               : _mm512_setzero_ps();
    return ch;
}

inline __m512 lookup(const Chunk& ch, int s, __m512 table) {
    __m512i idx = s ? _mm512_srli_epi32(ch.dw, 4 * s) : ch.dw;
    return _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(idx, table), ch.zv), ch.av);
}


// MT rows of x against rows [n0, n1) of W, fp32 FMAs. xp points at row 0 of the tile; y at its row 0.
// A accumulators per x row break the FMA dependency chain when MT is small (latency 4, one chain would stall).
template <int MT>
void tile_f32(const uint8_t* q, const float* absmax, const uint8_t* zero, __m512 table, const float* xp, int64_t n0,
              int64_t n1, int64_t K, int64_t G, int64_t C, int64_t N, void* y, int ydt, const Plan& plan) {
    constexpr int A = MT >= 4 ? 1 : 4 / MT;
    const int64_t xs = C * 128;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* qr = q + n * (K / 2);
        const float* ar = absmax + n * (K / G);
        const uint8_t* zr = zero ? zero + n * (K / G) : nullptr;
        __m512 acc[MT][A];
        for (int m = 0; m < MT; ++m)
            for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
            Chunk ch = load_chunk(qr, ar, zr, c, plan);
            const float* xc = xp + c * 128;
#pragma GCC unroll 8
            for (int s = 0; s < 8; ++s) {
                __m512 w = lookup(ch, s, table);
                for (int m = 0; m < MT; ++m)
                    acc[m][s % A] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + m * xs + s * 16), acc[m][s % A]);
            }
        }
        for (int m = 0; m < MT; ++m) {
            __m512 sum = acc[m][0];
            for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
            store_scalar(y, ydt, m * N + n, _mm512_reduce_add_ps(sum));
        }
    }
}

// bf16 x: a 32-entry bf16 table (16 entries twice: vpermw reads index bits 4:0, bit 4 is the next code's) gives
// 32 weights per lookup from the 16-bit words of the chunk shifted by 0/4/8/12 (word j, shift s -> column
// 4j + (s ^ 1)); vdpbf16ps multiplies pairs in fp32 and the chunk's sum is scaled by absmax once per lane (a
// dword lane covers 8 columns, so one block). 2.5x fewer vector ops than the fp32 path; the weights are the
// table values rounded to bf16 (relative error <= 2^-9, far below 4-bit quantization error), then x absmax in fp32.
template <int MT>
void tile_bf16(const uint8_t* q, const float* absmax, const uint8_t* zero, __m512i table32, const uint16_t* xp,
               const float* xs8, int64_t n0, int64_t n1, int64_t K, int64_t G, int64_t C, int64_t N, void* y, int ydt,
               const Plan& plan) {
    constexpr int A = MT >= 2 ? 1 : 2;  // one row: alternate two accumulators between chunks
    const int64_t xs = C * 128;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* qr = q + n * (K / 2);
        const float* ar = absmax + n * (K / G);
        const uint8_t* zr = zero ? zero + n * (K / G) : nullptr;
        __m512 acc[MT][A];
        for (int m = 0; m < MT; ++m)
            for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
            Chunk ch = load_chunk(qr, ar, zr, c, plan);
            __m512bh w[4];
            for (int s = 0; s < 4; ++s) {
                __m512i idx = s ? _mm512_srli_epi16(ch.dw, 4 * s) : ch.dw;
                __m512i v = _mm512_permutexvar_epi16(idx, table32);
                w[s] = reinterpret_cast<__m512bh&>(v);
            }
            const uint16_t* xc = xp + c * 128;
            for (int m = 0; m < MT; ++m) {
                __m512i x0 = _mm512_loadu_si512(xc + m * xs), x1 = _mm512_loadu_si512(xc + m * xs + 32);
                __m512i x2 = _mm512_loadu_si512(xc + m * xs + 64), x3 = _mm512_loadu_si512(xc + m * xs + 96);
                __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), w[0], reinterpret_cast<__m512bh&>(x0));
                t = _mm512_dpbf16_ps(t, w[1], reinterpret_cast<__m512bh&>(x1));
                t = _mm512_dpbf16_ps(t, w[2], reinterpret_cast<__m512bh&>(x2));
                t = _mm512_dpbf16_ps(t, w[3], reinterpret_cast<__m512bh&>(x3));
                if (zr) t = _mm512_fnmadd_ps(ch.zv, _mm512_loadu_ps(xs8 + (m * C + c) * 16), t);  // - zero * sum x
                acc[m][c % A] = _mm512_fmadd_ps(ch.av, t, acc[m][c % A]);
            }
        }
        for (int m = 0; m < MT; ++m) {
            __m512 sum = acc[m][0];
            for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
            store_scalar(y, ydt, m * N + n, _mm512_reduce_add_ps(sum));
        }
    }
}

// bf16 x [M, K] -> xp [M][C][4][32] in the word order of tile_bf16, zero past K; with xs8, also the fp32 sum of
// each lane's 8 columns (lane l of chunk c: columns 128c + 8l .. +7) for the zero-point term.
void arrange_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int64_t C, uint16_t* xp, float* xs8) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < C; ++c)
            for (int s = 0; s < 4; ++s)
                for (int j = 0; j < 32; ++j) {
                    int64_t k = c * 128 + 4 * j + (s ^ 1);
                    xp[((m * C + c) * 4 + s) * 32 + j] = k < K ? x[m * ldx + k] : 0;
                }
    if (!xs8) return;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < C; ++c)
            for (int l = 0; l < 16; ++l) {
                float sum = 0.0f;
                for (int64_t k = c * 128 + 8 * l; k < c * 128 + 8 * l + 8 && k < K; ++k)
                    sum += load_scalar(x, SQ_BF16, m * ldx + k);
                xs8[(m * C + c) * 16 + l] = sum;
            }
}

}  // namespace

// y [M, N] (dtype ydt) = x [M, K] (dtype xdt, row stride ldx) @ W^T, W from (q, absmax, table, zero) with block
// G; zero (uint8 [N, K/G]) may be null (no zero points).
// Returns 0, or 1 when the CPU lacks AVX-512, 2 for an unsupported shape, 3 when scratch memory is unavailable.
SQ_API int sq_lut4_linear(const void* x, int xdt, int64_t M, int64_t K, int64_t ldx, const uint8_t* q,
                          const float* absmax, const float* table16, const uint8_t* zero, int64_t N, int64_t G,
                          void* y, int ydt, int nthreads) {
    static const int level = sq_lut4_cpu_level();
    if (level == 0) return 1;
    if (K % 8 || K % G || G < 16 || (128 % G && G % 128)) return 2;
    const int64_t C = (K + 127) / 128;
    // bf16 x takes tile_bf16 (where the CPU has AVX512_BF16), fp32/fp16 take tile_f32
    const int path = xdt == SQ_BF16 && level >= 2 ? 1 : 0;
    const int64_t xbytes = M * C * 128 * (path ? 2 : 4);
    const int64_t sbytes = path == 1 && zero ? M * C * 16 * 4 : 0;  // per-lane sums of x for the zero points
    Plan plan;
    if (!make_plan(plan, K, G)) return 3;
    void* xp = aligned_alloc(64, (xbytes + sbytes + 63) / 64 * 64);
    if (!xp) {
        free(plan.blk);
        return 3;
    }
    float* xs8 = sbytes ? reinterpret_cast<float*>(static_cast<char*>(xp) + xbytes) : nullptr;
    if (path == 1) arrange_bf16(static_cast<const uint16_t*>(x), M, K, ldx, C, static_cast<uint16_t*>(xp), xs8);
    else arrange_f32(x, xdt, M, K, ldx, C, static_cast<float*>(xp));
    const __m512 table = _mm512_loadu_ps(table16);
    alignas(64) uint16_t t32[32];
    for (int i = 0; i < 32; ++i) store_scalar(&t32[i], SQ_BF16, 0, table16[i & 15]);
    const __m512i table32 = _mm512_load_si512(t32);
    const int64_t stride = C * 128;
    const int64_t rows_per_task = 16;
    const int64_t tasks = (N + rows_per_task - 1) / rows_per_task;
    char* ybase = static_cast<char*>(y);
    const int64_t ysize = ydt == SQ_F32 ? 4 : 2;
    parallel_tasks(nthreads, tasks, [&](int64_t t) {
        const int64_t n0 = t * rows_per_task, n1 = n0 + rows_per_task < N ? n0 + rows_per_task : N;
        auto at = [&](int64_t m) { return ybase + m * N * ysize; };
        int64_t m = 0;
        if (path == 1) {
            const uint16_t* xb = static_cast<const uint16_t*>(xp);
            for (; m + BF16_TILE <= M; m += BF16_TILE) tile_bf16<BF16_TILE>(q, absmax, zero, table32, xb + m * stride, xs8 ? xs8 + m * C * 16 : nullptr, n0, n1, K, G, C, N, at(m), ydt, plan);
            if (BF16_TILE > 4 && m + 4 <= M) { tile_bf16<4>(q, absmax, zero, table32, xb + m * stride, xs8 ? xs8 + m * C * 16 : nullptr, n0, n1, K, G, C, N, at(m), ydt, plan); m += 4; }
            if (BF16_TILE > 2 && m + 2 <= M) { tile_bf16<2>(q, absmax, zero, table32, xb + m * stride, xs8 ? xs8 + m * C * 16 : nullptr, n0, n1, K, G, C, N, at(m), ydt, plan); m += 2; }
            if (m < M) tile_bf16<1>(q, absmax, zero, table32, xb + m * stride, xs8 ? xs8 + m * C * 16 : nullptr, n0, n1, K, G, C, N, at(m), ydt, plan);
        } else {
            const float* xf = static_cast<const float*>(xp);
            for (; m + 8 <= M; m += 8) tile_f32<8>(q, absmax, zero, table, xf + m * stride, n0, n1, K, G, C, N, at(m), ydt, plan);
            if (m + 4 <= M) { tile_f32<4>(q, absmax, zero, table, xf + m * stride, n0, n1, K, G, C, N, at(m), ydt, plan); m += 4; }
            if (m + 2 <= M) { tile_f32<2>(q, absmax, zero, table, xf + m * stride, n0, n1, K, G, C, N, at(m), ydt, plan); m += 2; }
            if (m < M) tile_f32<1>(q, absmax, zero, table, xf + m * stride, n0, n1, K, G, C, N, at(m), ydt, plan);
        }
    });
    free(xp);
    free(plan.blk);
    return 0;
}

// W [N, K] in dtype ydt (natural column order): for many activation rows, dequantize once and let a dense GEMM run.
// 16 bytes -> 16 dword lanes (vpmovzxbd); the high nibbles (even columns) and low nibbles (odd columns) are looked
// up separately and interleaved back with vpermt2ps. Values are T * absmax in fp32, then one rounding to ydt.
SQ_API int sq_lut4_dequantize(const uint8_t* q, const float* absmax, const float* table16, const uint8_t* zero,
                              int64_t N, int64_t K, int64_t G, void* y, int ydt, int nthreads) {
    static const int level = sq_lut4_cpu_level();
    if (level == 0) return 1;
    if (K % 8 || K % G || G < 16 || (128 % G && G % 128)) return 2;
    const __m512 table = _mm512_loadu_ps(table16);
    alignas(64) int32_t lo[16], hi[16], gi[16];
    for (int i = 0; i < 8; ++i) lo[2 * i] = i, lo[2 * i + 1] = 16 + i, hi[2 * i] = 8 + i, hi[2 * i + 1] = 24 + i;
    for (int l = 0; l < 16; ++l) gi[l] = (2 * l) / G;  // lane l holds columns 2l, 2l+1 of the 32-column piece
    const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi), gidx = _mm512_load_si512(gi);
    const __mmask16 bmask = G >= 32 ? 1 : 3;
    const int64_t full = K / 32;
    parallel_tasks(nthreads, N, [&](int64_t n) {
        const uint8_t* qr = q + n * (K / 2);
        const float* ar = absmax + n * (K / G);
        const uint8_t* zr = zero ? zero + n * (K / G) : nullptr;
        for (int64_t j = 0; j < full; ++j) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + j * 16)));
            __m512 av = _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps(bmask, ar + (j * 32) / G));
            __m512 zv = zr ? _mm512_permutexvar_ps(gidx, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                 _mm_maskz_loadu_epi8(bmask, zr + (j * 32) / G))))
                           : _mm512_setzero_ps();
            __m512 even = _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), zv), av);
            __m512 odd = _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(v, table), zv), av);
            __m512 w0 = _mm512_permutex2var_ps(even, ilo, odd), w1 = _mm512_permutex2var_ps(even, ihi, odd);
            const int64_t at = n * K + j * 32;
            if (ydt == SQ_F32) {
                _mm512_storeu_ps(static_cast<float*>(y) + at, w0);
                _mm512_storeu_ps(static_cast<float*>(y) + at + 16, w1);
            } else if (ydt == SQ_BF16) {
                __m512bh b = _mm512_cvtne2ps_pbh(w1, w0);
                _mm512_storeu_si512(static_cast<uint16_t*>(y) + at, reinterpret_cast<__m512i&>(b));
            } else {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(y) + at),
                                    _mm512_cvtps_ph(w0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(y) + at + 16),
                                    _mm512_cvtps_ph(w1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            }
        }
        for (int64_t k = full * 32; k < K; ++k) {  // the last K % 32 columns
            const int code = k % 2 ? qr[k / 2] & 15 : qr[k / 2] >> 4;
            store_scalar(y, ydt, n * K + k, (table16[code] - (zr ? zr[k / G] : 0)) * ar[k / G]);
        }
    });
    return 0;
}

#pragma GCC pop_options
