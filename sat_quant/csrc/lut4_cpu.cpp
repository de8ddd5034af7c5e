// sat_quant's CPU kernel for the 4-bit table formats (nf4 / fp4): y = x @ (T[code] * absmax)^T, read straight
// from the neutral layout (bitsandbytes' packing: uint8 [N, K/2], even column in the high nibble; fp32 absmax
// per block of G columns). Plain C ABI (called through ctypes: no torch headers, so it compiles in seconds).
//
// How it works: one 64-byte load holds 128 codes as 16 dwords. vpermps looks up a 16-entry fp32 table using only
// bits 3:0 of each dword lane, so shifting the dwords right by 0, 4, ..., 28 gives, per shift, one code per lane
// (lane l, shift s -> column 8l + (s ^ 1) of the chunk) and its table value in one instruction; no masking, no
// unpacking. x is rearranged once per call into that same order, so each lookup feeds straight into an FMA.
// Weights are T * absmax in fp32, exactly the reference's dequantized values. fp32/fp16 activations accumulate in
// fp32; bf16 activations with several rows use avx512_bf16 dot products on weights rounded to bf16 the way the
// reference's dequantize(dtype=bf16) rounds them (round to nearest even), accumulating in fp32.
// Rows of W are split across threads with OpenMP (torch's own libgomp: same soname, one thread pool).

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SQ_API extern "C" __attribute__((visibility("default")))

enum { SQ_F32 = 0, SQ_BF16 = 1, SQ_F16 = 2 };

// 1: AVX-512 F/BW/VL + F16C + FMA (fp32 path); 2: and AVX512_BF16 (bf16 dot-product path); 0: unsupported.
SQ_API int sq_lut4_cpu_level(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return 0;
    return __builtin_cpu_supports("avx512bf16") ? 2 : 1;
}

SQ_API int sq_lut4_abi_version(void) { return 1; }

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

// x [M, K] (row stride ldx) -> xp [M][C][8][16] in kernel order, zero past K. T is float or uint16 (bf16 bits).
template <typename T>
void arrange(const void* x, int dt, int64_t M, int64_t K, int64_t ldx, int64_t C, T* xp) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < C; ++c)
            for (int s = 0; s < 8; ++s)
                for (int l = 0; l < 16; ++l) {
                    int64_t k = c * 128 + chunk_col(s, l);
                    T* dst = xp + ((m * C + c) * 8 + s) * 16 + l;
                    if constexpr (sizeof(T) == 4) {
                        *dst = k < K ? load_scalar(x, dt, m * ldx + k) : 0.0f;
                    } else {  // bf16 input only: copy the bits
                        *dst = k < K ? static_cast<const uint16_t*>(x)[m * ldx + k] : 0;
                    }
                }
}

struct Chunk {
    __m512i dw;  // 16 dwords = 128 codes
    __m512 av;   // absmax of each lane's block
};

// Codes and per-lane absmax of chunk c of one row (masked at the end of the row).
inline Chunk load_chunk(const uint8_t* qr, const float* ar, int64_t c, int64_t K, int64_t G, __m512i gidx) {
    Chunk ch;
    const int64_t k0 = c * 128, rem = K - k0;
    if (rem >= 128) {
        ch.dw = _mm512_loadu_si512(qr + c * 64);
    } else {
        ch.dw = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << (rem / 8)) - 1u), qr + c * 64);
    }
    if (G >= 128) {
        ch.av = _mm512_set1_ps(ar[k0 / G]);
    } else {
        int64_t blocks = 128 / G, left = (rem + G - 1) / G;
        int64_t n = blocks < left ? blocks : left;
        __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), ar + k0 / G);
        ch.av = _mm512_permutexvar_ps(gidx, a);
    }
    return ch;
}

inline __m512 lookup(const Chunk& ch, int s, __m512 table) {
    __m512i idx = s ? _mm512_srli_epi32(ch.dw, 4 * s) : ch.dw;
    return _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), ch.av);
}

