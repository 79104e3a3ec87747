// Fused dequantize-matvec for floe_jax's quantized bases on CPUs, an XLA FFI custom call.
//
// y[M, N] (float32) = x[M, K] (float32) . decode(q, scale)[N, K]^T, for the formats of
// floe_jax.quant: bf16 (q bfloat16 or its uint16 bit patterns [N, K], scale [N, 0]), int8 (q int8
// [N, K]), int4 and nf4 (q uint8 [N, K/2], element 2j in the low nibble of byte j, 2j+1 in the
// high one), with one float32 scale per group of K/G inputs (scale [N, G]; G = 1 is one scale per
// output row).
// Activations stay float32: each weight is decoded to the float32 value the dequantize-then-float
// reference uses (code * scale) and multiply-added in float32, so results equal that reference up
// to summation order. Each code is read from memory once, whatever M is: rows of weights are
// processed in tiles of 4 (AVX2 int8 against one row of x: one row at a time, `row1`) and, for
// more rows of x than one pass takes (4 on AVX-512, 2 on AVX2), the tile is decoded again from
// cache per pass, or (AVX2, `kScratchRows`) once into scratch.
// Output tiles are split into contiguous chunks run by the calling thread and XLA's own intra-op
// threads (`ffi::ThreadPool`, `parallel_tiles`), so every core's share of the memory bandwidth is
// used without a second thread pool competing with XLA's for the cores.
//
// AVX-512 (F, BW, VL) code when the compiler targets it (-march=native on a machine that has it),
// else AVX2 + FMA code (8 lanes, 2 rows of x per pass: 16 vector registers), a scalar loop
// otherwise. Attribute `act` = 1 instead quantizes x to int8 per block of 32 and sums integer
// products (AVX-512 VNNI, or AVX2; int8 and int4 weights; see "int8 activations" below).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FLOE_QMV_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FLOE_QMV_AVX2 1
#endif

namespace ffi = xla::ffi;

