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
// processed in tiles of 4 and, for M > 4, the tile is decoded again from cache per 4 rows of x.
// Output tiles are split over OpenMP threads (each thread streams its contiguous share of the
// weight rows), so every core's share of the memory bandwidth is used.
//
// AVX-512 (F, BW, VL) code when the compiler targets it (-march=native on a machine that has it),
// a scalar loop otherwise.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FLOE_QMV_AVX512 1
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

constexpr int kRows = 4;   // weight rows per tile
constexpr int kXRows = 4;  // rows of x per pass over a tile

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

// Scalar reference loop (machines without AVX-512): one output at a time.
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

template <int F, int S, int R>
inline void tile_m(int mt, bool fast4, const float* x, int64_t K, const uint8_t* q, int64_t ldq,
                   const float* scale, int64_t G, float* y, int64_t N, int64_t n0) {
  if constexpr (F == kINT4 || F == kNF4) {
    if (fast4) {
      switch (mt) {
        case 1: return tile4<F, S, 1, R>(x, K, q, ldq, scale, G, y, N, n0);
        case 2: return tile4<F, S, 2, R>(x, K, q, ldq, scale, G, y, N, n0);
        case 3: return tile4<F, S, 3, R>(x, K, q, ldq, scale, G, y, N, n0);
        default: return tile4<F, S, 4, R>(x, K, q, ldq, scale, G, y, N, n0);
      }
    }
  }
  switch (mt) {
    case 1: return tile<F, S, 1, R>(x, K, q, ldq, scale, G, y, N, n0);
    case 2: return tile<F, S, 2, R>(x, K, q, ldq, scale, G, y, N, n0);
    case 3: return tile<F, S, 3, R>(x, K, q, ldq, scale, G, y, N, n0);
    default: return tile<F, S, 4, R>(x, K, q, ldq, scale, G, y, N, n0);
  }
}

// Output rows [n0, n1) for every row of x.
template <int F, int S>
void rows(bool fast4, const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq,
          const float* scale, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1;) {
    const bool full = n + kRows <= n1;
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
void rows(bool, const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq,
          const float* scale, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1) {
  scalar_rows<F, S>(x, M, K, q, ldq, scale, G, y, N, n0, n1);
}

#endif

template <int F, int S>
void run(const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq, const float* scale,
         int64_t G, float* y, int64_t N) {
  // Chunks of whole tiles, one contiguous range per thread; small products stay on one thread.
  const int64_t tiles = (N + kRows - 1) / kRows;
  const bool parallel = N * K >= (int64_t(1) << 18);
  bool fast4 = false;
  std::vector<float> xe;
#ifdef FLOE_QMV_AVX512
  if constexpr (F == kINT4 || F == kNF4) {
    fast4 = K % 32 == 0 && (S != kGroup || (K / G) % 32 == 0);
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
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * kRows, n1 = std::min(N, n0 + kRows);
    rows<F, S>(fast4, x, M, K, q, ldq, scale, G, y, N, n0, n1);
  }
}

template <int F>
void run_format(const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq,
                const float* scale, int64_t G, float* y, int64_t N) {
  if constexpr (F == kBF16) {
    run<F, kNone>(x, M, K, q, ldq, scale, G, y, N);
  } else {
    if (G == 1)
      run<F, kRow>(x, M, K, q, ldq, scale, G, y, N);
    else
      run<F, kGroup>(x, M, K, q, ldq, scale, G, y, N);
  }
}

std::string dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

const char* kFormatNames[] = {"bf16", "int8", "int4", "nf4"};

ffi::Error QMatvecImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                       ffi::ResultBuffer<ffi::F32> y, int32_t fmt) {
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
  switch (fmt) {
    case kBF16: run_format<kBF16>(xp, M, K, qp, ldq, sp, G, yp, N); break;
    case kINT8: run_format<kINT8>(xp, M, K, qp, ldq, sp, G, yp, N); break;
    case kINT4: run_format<kINT4>(xp, M, K, qp, ldq, sp, G, yp, N); break;
    default: run_format<kNF4>(xp, M, K, qp, ldq, sp, G, yp, N); break;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloeQMatvec, QMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("fmt"));