inline __m512i block_index(int64_t G) {
    alignas(64) int32_t g[16];
    for (int l = 0; l < 16; ++l) g[l] = G >= 128 ? 0 : static_cast<int32_t>((8 * l) / G);
    return _mm512_load_si512(g);
}

// MT rows of x against rows [n0, n1) of W, fp32 FMAs. xp points at row 0 of the tile; y at its row 0.
template <int MT>
void tile_f32(const uint8_t* q, const float* absmax, __m512 table, const float* xp, int64_t n0, int64_t n1,
              int64_t K, int64_t G, int64_t C, int64_t N, void* y, int ydt) {
    const __m512i gidx = block_index(G);
    const int64_t xs = C * 128;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* qr = q + n * (K / 2);
        const float* ar = absmax + n * (K / G);
        __m512 acc[MT];
        for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
            Chunk ch = load_chunk(qr, ar, c, K, G, gidx);
            const float* xc = xp + c * 128;
#pragma GCC unroll 8
            for (int s = 0; s < 8; ++s) {
                __m512 w = lookup(ch, s, table);
                for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + m * xs + s * 16), acc[m]);
            }
        }
        for (int m = 0; m < MT; ++m) store_scalar(y, ydt, m * N + n, _mm512_reduce_add_ps(acc[m]));
    }
}

// Same with bf16 x: weights rounded to bf16 (RNE), pairs multiplied and summed in fp32 by vdpbf16ps.
template <int MT>
void tile_bf16(const uint8_t* q, const float* absmax, __m512 table, const uint16_t* xp, int64_t n0, int64_t n1,
               int64_t K, int64_t G, int64_t C, int64_t N, void* y, int ydt) {
    const __m512i gidx = block_index(G);
    const int64_t xs = C * 128;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* qr = q + n * (K / 2);
        const float* ar = absmax + n * (K / G);
        __m512 acc[MT];
        for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
            Chunk ch = load_chunk(qr, ar, c, K, G, gidx);
            const uint16_t* xc = xp + c * 128;
#pragma GCC unroll 4
            for (int p = 0; p < 4; ++p) {
                __m512bh wb = _mm512_cvtne2ps_pbh(lookup(ch, 2 * p + 1, table), lookup(ch, 2 * p, table));
                for (int m = 0; m < MT; ++m) {
                    __m512i xv = _mm512_loadu_si512(xc + m * xs + p * 32);
                    acc[m] = _mm512_dpbf16_ps(acc[m], wb, reinterpret_cast<__m512bh&>(xv));
                }
            }
        }
        for (int m = 0; m < MT; ++m) store_scalar(y, ydt, m * N + n, _mm512_reduce_add_ps(acc[m]));
    }
}

template <typename X, typename F8, typename F4, typename F2, typename F1>
void run_tiles(int64_t M, int64_t stride, const X* xp, F8 f8, F4 f4, F2 f2, F1 f1) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) f8(xp + m * stride, m);
    if (m + 4 <= M) { f4(xp + m * stride, m); m += 4; }
    if (m + 2 <= M) { f2(xp + m * stride, m); m += 2; }
    if (m < M) f1(xp + m * stride, m);
}

}  // namespace