namespace {

enum Format : int32_t { kBF16 = 0, kINT8 = 1, kINT4 = 2, kNF4 = 3 };
enum Scaling { kNone = 0, kRow = 1, kGroup = 2 };  // bf16; one scale per row; per group

// floe_jax.quant.NF4_CODES, and int4's code - 8, as lookup tables.
alignas(64) const float kNF4Table[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
alignas(64) const float kINT4Table[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

constexpr int kRows = 4;  // weight rows per tile
#ifdef FLOE_QMV_AVX512
constexpr int kXRows = 4;  // rows of x per pass over a tile
#else
constexpr int kXRows = 2;  // AVX2: 16 vector registers hold 2 x 4 accumulators and the weights
#endif

// Threads besides the caller that may run chunks of a product, and how to start a task on one
// (XLA's intra-op pool in the FFI handler, less one thread for the caller, so the threads at work
// are no more than the pool's: the caller is either one of them or a thread of its own; none:
// the caller runs every chunk).
struct Workers {
  int64_t helpers = 0;
  std::function<void(std::function<void()>)> schedule;
};

// Runs body(t0, t1) over [0, tiles) in contiguous chunks of tiles (each a stream of weight rows
// the hardware prefetcher follows), claimed from a shared counter by the caller and up to
// `w.helpers` scheduled tasks. The caller never waits for a task to start, only for chunks
// already claimed to end, so a pool whose threads are all busy (XLA running other work, or a
// pool of one thread) cannot deadlock it: the caller then runs every chunk itself. A task that
// starts after the last chunk is claimed touches only the shared counters it owns a reference to.
// An exception in a chunk (a scratch allocation failing) still counts the chunk as done, and the
// first one is rethrown by the caller once every claimed chunk has ended.
void parallel_tiles(const Workers& w, int64_t tiles, bool parallel,
                    const std::function<void(int64_t, int64_t)>& body) {
  const int64_t helpers = parallel ? std::min<int64_t>(w.helpers, tiles - 1) : 0;
  if (helpers <= 0) return body(0, tiles);
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks = 0, per = 0, tiles = 0;
    const std::function<void(int64_t, int64_t)>* body = nullptr;  // valid while chunks run
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // written once, by the chunk that set `failed`
  };
  auto sh = std::make_shared<Shared>();
  sh->chunks = std::min<int64_t>(tiles, 4 * (helpers + 1));
  sh->per = (tiles + sh->chunks - 1) / sh->chunks;
  sh->chunks = (tiles + sh->per - 1) / sh->per;
  sh->tiles = tiles;
  sh->body = &body;
  auto work = [](Shared& s) {
    for (int64_t c; (c = s.next.fetch_add(1, std::memory_order_relaxed)) < s.chunks;) {
      try {
        (*s.body)(c * s.per, std::min(s.tiles, (c + 1) * s.per));
      } catch (...) {
        if (!s.failed.exchange(true)) s.error = std::current_exception();
      }
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) w.schedule([sh, work] { work(*sh); });
  work(*sh);
  for (bool spun = false; sh->done.load(std::memory_order_acquire) < sh->chunks; spun = true)
    if (spun) std::this_thread::yield();
  if (sh->error) std::rethrow_exception(sh->error);
}

template <int F>
inline float decode1(const uint8_t* row, int64_t k) {
  if constexpr (F == kBF16) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else if constexpr (F == kINT8) {
    return float(int8_t(row[k]));
  } else {
    uint8_t b = row[k >> 1];
    int c = (k & 1) ? (b >> 4) : (b & 15);
    return F == kINT4 ? kINT4Table[c] : kNF4Table[c];
  }
}

// Scalar reference loop (machines with neither AVX-512 nor AVX2 + FMA): one output at a time.
template <int F, int S>
void scalar_rows(const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq,
                 const float* scale, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t gs = S == kGroup ? K / G : K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = q + n * ldq;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
      for (int64_t k0 = 0; k0 < K; k0 += gs) {
        const float s = S == kGroup ? scale[n * G + k0 / gs] : 1.f;
        for (int64_t k = k0; k < k0 + gs; ++k) acc += xm[k] * (decode1<F>(row, k) * s);
      }
      y[m * N + n] = S == kRow ? acc * scale[n * G] : acc;
    }
  }
}

#ifdef FLOE_QMV_AVX512

// Tiles read 4 weight rows in interleaved pieces of a few bytes: streams too short for the
// hardware prefetcher, which left the loads stalled (perf, on the 2-vCPU AMD EPYC this was
// written on). Each 64-byte line is prefetched this many rows ahead (past the end: a harmless
// no-op); measured in a C++ harness on a loaded host, one [4864, 896] matrix after another, one
// thread: int8 5.4-6.3 -> 7.2 GB/s, int4 (groups of 64) 3.9-4.1 -> 7.7 GB/s (8 and 16 rows ahead
// did about the same).
constexpr int64_t kFloatPrefetchRows = 8;

inline void prefetch(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// 16 weights of `row` from element k (k even for 4-bit formats), lanes outside `mask` zero codes.
template <int F>
inline __m512 decode16(const uint8_t* row, int64_t k, __mmask16 mask, int valid) {
  if constexpr (F == kBF16) {
    __m256i h = _mm256_maskz_loadu_epi16(mask, row + 2 * k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (F == kINT8) {
    __m128i b = _mm_maskz_loadu_epi8(mask, row + k);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else {
    const __mmask16 bytes = valid == 16 ? 0xFF : __mmask16((1u << ((valid + 1) / 2)) - 1);
    __m128i b = _mm_maskz_loadu_epi8(bytes, row + k / 2);
    const __m128i low = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, low);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    __m512i c = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));  // codes in element order
    return _mm512_permutexvar_ps(c, _mm512_load_ps(F == kINT4 ? kINT4Table : kNF4Table));
  }
}

// y[m0:m0+MT, n0:n0+R] for rows n0.. of q and rows m0.. of x (x, y already offset to m0).
template <int F, int S, int MT, int R>
inline void tile(const float* x, int64_t K, const uint8_t* q, int64_t ldq, const float* scale,
                 int64_t G, float* y, int64_t N, int64_t n0) {
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t groups = S == kGroup ? G : 1;
  const int64_t gs = K / groups;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 s[R];
    if constexpr (S == kGroup)
      for (int r = 0; r < R; ++r) s[r] = _mm512_set1_ps(scale[(n0 + r) * G + g]);
    const int64_t kend = (g + 1) * gs;
    for (int64_t k = g * gs; k < kend; k += 16) {
      const int valid = int(std::min<int64_t>(16, kend - k));
      const __mmask16 mask = valid == 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
      __m512 w[R];
      for (int r = 0; r < R; ++r) {
        const int64_t byte = F == kBF16 ? 2 * k : F == kINT8 ? k : k / 2;
        if (byte % 64 == 0) prefetch(q + (n0 + r + kFloatPrefetchRows) * ldq + byte);
        w[r] = decode16<F>(q + (n0 + r) * ldq, k, mask, valid);
        if constexpr (S == kGroup) w[r] = _mm512_mul_ps(w[r], s[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, w[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float v = _mm512_reduce_add_ps(acc[m][r]);
      if constexpr (S == kRow) v *= scale[(n0 + r) * G];
      y[m * N + n0 + r] = v;
    }
}

// 4-bit formats with groups of a multiple of 32: 16 bytes give 32 codes, the even elements'
// codes in the low nibbles (the table lookup reads an index's low 4 bits only) and the odd ones
// in the high nibbles, against x de-interleaved per 32 inputs (`xe`: 16 even, then 16 odd). With
// one or two rows of x, a group's sum is scaled once at its end instead of every weight.
template <int F, int S, int MT, int R>
inline void tile4(const float* xe, int64_t K, const uint8_t* q, int64_t ldq, const float* scale,
                  int64_t G, float* y, int64_t N, int64_t n0) {
  constexpr bool partial = S == kGroup && MT <= 2;
  const __m512 table = _mm512_load_ps(F == kINT4 ? kINT4Table : kNF4Table);
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t groups = S == kGroup ? G : 1;
  const int64_t gs = K / groups;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 s[R], part[MT][R];
    if constexpr (S == kGroup)
      for (int r = 0; r < R; ++r) s[r] = _mm512_set1_ps(scale[(n0 + r) * G + g]);
    if constexpr (partial)
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < R; ++r) part[m][r] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
      __m512 we[R], wo[R];
      for (int r = 0; r < R; ++r) {
        if (k % 128 == 0) prefetch(q + (n0 + r + kFloatPrefetchRows) * ldq + k / 2);
        const auto* p = reinterpret_cast<const __m128i*>(q + (n0 + r) * ldq + k / 2);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(p));
        we[r] = _mm512_permutexvar_ps(b, table);
        wo[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
        if constexpr (S == kGroup && !partial) {
          we[r] = _mm512_mul_ps(we[r], s[r]);
          wo[r] = _mm512_mul_ps(wo[r], s[r]);
        }
      }
      for (int m = 0; m < MT; ++m) {
        const __m512 xa = _mm512_loadu_ps(xe + m * K + k);
        const __m512 xb = _mm512_loadu_ps(xe + m * K + k + 16);
        for (int r = 0; r < R; ++r) {
          __m512& a = partial ? part[m][r] : acc[m][r];
          a = _mm512_fmadd_ps(xb, wo[r], _mm512_fmadd_ps(xa, we[r], a));
        }
      }
    }
    if constexpr (partial)
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(part[m][r], s[r], acc[m][r]);
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float v = _mm512_reduce_add_ps(acc[m][r]);
      if constexpr (S == kRow) v *= scale[(n0 + r) * G];
      y[m * N + n0 + r] = v;
    }
}

#elif defined(FLOE_QMV_AVX2)

// The AVX-512 path's structure on 8 lanes: the same tiles, prefetch and de-interleaved 4-bit
// codes; a group's last inputs that fill no vector (K or a group not a multiple of 8) are
// multiply-added one by one, as the scalar loop does.
constexpr int64_t kFloatPrefetchRows = 8;

// Past this many rows of x a tile is decoded once into scratch (`tile_buffered`) rather than
// once per pass of 2 rows: 4-bit codes (about 3x int8's instructions per byte to decode) from 3
// rows on, int8 and bf16 codes only past a batched decode step's 8 rows (at 8 rows their passes
// were faster: a batch-8 step of Qwen2.5-0.5B shapes took 135 ms over int8 codes in passes, 171
// ms through scratch; `bench decode`).
template <int F>
constexpr int64_t kScratchRows = (F == kINT4 || F == kNF4) ? 2 : 8;

inline void prefetch(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Each accumulator's lanes summed (times the row's scale, for one scale per row) into
// y[m * N + n0 + r].
template <int S, int MT, int R>
inline void store_sums(const __m256 (&acc)[MT][R], const float* scale, int64_t G, float* y,
                       int64_t N, int64_t n0) {
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float v = hsum(acc[m][r]);
      if constexpr (S == kRow) v *= scale[(n0 + r) * G];
      y[m * N + n0 + r] = v;
    }
}

// The weights of 8 4-bit codes (32-bit lanes holding 0..15): int4 is code - 8; NF4 looks the
// code up in its 16-float table, two 8-float halves chosen by bit 3.
template <int F>
inline __m256 decode_codes(__m256i c) {
  if constexpr (F == kINT4) {
    return _mm256_sub_ps(_mm256_cvtepi32_ps(c), _mm256_set1_ps(8.f));
  } else {
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(kNF4Table), c);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(kNF4Table + 8), c);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
  }
}

