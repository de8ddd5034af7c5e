// Byte shuffles between sat_quant's neutral int4 layout and torch's CPU int4 kernel layout
// (``_weight_int4pack_mm_for_cpu``), without unpacking to codes. Plain C ABI, called through ctypes.
//
// Neutral: uint8 [N, K/2], byte j of row r holds code (r, 2j) in the high nibble and (r, 2j+1) in the low one.
// Kernel:  uint8 [N/BN, K, BN/2], byte i of column c in block b holds code (b*BN + i, c) in the low nibble and
//          (b*BN + BN/2 + i, c) in the high one (torch's layout for BN = block_n; the Python side checks it).
// For rows a = b*BN + i and a' = a + BN/2, with bytes A = neutral[a][j] and B = neutral[a'][j]:
//   kernel[b][2j][i] = (A >> 4) | (B & 0xF0)      kernel[b][2j+1][i] = (A & 15) | (B << 4)
// Tiles of 8 rows x 8 bytes are transposed in 64-bit registers, so every load and store moves 8 bytes. Blocks are
// split over a few threads; the pure-torch version of the same expressions (torch_native.py) runs ~10x slower because
// each one is a separate pass with a strided transposed copy at the end.

#include <stdint.h>
#include <string.h>
#include <thread>
#include <vector>

#define SQ_API extern "C" __attribute__((visibility("default")))

SQ_API int sq_int4pack_abi_version(void) { return 1; }

namespace {

template <typename F>
void over_blocks(int64_t blocks, int nthreads, F f) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > blocks) nthreads = static_cast<int>(blocks);
    if (nthreads <= 1) {
        for (int64_t b = 0; b < blocks; ++b) f(b);
        return;
    }
    std::vector<std::thread> team;
    for (int t = 0; t < nthreads; ++t)
        team.emplace_back([=, &f] {
            for (int64_t b = blocks * t / nthreads; b < blocks * (t + 1) / nthreads; ++b) f(b);
        });
    for (auto& th : team) th.join();
}

}  // namespace

// 8x8 byte transpose in eight 64-bit words (byte c of x[r] is element (r, c)): swap 4x4, then 2x2, then 1x1 blocks.
inline void transpose8(uint64_t x[8]) {
    for (int r = 0; r < 4; ++r) {
        const uint64_t t = ((x[r] >> 32) ^ x[r + 4]) & 0x00000000FFFFFFFFull;
        x[r] ^= t << 32, x[r + 4] ^= t;
    }
    for (int r : {0, 1, 4, 5}) {
        const uint64_t t = ((x[r] >> 16) ^ x[r + 2]) & 0x0000FFFF0000FFFFull;
        x[r] ^= t << 16, x[r + 2] ^= t;
    }
    for (int r : {0, 2, 4, 6}) {
        const uint64_t t = ((x[r] >> 8) ^ x[r + 1]) & 0x00FF00FF00FF00FFull;
        x[r] ^= t << 8, x[r + 1] ^= t;
    }
}

constexpr uint64_t LO = 0x0F0F0F0F0F0F0F0Full, HI = 0xF0F0F0F0F0F0F0F0ull;

inline uint64_t load8(const uint8_t* p) { uint64_t v; memcpy(&v, p, 8); return v; }
inline void store8(uint8_t* p, uint64_t v) { memcpy(p, &v, 8); }

// neutral [N, K/2] -> kernel [N/BN, K, BN/2]; returns 1 on a bad shape. Tiles of 8 rows x 8 bytes are transposed
// in registers, then the nibble expressions run on 8 bytes at a time; a tail of K/2 % 8 bytes goes byte by byte.
SQ_API int sq_int4pack_from_neutral(const uint8_t* neutral, int64_t n, int64_t half_k, int64_t block_n,
                                    uint8_t* kernel, int nthreads) {
    if (block_n <= 0 || block_n % 2 || n % block_n) return 1;
    const int64_t half = block_n / 2, whole = half % 8 ? 0 : half_k / 8 * 8;
    over_blocks(n / block_n, nthreads, [=](int64_t b) {
        const uint8_t* rows = neutral + b * block_n * half_k;
        uint8_t* out = kernel + b * block_n * half_k;  // the block's K columns of BN/2 bytes
        for (int64_t i0 = 0; i0 < half && whole; i0 += 8) {
            for (int64_t j0 = 0; j0 < whole; j0 += 8) {
                uint64_t a[8], bb[8];
                for (int r = 0; r < 8; ++r) {
                    a[r] = load8(rows + (i0 + r) * half_k + j0);
                    bb[r] = load8(rows + (i0 + half + r) * half_k + j0);
                }
                transpose8(a), transpose8(bb);  // a[c]: byte r = neutral[i0 + r][j0 + c]
                for (int c = 0; c < 8; ++c) {
                    store8(out + 2 * (j0 + c) * half + i0, ((a[c] >> 4) & LO) | (bb[c] & HI));
                    store8(out + (2 * (j0 + c) + 1) * half + i0, (a[c] & LO) | ((bb[c] << 4) & HI));
                }
            }
        }
        for (int64_t j = whole; j < half_k; ++j)
            for (int64_t i = 0; i < half; ++i) {
                const uint8_t a = rows[i * half_k + j], bb = rows[(i + half) * half_k + j];
                out[2 * j * half + i] = static_cast<uint8_t>((a >> 4) | (bb & 0xF0));
                out[(2 * j + 1) * half + i] = static_cast<uint8_t>((a & 15) | (bb << 4));
            }
    });
    return 0;
}

// kernel [N/BN, K, BN/2] -> neutral [N, K/2]; the inverse of the above.
SQ_API int sq_int4pack_to_neutral(const uint8_t* kernel, int64_t n, int64_t half_k, int64_t block_n,
                                  uint8_t* neutral, int nthreads) {
    if (block_n <= 0 || block_n % 2 || n % block_n) return 1;
    const int64_t half = block_n / 2, whole = half % 8 ? 0 : half_k / 8 * 8;
    over_blocks(n / block_n, nthreads, [=](int64_t b) {
        const uint8_t* in = kernel + b * block_n * half_k;
        uint8_t* rows = neutral + b * block_n * half_k;
        for (int64_t i0 = 0; i0 < half && whole; i0 += 8) {
            for (int64_t j0 = 0; j0 < whole; j0 += 8) {
                uint64_t a[8], bb[8];
                for (int c = 0; c < 8; ++c) {
                    const uint64_t e = load8(in + 2 * (j0 + c) * half + i0);
                    const uint64_t o = load8(in + (2 * (j0 + c) + 1) * half + i0);
                    a[c] = ((e << 4) & HI) | (o & LO);
                    bb[c] = (e & HI) | ((o >> 4) & LO);
                }
                transpose8(a), transpose8(bb);  // a[r]: byte c = neutral[i0 + r][j0 + c]
                for (int r = 0; r < 8; ++r) {
                    store8(rows + (i0 + r) * half_k + j0, a[r]);
                    store8(rows + (i0 + half + r) * half_k + j0, bb[r]);
                }
            }
        }
        for (int64_t j = whole; j < half_k; ++j)
            for (int64_t i = 0; i < half; ++i) {
                const uint8_t e = in[2 * j * half + i], o = in[(2 * j + 1) * half + i];
                rows[i * half_k + j] = static_cast<uint8_t>((e << 4) | (o & 15));
                rows[(i + half) * half_k + j] = static_cast<uint8_t>((e & 0xF0) | (o >> 4));
            }
    });
    return 0;
}