// y [M, N] (dtype ydt) = x [M, K] (dtype xdt, row stride ldx) @ W^T, W from (q, absmax, table) with block G.
// Returns 0, or 1 when the CPU lacks AVX-512, 2 for an unsupported shape, 3 when scratch memory is unavailable.
SQ_API int sq_lut4_linear(const void* x, int xdt, int64_t M, int64_t K, int64_t ldx, const uint8_t* q,
                          const float* absmax, const float* table16, int64_t N, int64_t G, void* y, int ydt,
                          int nthreads) {
    static const int level = sq_lut4_cpu_level();
    if (level == 0) return 1;
    if (K % 8 || K % G || G < 16 || (128 % G && G % 128)) return 2;
    const int64_t C = (K + 127) / 128;
    const bool bf16 = xdt == SQ_BF16 && M > 1 && level >= 2;
    const int64_t xbytes = M * C * 128 * (bf16 ? 2 : 4);
    void* xp = aligned_alloc(64, (xbytes + 63) / 64 * 64);
    if (!xp) return 3;
    if (bf16) arrange<uint16_t>(x, xdt, M, K, ldx, C, static_cast<uint16_t*>(xp));
    else arrange<float>(x, xdt, M, K, ldx, C, static_cast<float*>(xp));
    const __m512 table = _mm512_loadu_ps(table16);
    const int64_t stride = C * 128;
    const int64_t rows_per_task = 16;
    const int64_t tasks = (N + rows_per_task - 1) / rows_per_task;
    const int ydt_ = ydt;
    char* ybase = static_cast<char*>(y);
    const int64_t ysize = ydt == SQ_F32 ? 4 : 2;
    // dynamic: on a shared machine a descheduled thread must not hold half the rows hostage
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads > 0 ? nthreads : omp_get_max_threads())
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t n0 = t * rows_per_task, n1 = n0 + rows_per_task < N ? n0 + rows_per_task : N;
        if (bf16) {
            auto at = [&](int64_t m) { return ybase + m * N * ysize; };
            run_tiles(M, stride, static_cast<const uint16_t*>(xp),
                [&](const uint16_t* p, int64_t m) { tile_bf16<8>(q, absmax, table, p, n0, n1, K, G, C, N, at(m), ydt_); },
                [&](const uint16_t* p, int64_t m) { tile_bf16<4>(q, absmax, table, p, n0, n1, K, G, C, N, at(m), ydt_); },
                [&](const uint16_t* p, int64_t m) { tile_bf16<2>(q, absmax, table, p, n0, n1, K, G, C, N, at(m), ydt_); },
                [&](const uint16_t* p, int64_t m) { tile_bf16<1>(q, absmax, table, p, n0, n1, K, G, C, N, at(m), ydt_); });
        } else {
            auto at = [&](int64_t m) { return ybase + m * N * ysize; };
            run_tiles(M, stride, static_cast<const float*>(xp),
                [&](const float* p, int64_t m) { tile_f32<8>(q, absmax, table, p, n0, n1, K, G, C, N, at(m), ydt_); },
                [&](const float* p, int64_t m) { tile_f32<4>(q, absmax, table, p, n0, n1, K, G, C, N, at(m), ydt_); },
                [&](const float* p, int64_t m) { tile_f32<2>(q, absmax, table, p, n0, n1, K, G, C, N, at(m), ydt_); },
                [&](const float* p, int64_t m) { tile_f32<1>(q, absmax, table, p, n0, n1, K, G, C, N, at(m), ydt_); });
        }
    }
    free(xp);
    return 0;
}

// W [N, K] in dtype ydt (natural column order): for many activation rows, dequantize once and let a dense GEMM run.
SQ_API int sq_lut4_dequantize(const uint8_t* q, const float* absmax, const float* table16, int64_t N, int64_t K,
                              int64_t G, void* y, int ydt, int nthreads) {
    static const int level = sq_lut4_cpu_level();
    if (level == 0) return 1;
    if (K % 8 || K % G || G < 16 || (128 % G && G % 128)) return 2;
    const int64_t C = (K + 127) / 128;
    const __m512 table = _mm512_loadu_ps(table16);
    const __m512i gidx = block_index(G);
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : omp_get_max_threads())
    for (int64_t n = 0; n < N; ++n) {
        alignas(64) float buf[128];
        for (int64_t c = 0; c < C; ++c) {
            Chunk ch = load_chunk(q + n * (K / 2), absmax + n * (K / G), c, K, G, gidx);
            for (int s = 0; s < 8; ++s) {
                alignas(64) float w[16];
                _mm512_store_ps(w, lookup(ch, s, table));
                for (int l = 0; l < 16; ++l) buf[chunk_col(s, l)] = w[l];
            }
            const int64_t k0 = c * 128, cols = K - k0 < 128 ? K - k0 : 128;
            for (int64_t j = 0; j < cols; ++j) store_scalar(y, ydt, n * K + k0 + j, buf[j]);
        }
    }
    return 0;
}

#pragma GCC pop_options