// 8 weights of `row` from element k (k even for 4-bit formats).
template <int F>
inline __m256 decode8(const uint8_t* row, int64_t k) {
  if constexpr (F == kBF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (F == kINT8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else {
    uint32_t w;
    std::memcpy(&w, row + k / 2, 4);
    const __m128i b = _mm_cvtsi32_si128(int(w)), low = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    return decode_codes<F>(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));  // element order
  }
}

// y[m0:m0+MT, n0:n0+R] for rows n0.. of q and rows m0.. of x (x, y already offset to m0).
template <int F, int S, int MT, int R>
inline void tile(const float* x, int64_t K, const uint8_t* q, int64_t ldq, const float* scale,
                 int64_t G, float* y, int64_t N, int64_t n0) {
  __m256 acc[MT][R];
  float rest[MT][R] = {};
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t groups = S == kGroup ? G : 1;
  const int64_t gs = K / groups;
  for (int64_t g = 0; g < groups; ++g) {
    float sf[R];
    __m256 s[R];
    if constexpr (S == kGroup)
      for (int r = 0; r < R; ++r) s[r] = _mm256_set1_ps(sf[r] = scale[(n0 + r) * G + g]);
    const int64_t kend = (g + 1) * gs, kvec = g * gs + gs / 8 * 8;
    for (int64_t k = g * gs; k < kvec; k += 8) {
      __m256 w[R];
      for (int r = 0; r < R; ++r) {
        const int64_t byte = F == kBF16 ? 2 * k : F == kINT8 ? k : k / 2;
        if (byte % 64 == 0) prefetch(q + (n0 + r + kFloatPrefetchRows) * ldq + byte);
        w[r] = decode8<F>(q + (n0 + r) * ldq, k);
        if constexpr (S == kGroup) w[r] = _mm256_mul_ps(w[r], s[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, w[r], acc[m][r]);
      }
    }
    for (int64_t k = kvec; k < kend; ++k)
      for (int r = 0; r < R; ++r) {
        const float w = decode1<F>(q + (n0 + r) * ldq, k) * (S == kGroup ? sf[r] : 1.f);
        for (int m = 0; m < MT; ++m) rest[m][r] += x[m * K + k] * w;
      }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float v = hsum(acc[m][r]) + rest[m][r];
      if constexpr (S == kRow) v *= scale[(n0 + r) * G];
      y[m * N + n0 + r] = v;
    }
}

// One weight row against one row of x (a decode step over int8 codes; bf16's rows, twice as long,
// were as fast in tiles): one stream of weight bytes, where a tile's rows side by side are streams
// too short for the hardware prefetcher, and four sums, where one is a chain of multiply-adds each
// waiting for the last.
template <int S>
inline void row1(const float* x, int64_t K, const uint8_t* q, int64_t ldq, const float* scale,
                 int64_t G, float* y, int64_t n) {
  const uint8_t* row = q + n * ldq;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  float rest = 0.f;
  const int64_t groups = S == kGroup ? G : 1;
  const int64_t gs = K / groups;
  for (int64_t g = 0; g < groups; ++g) {
    const float sf = S == kGroup ? scale[n * G + g] : 1.f;
    const __m256 s = _mm256_set1_ps(sf);
    auto step = [&](int64_t k, __m256& a) {
      if (k % 64 == 0) prefetch(row + kFloatPrefetchRows * ldq + k);
      __m256 w = decode8<kINT8>(row, k);
      if constexpr (S == kGroup) w = _mm256_mul_ps(w, s);
      a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), w, a);
    };
    const int64_t kend = (g + 1) * gs, kvec = g * gs + gs / 8 * 8;
    int64_t k = g * gs;
    for (; k + 32 <= kvec; k += 32)
      for (int u = 0; u < 4; ++u) step(k + 8 * u, acc[u]);
    for (; k < kvec; k += 8) step(k, acc[0]);
    for (; k < kend; ++k) rest += x[k] * (decode1<kINT8>(row, k) * sf);
  }
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  float v = hsum(sum) + rest;
  if constexpr (S == kRow) v *= scale[n * G];
  y[n] = v;
}

// 4-bit formats with groups of a multiple of 32 (as the AVX-512 tile4): 16 bytes give 32 codes,
// the even elements' in the low nibbles, the odd ones' in the high nibbles, against x
// de-interleaved per 32 inputs (`xe`: 16 even, then 16 odd). With one row of x, a group's sum is
// scaled once at its end instead of every weight.
template <int F, int S, int MT, int R>
inline void tile4(const float* xe, int64_t K, const uint8_t* q, int64_t ldq, const float* scale,
                  int64_t G, float* y, int64_t N, int64_t n0) {
  constexpr bool partial = S == kGroup && MT == 1;
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t groups = S == kGroup ? G : 1;
  const int64_t gs = K / groups;
  const __m128i low = _mm_set1_epi8(15);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 s[R], part[R];
    if constexpr (S == kGroup)
      for (int r = 0; r < R; ++r) s[r] = _mm256_set1_ps(scale[(n0 + r) * G + g]);
    if constexpr (partial)
      for (int r = 0; r < R; ++r) part[r] = _mm256_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
      for (int r = 0; r < R; ++r) {
        if (k % 128 == 0) prefetch(q + (n0 + r + kFloatPrefetchRows) * ldq + k / 2);
        const __m128i b =
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (n0 + r) * ldq + k / 2));
        const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        // int4: code - 8 in bytes (one integer op per 16 codes), then sign-extended and
        // converted; NF4: the table lookup.
        auto widen = [](__m128i c) {
          if constexpr (F == kINT4)
            return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
          else
            return decode_codes<F>(_mm256_cvtepu8_epi32(c));
        };
        __m128i a = lo, c = hi;
        if constexpr (F == kINT4)
          a = _mm_sub_epi8(lo, _mm_set1_epi8(8)), c = _mm_sub_epi8(hi, _mm_set1_epi8(8));
        __m256 w[4] = {widen(a), widen(_mm_srli_si128(a, 8)), widen(c),
                       widen(_mm_srli_si128(c, 8))};
        if constexpr (S == kGroup && !partial)
          for (auto& v : w) v = _mm256_mul_ps(v, s[r]);
        for (int m = 0; m < MT; ++m) {
          __m256& a = partial ? part[r] : acc[m][r];
          const float* xm = xe + m * K + k;
          for (int i = 0; i < 4; ++i) a = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8 * i), w[i], a);
        }
      }
    }
    if constexpr (partial)
      for (int r = 0; r < R; ++r) acc[0][r] = _mm256_fmadd_ps(part[r], s[r], acc[0][r]);
  }
  store_sums<S>(acc, scale, G, y, N, n0);
}

// More rows of x than one pass takes (a short prompt's prefill): the tile's R weight rows are
// decoded once into float32 scratch [R, K] (cache-resident) and every pair of x rows is
// multiply-added against it, where the tiles above would decode them again for each pass.
template <int MT, int R>
inline void buffered_pass(const float* x, int64_t K, const float* buf, const float* scale,
                          int64_t G, bool per_row, float* y, int64_t N, int64_t n0) {
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t kvec = K / 8 * 8;
  for (int64_t k = 0; k < kvec; k += 8) {
    __m256 w[R];
    for (int r = 0; r < R; ++r) w[r] = _mm256_loadu_ps(buf + r * K + k);
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, w[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float v = hsum(acc[m][r]);
      for (int64_t k = kvec; k < K; ++k) v += x[m * K + k] * buf[r * K + k];
      if (per_row) v *= scale[(n0 + r) * G];
      y[m * N + n0 + r] = v;
    }
}

template <int F, int S, int R>
inline void tile_buffered(const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq,
                          const float* scale, int64_t G, float* y, int64_t N, int64_t n0,
                          float* buf) {
  const int64_t groups = S == kGroup ? G : 1;
  const int64_t gs = K / groups;
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = q + (n0 + r) * ldq;
    float* br = buf + r * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float sf = S == kGroup ? scale[(n0 + r) * G + g] : 1.f;
      const __m256 s = _mm256_set1_ps(sf);
      const int64_t kend = (g + 1) * gs, kvec = g * gs + gs / 8 * 8;
      for (int64_t k = g * gs; k < kvec; k += 8) {
        __m256 w = decode8<F>(row, k);
        if constexpr (S == kGroup) w = _mm256_mul_ps(w, s);
        _mm256_storeu_ps(br + k, w);
      }
      for (int64_t k = kvec; k < kend; ++k) br[k] = decode1<F>(row, k) * sf;
    }
  }
  int64_t m0 = 0;
  for (; m0 + 2 <= M; m0 += 2)
    buffered_pass<2, R>(x + m0 * K, K, buf, scale, G, S == kRow, y + m0 * N, N, n0);
  if (m0 < M) buffered_pass<1, R>(x + m0 * K, K, buf, scale, G, S == kRow, y + m0 * N, N, n0);
}

#endif

#if defined(FLOE_QMV_AVX512) || defined(FLOE_QMV_AVX2)

template <int F, int S, int R>
inline void tile_m(int mt, bool fast4, const float* x, int64_t K, const uint8_t* q, int64_t ldq,
                   const float* scale, int64_t G, float* y, int64_t N, int64_t n0) {
  if constexpr (F == kINT4 || F == kNF4) {
    if (fast4) {
      if constexpr (kXRows > 2) {
        if (mt == 3) return tile4<F, S, 3, R>(x, K, q, ldq, scale, G, y, N, n0);
        if (mt == 4) return tile4<F, S, kXRows, R>(x, K, q, ldq, scale, G, y, N, n0);
      }
      if (mt == 1) return tile4<F, S, 1, R>(x, K, q, ldq, scale, G, y, N, n0);
      return tile4<F, S, 2, R>(x, K, q, ldq, scale, G, y, N, n0);
    }
  }
  if constexpr (kXRows > 2) {  // AVX-512 passes take up to 4 rows, AVX2's 2
    if (mt == 3) return tile<F, S, 3, R>(x, K, q, ldq, scale, G, y, N, n0);
    if (mt == 4) return tile<F, S, kXRows, R>(x, K, q, ldq, scale, G, y, N, n0);
  }
  if (mt == 1) return tile<F, S, 1, R>(x, K, q, ldq, scale, G, y, N, n0);
  return tile<F, S, 2, R>(x, K, q, ldq, scale, G, y, N, n0);
}

// Output rows [n0, n1) for every row of x (through `scratch` [kRows, K] where it is given).
template <int F, int S>
void rows(bool fast4, float* scratch, const float* x, int64_t M, int64_t K, const uint8_t* q,
          int64_t ldq, const float* scale, int64_t G, float* y, int64_t N, int64_t n0,
          int64_t n1) {
  for (int64_t n = n0; n < n1;) {
    const bool full = n + kRows <= n1;
#ifdef FLOE_QMV_AVX2
    if (scratch != nullptr) {
      if (full)
        tile_buffered<F, S, kRows>(x, M, K, q, ldq, scale, G, y, N, n, scratch);
      else
        tile_buffered<F, S, 1>(x, M, K, q, ldq, scale, G, y, N, n, scratch);
      n += full ? kRows : 1;
      continue;
    }
    if constexpr (F == kINT8)
      if (M == 1) {
        for (const int64_t n1r = std::min(n1, n + kRows); n < n1r; ++n)
          row1<S>(x, K, q, ldq, scale, G, y, n);
        continue;
      }
#endif
    for (int64_t m0 = 0; m0 < M; m0 += kXRows) {
      const int mt = int(std::min<int64_t>(kXRows, M - m0));
      if (full)
        tile_m<F, S, kRows>(mt, fast4, x + m0 * K, K, q, ldq, scale, G, y + m0 * N, N, n);
      else
        tile_m<F, S, 1>(mt, fast4, x + m0 * K, K, q, ldq, scale, G, y + m0 * N, N, n);
    }
    n += full ? kRows : 1;
  }
}

#else

template <int F, int S>
void rows(bool, float*, const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq,
          const float* scale, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  scalar_rows<F, S>(x, M, K, q, ldq, scale, G, y, N, n0, n1);
}

#endif

// ----------------------------------------------------------------------------- int8 activations
//
// With act = 1 (int8 and int4 weights), x is quantized per block of 32 inputs as llama.cpp's
// Q8_0 does: for row m and block b = inputs [32b, min(32b + 32, K)), a = max |x|, d = a / 127
// (float32), xq = rint(x / d) (float32 division, round half to even, clipped to +-127; 0 where
// d = 0; a non-finite a makes d NaN, so the output is NaN as in the float path). Then
//   y[m, n] = sum_b d[m, b] * s[n, group(b)] * sum_{k in b} xq[m, k] * c[n, k]
// (per-row scales: s[n] once after the sum), with c the integer codes (int8: [-127, 127]; int4:
// code - 8) and the inner sums exact in int32. AVX-512 VNNI's vpdpbusd multiplies 64 unsigned
// bytes by 64 signed ones and adds each 4 products into a 32-bit lane: the weights are the
// unsigned side (int8: c + 128, the sign bit flipped; int4: the stored nibble, c + 8) and the
// accumulator starts at -bias * (sum of the lane's xq), so every lane holds an exact sum of
// c * xq (every partial value below 4 * 255 * 127 + 4 * 128 * 127 < 2^18: no overflow) before
// it is converted to float once and scaled by its block's d (and group's s). Blocks must not
// straddle weight groups: groups are multiples of 32 inputs.
//
// Lane layout. int8: a vector is 64 consecutive inputs, 32-bit lane l holds inputs 4l..4l+3
// (block l / 8 of the two). int4: a vector is 64 bytes = 128 inputs; byte p holds inputs 2p (low
// nibble) and 2p + 1 (high); the low nibbles are multiplied by xq de-interleaved (byte p: input
// 2p) and the high ones by the odd inputs, so lane l sums inputs 8l..8l+7 (block l / 4).

#if (defined(FLOE_QMV_AVX512) && defined(__AVX512VNNI__)) || defined(FLOE_QMV_AVX2)
#define FLOE_QMV_INT8_ACT 1

// Weight rows per tile and how far ahead (in rows) a tile prefetches its bytes, per format.
// Measured on the 2-vCPU AMD EPYC (Zen 4) the VNNI path was written on, one [4864, 896] matrix
// after another, loaded host: 4-row tiles left the loads stalled (4 interleaved 896-byte streams
// are too short for the hardware prefetcher) at ~7 GB/s of int8; single rows, prefetched 8 rows
// ahead, ran 12-15 GB/s. int4 (half the bytes per row, more arithmetic per byte) ran best in
// pairs of rows prefetched 16 rows ahead. On AVX2 (the Zen 3 host; a C++ harness timing a
// Qwen2.5-0.5B decode step's 97 products, two builds alternately) 4 int4 rows per tile, sharing
// each load of x's codes, took 0.956x the time of pairs at 1 row of x, 0.92x at 2, 0.86x at 32.
template <int F>
#ifdef FLOE_QMV_AVX2
constexpr int64_t kI8Rows = F == kINT8 ? 1 : 4;
#else
constexpr int64_t kI8Rows = F == kINT8 ? 1 : 2;
#endif
template <int F>
constexpr int64_t kPrefetchRows = F == kINT8 ? 8 : 16;

// Row `xm` [K] quantized by the rule above: codes[k] for k < K (0 in a block whose d is not > 0),
// d per block into dblk [(K + 31) / 32].
inline void quantize_row(const float* xm, int64_t K, int8_t* codes, float* dblk) {
  for (int64_t b = 0; b < (K + 31) / 32; ++b) {
    const int64_t k0 = 32 * b, k1 = std::min(K, k0 + 32);
    float a = 0.f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      a = std::max(a, std::fabs(xm[k]));
      finite &= std::isfinite(xm[k]);
    }
    const float d = finite ? a / 127.f : std::numeric_limits<float>::quiet_NaN();
    dblk[b] = d;
    if (!(d > 0.f)) {  // zero block (codes 0) or non-finite (d NaN)
      std::fill(codes + k0, codes + k1, int8_t(0));
      continue;
    }
    for (int64_t k = k0; k < k1; ++k) {
      const float v = std::nearbyint(xm[k] / d);
      codes[k] = int8_t(std::max(-127.f, std::min(127.f, v)));
    }
  }
}

#endif

#if defined(FLOE_QMV_AVX512) && defined(__AVX512VNNI__)

// x quantized for one format: per row, `nv` vectors of codes (int8: 64 bytes; int4: 64 even then
// 64 odd), each with 16 lane scales (d of the lane's block) and 16 lane corrections.
struct QuantizedX {
  int64_t nv = 0, vbytes = 0;
  std::vector<int8_t> q;        // [M, nv, vbytes]
  std::vector<float> d;         // [M, nv, 16]
  std::vector<int32_t> corr;    // [M, nv, 16]
};

template <int F>
QuantizedX quantize_x(const float* x, int64_t M, int64_t K) {
  constexpr int64_t span = F == kINT8 ? 64 : 128;  // inputs per vector
  constexpr int32_t bias = F == kINT8 ? 128 : 8;
  QuantizedX qx;
  qx.nv = (K + span - 1) / span;
  qx.vbytes = F == kINT8 ? 64 : 128;
  qx.q.assign(M * qx.nv * qx.vbytes, 0);
  qx.d.assign(M * qx.nv * 16, 0.f);
  qx.corr.assign(M * qx.nv * 16, 0);
  const int64_t nb = (K + 31) / 32;
  std::vector<int8_t> row(qx.nv * span);
  std::vector<float> dblk(nb);
  for (int64_t m = 0; m < M; ++m) {
    std::fill(row.begin(), row.end(), int8_t(0));
    quantize_row(x + m * K, K, row.data(), dblk.data());
    for (int64_t v = 0; v < qx.nv; ++v) {
      int8_t* qv = qx.q.data() + (m * qx.nv + v) * qx.vbytes;
      float* dv = qx.d.data() + (m * qx.nv + v) * 16;
      int32_t* cv = qx.corr.data() + (m * qx.nv + v) * 16;
      const int8_t* src = row.data() + v * span;
      if constexpr (F == kINT8) {
        std::memcpy(qv, src, 64);
      } else {
        for (int p = 0; p < 64; ++p) {
          qv[p] = src[2 * p];
          qv[64 + p] = src[2 * p + 1];
        }
      }
      for (int l = 0; l < 16; ++l) {
        const int64_t per = span / 16;  // inputs per lane: 4 or 8
        const int64_t b = (v * span + l * per) / 32;
        dv[l] = b < nb ? dblk[b] : 0.f;
        int32_t s = 0;
        for (int64_t i = 0; i < per; ++i) s += src[l * per + i];
        cv[l] = -bias * s;
      }
    }
  }
  return qx;
}

// y[m0:m0+MT, n0:n0+R] with x quantized (`qx` rows from m0).
template <int F, int S, int MT, int R>
inline void tile_i8(const QuantizedX& qx, int64_t m0, int64_t K, const uint8_t* q, int64_t ldq,
                    const float* scale, int64_t G, float* y, int64_t N, int64_t n0) {
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t gs = S == kGroup ? K / G : K;
  const int64_t rowbytes = F == kINT8 ? K : K / 2;
  const __m512i flip = _mm512_set1_epi8(char(0x80)), low = _mm512_set1_epi8(15);
  const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t v = 0; v < qx.nv; ++v) {
    const int64_t b0 = 64 * v;  // first byte of the vector in a weight row
    const int64_t nbytes = std::min<int64_t>(64, rowbytes - b0);
    const __mmask64 mask = nbytes == 64 ? ~__mmask64(0) : (__mmask64(1) << nbytes) - 1;
    __m512i w0[R], w1[R];
    __m512 sw[R];
    for (int r = 0; r < R; ++r) {
      // Prefetch the same bytes `kPrefetchRows` rows ahead (past the end: a harmless no-op).
      prefetch(q + (n0 + r + kPrefetchRows<F>) * ldq + b0);
      const __m512i b = _mm512_maskz_loadu_epi8(mask, q + (n0 + r) * ldq + b0);
      if constexpr (F == kINT8) {
        w0[r] = _mm512_xor_si512(b, flip);  // c + 128 (masked bytes: x is 0 there)
      } else {
        w0[r] = _mm512_and_si512(b, low);
        w1[r] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      }
      if constexpr (S == kGroup) {
        const float* s = scale + (n0 + r) * G;
        if constexpr (F == kINT8) {  // lanes 0-7: inputs 64v.., lanes 8-15: 64v + 32..
          const float s0 = s[(64 * v) / gs], s1 = s[std::min(K - 1, 64 * v + 32) / gs];
          sw[r] = _mm512_mask_mov_ps(_mm512_set1_ps(s0), 0xFF00, _mm512_set1_ps(s1));
        } else if (gs % 128 == 0) {
          sw[r] = _mm512_set1_ps(s[(128 * v) / gs]);
        } else if (gs % 64 == 0) {  // lanes 0-7: inputs 128v.., lanes 8-15: 128v + 64..
          const float s0 = s[(128 * v) / gs], s1 = s[std::min(K - 1, 128 * v + 64) / gs];
          sw[r] = _mm512_mask_mov_ps(_mm512_set1_ps(s0), 0xFF00, _mm512_set1_ps(s1));
        } else {  // a block past K (a partial last vector) reads the last group: its x is 0
          auto at = [&](int64_t k) { return s[std::min(k, K - 1) / gs]; };
          const __m128 s4 = _mm_setr_ps(at(128 * v), at(128 * v + 32), at(128 * v + 64),
                                        at(128 * v + 96));
          sw[r] = _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(s4));
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t at = (m0 + m) * qx.nv + v;
      const int8_t* xq = qx.q.data() + at * qx.vbytes;
      const __m512i x0 = _mm512_loadu_si512(xq);
      const __m512i c = _mm512_loadu_si512(qx.corr.data() + at * 16);
      const __m512 d = _mm512_loadu_ps(qx.d.data() + at * 16);
      __m512i x1;
      if constexpr (F != kINT8) x1 = _mm512_loadu_si512(xq + 64);
      for (int r = 0; r < R; ++r) {
        __m512i i = _mm512_dpbusd_epi32(c, w0[r], x0);
        if constexpr (F != kINT8) i = _mm512_dpbusd_epi32(i, w1[r], x1);
        const __m512 f = _mm512_cvtepi32_ps(i);
        if constexpr (S == kGroup)
          acc[m][r] = _mm512_fmadd_ps(_mm512_mul_ps(f, d), sw[r], acc[m][r]);
        else
          acc[m][r] = _mm512_fmadd_ps(f, d, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float v = _mm512_reduce_add_ps(acc[m][r]);
      if constexpr (S == kRow) v *= scale[(n0 + r) * G];
      y[(m0 + m) * N + n0 + r] = v;
    }
}

#elif defined(FLOE_QMV_AVX2)

// AVX2 has no VNNI: bytes are multiplied with vpmaddubsw (unsigned times signed bytes, pairs
// summed to int16), summed to 8 int32 lanes with vpmaddwd, converted to float and scaled by d
// times the weight group's scale.
// - int8: per 32-input block, |c| (unsigned) times x with c's sign, every pair sum within
//   +-2 * 128 * 127 (no int16 saturation); x per row: nb blocks of 32 codes.
// - int4: per vector of 64 inputs (32 weight bytes, one load), the low nibbles (c + 8, unsigned)
//   times the 32 even inputs' codes and the high nibbles times the 32 odd ones, the two int16
//   results added before vpmaddwd (each within 2 * 2 * 15 * 127: no saturation), so int32 lane l
//   sums inputs 8l..8l+7 and lanes 0-3 / 4-7 fall in the vector's first / second block of 32.
//   Each lane is then corrected by -8 * (the sum of its 8 x codes), as the VNNI path does. x per
//   row: nv vectors of 64 codes (32 even, 32 odd), with per-lane d and corrections; 0 past K.
struct QuantizedX {
  int64_t nb = 0, nv = 0;
  std::vector<int8_t> q;      // int8: [M, nb, 32]; int4: [M, nv, 64]
  std::vector<float> d;       // int8: [M, nb]; int4: [M, nv, 8] (lane l: d of block 2v + l / 4)
  std::vector<int32_t> corr;  // int4: [M, nv, 8]
};

template <int F>
QuantizedX quantize_x(const float* x, int64_t M, int64_t K) {
  QuantizedX qx;
  qx.nb = (K + 31) / 32;
  qx.nv = (K + 63) / 64;
  std::vector<int8_t> row(F == kINT8 ? 0 : qx.nv * 64);    // int4: one row's codes
  std::vector<float> dblk(F == kINT8 ? 0 : 2 * qx.nv, 0.f);  // int4: its block scales
  if constexpr (F == kINT8) {
    qx.q.assign(M * qx.nb * 32, 0);
    qx.d.assign(M * qx.nb, 0.f);
  } else {
    qx.q.assign(M * qx.nv * 64, 0);
    qx.d.assign(M * qx.nv * 8, 0.f);
    qx.corr.assign(M * qx.nv * 8, 0);
  }
  for (int64_t m = 0; m < M; ++m) {
    std::fill(row.begin(), row.end(), int8_t(0));
    if constexpr (F == kINT8) {
      quantize_row(x + m * K, K, qx.q.data() + m * qx.nb * 32, qx.d.data() + m * qx.nb);
      continue;
    }
    quantize_row(x + m * K, K, row.data(), dblk.data());
    for (int64_t v = 0; v < qx.nv; ++v) {
      const int64_t at = m * qx.nv + v;
      int8_t* dst = qx.q.data() + 64 * at;
      const int8_t* src = row.data() + 64 * v;
      for (int p = 0; p < 32; ++p) {
        dst[p] = src[2 * p];
        dst[32 + p] = src[2 * p + 1];
      }
      for (int l = 0; l < 8; ++l) {
        int32_t sum = 0;
        for (int i = 0; i < 8; ++i) sum += src[8 * l + i];
        qx.corr[8 * at + l] = -8 * sum;
        qx.d[8 * at + l] = dblk[2 * v + l / 4];
      }
    }
  }
  return qx;
}

// The tiles' loops over whole 32-byte pieces of a weight row (`kBody`) and over the partial
// last one (`kTail`), told apart at compile time.
constexpr std::false_type kBody{};
constexpr std::true_type kTail{};

// 32 bytes of a weight row from p, or (Tail) the `left` < 32 bytes the row has left, then zeros
// (they meet zero codes of x).
template <bool Tail>
inline __m256i load_row32(const uint8_t* p, int64_t left) {
  if constexpr (Tail) {
    alignas(32) uint8_t buf[32] = {};
    std::memcpy(buf, p, left);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
}

// y[m0:m0+MT, n0:n0+R] with x quantized (`qx` rows from m0), int8 weights.
template <int F, int S, int MT, int R>
inline void tile_i8(const QuantizedX& qx, int64_t m0, int64_t K, const uint8_t* q, int64_t ldq,
                    const float* scale, int64_t G, float* y, int64_t N, int64_t n0) {
  static_assert(F == kINT8);
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  // Groups outermost (a multiple of 32 inputs: whole blocks), each group's sum of d-scaled
  // blocks scaled by its weight scale at its end; one scale per row: after the whole sum.
  const int64_t groups = S == kGroup ? G : 1;
  const int64_t per_group = S == kGroup ? K / G / 32 : qx.nb;  // blocks
  const __m256i ones = _mm256_set1_epi16(1);
  // Block b of every row into part (`tail`: the partial last block).
  auto block = [&](int64_t b, __m256 (&part)[MT][R], auto tail) {
    const int64_t k0 = 32 * b;
    __m256i w[R];    // |c|
    __m256i sgn[R];  // c, whose sign goes to x
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = q + (n0 + r) * ldq + k0;
      if (b % 2 == 0) prefetch(p + kPrefetchRows<F> * ldq);  // past the end: a no-op
      sgn[r] = load_row32<decltype(tail)::value>(p, K - k0);
      w[r] = _mm256_abs_epi8(sgn[r]);  // -128 becomes 128 as an unsigned byte
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t at = (m0 + m) * qx.nb + b;
      const __m256i xv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.q.data() + 32 * at));
      const __m256 d = _mm256_set1_ps(qx.d[at]);
      for (int r = 0; r < R; ++r) {
        const __m256i i =
            _mm256_madd_epi16(_mm256_maddubs_epi16(w[r], _mm256_sign_epi8(xv, sgn[r])), ones);
        part[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), d, part[m][r]);
      }
    }
  };
  for (int64_t g = 0; g < groups; ++g) {
    // Two sums, of the even and of the odd blocks: with one row per tile a single sum is a
    // chain of multiply-adds, one per block, each waiting for the last.
    __m256 part[2][MT][R];
    for (auto& pm : part)
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < R; ++r) pm[m][r] = _mm256_setzero_ps();
    const int64_t b1 = std::min(qx.nb, (g + 1) * per_group), whole = std::min(b1, K / 32);
    int64_t b = g * per_group;
    for (; b + 1 < whole; b += 2) {
      block(b, part[0], kBody);
      block(b + 1, part[1], kBody);
    }
    for (; b < b1; ++b) {
      if (b < whole)
        block(b, part[0], kBody);
      else
        block(b, part[0], kTail);
    }
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) {
        const __m256 sum = _mm256_add_ps(part[0][m][r], part[1][m][r]);
        acc[m][r] = S == kGroup ? _mm256_fmadd_ps(sum, _mm256_set1_ps(scale[(n0 + r) * G + g]),
                                                  acc[m][r])
                                : sum;
      }
  }
  store_sums<S>(acc, scale, G, y + m0 * N, N, n0);
}

// The same for int4 weights, per vector of 64 inputs. Groups of a multiple of 64 inputs (the
// default 64) and one scale per row take the fast loop: whole vectors, a group's scale fetched
// once per group (not per vector: an index division per vector and row was the loop's cost).
template <int S, int MT, int R>
inline void tile_i4(const QuantizedX& qx, int64_t m0, int64_t K, const uint8_t* q, int64_t ldq,
                    const float* scale, int64_t G, float* y, int64_t N, int64_t n0) {
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t gs = S == kGroup ? K / G : K, rowbytes = K / 2;
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  // Vector v of every row into acc, each row's lanes scaled by sw[r] (with S == kGroup).
  auto vec = [&](int64_t v, const __m256* sw, auto tail) {
    const int64_t b0 = 32 * v;  // first byte of the vector in a weight row
    __m256i lo[R], hi[R];       // c + 8 of the even and of the odd inputs
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = q + (n0 + r) * ldq + b0;
      if (v % 2 == 0) prefetch(p + kPrefetchRows<kINT4> * ldq);  // past the end: a no-op
      const __m256i c = load_row32<decltype(tail)::value>(p, rowbytes - b0);
      lo[r] = _mm256_and_si256(c, low);
      hi[r] = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t at = (m0 + m) * qx.nv + v;
      const int8_t* xq = qx.q.data() + 64 * at;
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
      const __m256i corr =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.corr.data() + 8 * at));
      const __m256 d = _mm256_loadu_ps(qx.d.data() + 8 * at);
      for (int r = 0; r < R; ++r) {
        const __m256i h = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xe),
                                           _mm256_maddubs_epi16(hi[r], xo));
        const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(h, ones), corr));
        acc[m][r] = _mm256_fmadd_ps(f, S == kGroup ? _mm256_mul_ps(d, sw[r]) : d, acc[m][r]);
      }
    }
  };
  const int64_t whole = rowbytes / 32;  // vectors wholly inside a row
  __m256 sw[R];
  if (S != kGroup || gs % 64 == 0) {
    const int64_t per = S == kGroup ? gs / 64 : whole;  // whole vectors per group
    for (int64_t g = 0, v = 0; v < whole; ++g) {
      if constexpr (S == kGroup)
        for (int r = 0; r < R; ++r) sw[r] = _mm256_set1_ps(scale[(n0 + r) * G + g]);
      for (const int64_t v1 = std::min(whole, v + per); v < v1; ++v) vec(v, sw, kBody);
    }
  }
  for (int64_t v = S != kGroup || gs % 64 == 0 ? whole : 0; v < qx.nv; ++v) {
    if constexpr (S == kGroup)  // a block past K (a partial last vector) reads the last group
      for (int r = 0; r < R; ++r) {
        const float* s = scale + (n0 + r) * G;
        sw[r] = _mm256_set_m128(_mm_set1_ps(s[std::min(K - 1, 64 * v + 32) / gs]),
                                _mm_set1_ps(s[64 * v / gs]));
      }
    if (v < whole)
      vec(v, sw, kBody);
    else
      vec(v, sw, kTail);
  }
  store_sums<S>(acc, scale, G, y + m0 * N, N, n0);
}

#endif

#ifdef FLOE_QMV_INT8_ACT

template <int F, int S, int R>
inline void tile_i8_m(int mt, const QuantizedX& qx, int64_t m0, int64_t K, const uint8_t* q,
                      int64_t ldq, const float* scale, int64_t G, float* y, int64_t N,
                      int64_t n0) {
#ifdef FLOE_QMV_AVX2  // passes of up to 2 rows of x
  if constexpr (F == kINT4) {
    if (mt == 1) return tile_i4<S, 1, R>(qx, m0, K, q, ldq, scale, G, y, N, n0);
    return tile_i4<S, 2, R>(qx, m0, K, q, ldq, scale, G, y, N, n0);
  } else {
    if (mt == 1) return tile_i8<F, S, 1, R>(qx, m0, K, q, ldq, scale, G, y, N, n0);
    return tile_i8<F, S, 2, R>(qx, m0, K, q, ldq, scale, G, y, N, n0);
  }
#else
  switch (mt) {
    case 1: return tile_i8<F, S, 1, R>(qx, m0, K, q, ldq, scale, G, y, N, n0);
    case 2: return tile_i8<F, S, 2, R>(qx, m0, K, q, ldq, scale, G, y, N, n0);
    case 3: return tile_i8<F, S, 3, R>(qx, m0, K, q, ldq, scale, G, y, N, n0);
    default: return tile_i8<F, S, 4, R>(qx, m0, K, q, ldq, scale, G, y, N, n0);
  }
#endif
}

template <int F, int S>
void run_i8(const Workers& workers, const float* x, int64_t M, int64_t K, const uint8_t* q,
            int64_t ldq, const float* scale, int64_t G, float* y, int64_t N) {
  const QuantizedX qx = quantize_x<F>(x, M, K);
  constexpr int64_t RT = kI8Rows<F>;
  const int64_t tiles = (N + RT - 1) / RT;
  const bool parallel = N * K >= (int64_t(1) << 18);
  parallel_tiles(workers, tiles, parallel, [&](int64_t t0, int64_t t1) {
    for (int64_t n = t0 * RT, n1 = std::min(N, t1 * RT); n < n1;) {
      const bool full = n + RT <= n1;
      for (int64_t m0 = 0; m0 < M; m0 += kXRows) {
        const int mt = int(std::min<int64_t>(kXRows, M - m0));
        if (full)
          tile_i8_m<F, S, RT>(mt, qx, m0, K, q, ldq, scale, G, y, N, n);
        else
          tile_i8_m<F, S, 1>(mt, qx, m0, K, q, ldq, scale, G, y, N, n);
      }
      n += full ? RT : 1;
    }
  });
}

#endif  // FLOE_QMV_INT8_ACT

template <int F, int S>
void run(const Workers& workers, const float* x, int64_t M, int64_t K, const uint8_t* q,
         int64_t ldq, const float* scale, int64_t G, float* y, int64_t N) {
  // Chunks of whole tiles; small products stay on the calling thread.
  const int64_t tiles = (N + kRows - 1) / kRows;
  const bool parallel = N * K >= (int64_t(1) << 18);
  bool fast4 = false, buffered = false;
  std::vector<float> xe;
#ifdef FLOE_QMV_AVX2
  buffered = M > kScratchRows<F>;
#endif
#if defined(FLOE_QMV_AVX512) || defined(FLOE_QMV_AVX2)
  if constexpr (F == kINT4 || F == kNF4) {
    fast4 = !buffered && K % 32 == 0 && (S != kGroup || (K / G) % 32 == 0);
    if (fast4) {  // x de-interleaved per 32 inputs: the 16 even ones, then the 16 odd ones
      xe.resize(M * K);
      for (int64_t i = 0; i < M * K; i += 32)
        for (int j = 0; j < 16; ++j) {
          xe[i + j] = x[i + 2 * j];
          xe[i + 16 + j] = x[i + 2 * j + 1];
        }
      x = xe.data();
    }
  }
#endif
  parallel_tiles(workers, tiles, parallel, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(buffered ? kRows * K : 0);  // one per chunk
    rows<F, S>(fast4, buffered ? scratch.data() : nullptr, x, M, K, q, ldq, scale, G, y, N,
               t0 * kRows, std::min(N, t1 * kRows));
  });
}

template <int F>
void run_format(const Workers& w, const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq,
                const float* scale, int64_t G, float* y, int64_t N) {
  if constexpr (F == kBF16) {
    run<F, kNone>(w, x, M, K, q, ldq, scale, G, y, N);
  } else {
    if (G == 1)
      run<F, kRow>(w, x, M, K, q, ldq, scale, G, y, N);
    else
      run<F, kGroup>(w, x, M, K, q, ldq, scale, G, y, N);
  }
}

std::string dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

const char* kFormatNames[] = {"bf16", "int8", "int4", "nf4"};

template <int F>
void run_format_i8(const Workers& w, const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq,
                   const float* scale, int64_t G, float* y, int64_t N) {
#ifdef FLOE_QMV_INT8_ACT
  if (G == 1)
    run_i8<F, kRow>(w, x, M, K, q, ldq, scale, G, y, N);
  else
    run_i8<F, kGroup>(w, x, M, K, q, ldq, scale, G, y, N);
#endif
}

ffi::Error QMatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int32_t fmt,
                       int32_t act) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  const std::string what = "(x " + dims(xd) + ", q " + dims(qd) + ", scale " + dims(sd) +
                           ", y " + dims(yd) + ")";
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("floe_qmatvec: x, q, scale and y must be rank 2 " + what);
  if (fmt < kBF16 || fmt > kNF4)
    return ffi::Error::InvalidArgument("floe_qmatvec: unknown format code " + std::to_string(fmt));
  const ffi::DataType want[] = {ffi::DataType::BF16, ffi::DataType::S8, ffi::DataType::U8,
                                ffi::DataType::U8};
  // bf16 codes come as bfloat16 or as their uint16 bit patterns (floe_jax.quant stores uint16;
  // bfloat16 codes built by hand are taken too).
  const bool bits16 = fmt == kBF16 && q.element_type() == ffi::DataType::U16;
  if (q.element_type() != want[fmt] && !bits16)
    return ffi::Error::InvalidArgument(
        std::string("floe_qmatvec: format ") + kFormatNames[fmt] + " needs q of dtype " +
        (fmt == kBF16 ? "bf16 or u16" : fmt == kINT8 ? "s8" : "u8") + ", got XLA type " +
        std::to_string(static_cast<int>(q.element_type())) + " " + what);
  const int64_t M = xd[0], K = xd[1], N = qd[0], G = sd[1];
  const bool packed = fmt == kINT4 || fmt == kNF4;
  if ((packed ? 2 * qd[1] : qd[1]) != K || sd[0] != N || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument(std::string("floe_qmatvec: shapes disagree for format ") +
                                       kFormatNames[fmt] + " " + what);
  if (fmt == kBF16 ? G != 0 : (G < 1 || K % G != 0 || (packed && (K / G) % 2 != 0)))
    return ffi::Error::InvalidArgument("floe_qmatvec: scale's group count " + std::to_string(G) +
                                       " does not split K = " + std::to_string(K) + " " + what);
  if (act != 0 && act != 1)
    return ffi::Error::InvalidArgument("floe_qmatvec: unknown activation code " +
                                       std::to_string(act));
  if (act == 1) {
#ifndef FLOE_QMV_INT8_ACT
    return ffi::Error::InvalidArgument(
        "floe_qmatvec: this build has no int8-activation path (it is built for AVX-512 without "
        "VNNI, or for neither AVX-512 nor AVX2)");
#endif
    if (fmt != kINT8 && fmt != kINT4)
      return ffi::Error::InvalidArgument(std::string("floe_qmatvec: int8 activations take int8 "
                                                     "and int4 weights, not ") +
                                         kFormatNames[fmt]);
    if (G > 1 && (K / G) % 32 != 0)
      return ffi::Error::InvalidArgument("floe_qmatvec: int8 activations need weight groups of a "
                                         "multiple of 32 inputs, got " + std::to_string(K / G) +
                                         " " + what);
  }
  if (M == 0 || N == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const auto* qp = static_cast<const uint8_t*>(q.untyped_data());
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.f);
    return ffi::Error::Success();
  }
  const int64_t ldq = fmt == kBF16 ? 2 * K : (packed ? K / 2 : K);  // bytes per weight row
  const Workers w{pool.num_threads() - 1,
                  [&pool](std::function<void()> f) { pool.Schedule(std::move(f)); }};
  try {  // no exception may cross the FFI boundary (an allocation of x's codes or scratch)
    if (act == 1) {
      if (fmt == kINT8)
        run_format_i8<kINT8>(w, xp, M, K, qp, ldq, sp, G, yp, N);
      else
        run_format_i8<kINT4>(w, xp, M, K, qp, ldq, sp, G, yp, N);
      return ffi::Error::Success();
    }
    switch (fmt) {
      case kBF16: run_format<kBF16>(w, xp, M, K, qp, ldq, sp, G, yp, N); break;
      case kINT8: run_format<kINT8>(w, xp, M, K, qp, ldq, sp, G, yp, N); break;
      case kINT4: run_format<kINT4>(w, xp, M, K, qp, ldq, sp, G, yp, N); break;
      default: run_format<kNF4>(w, xp, M, K, qp, ldq, sp, G, yp, N); break;
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("floe_qmatvec failed: ") + e.what() + " " + what);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloeQMatvec, QMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("fmt")
                                  .Attr<int32_t>("act"));
