// snapjax native kernel (XLA FFI, CPU): one pass of the diagonal influence update fused with the
// online gradient's batch sum, for per-step SnAp-1 (see snapjax/engine/native.py).  Per leaf:
//
//   J[b, l, u] <- D[b, u] * J[b, l, u] + V[b, l] * G[b, u]       (in place, J aliased to J_out)
//   g[l, u]     = acc[l, u] + sum_b C[b, u] * J[b, l, u]          (the updated J, b = 0, 1, ...)
//
// D, C (B, U) are shared; each leaf brings J (B, L, U) (or any row-major shape with those
// elements), V (B, L), G (B, U) and acc (L, U) (a running gradient, aliased to g); float32 or
// float64.  Two-component cells store J as complex pairs (PairBlock, the SnapjaxPairUpdate*
// handlers).  XLA:CPU emits the update and the sum as
// two loops (it has no multi-output fusion), reading J twice; here each block of kRows rows of
// every example is updated and summed while it is in L1.  All leaves go in one call, their rows
// shared out between the threads of XLA's intra-op pool by Chunks; the caller works too and waits
// only for chunks already taken, so the kernel never waits on a task that has not started.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 8;         // rows per block: kRows * U accumulators stay in L1
constexpr int64_t kMinWork = 1 << 16;  // fewer entries than this per block group: one thread

// Rows [r0, r1) of one leaf; s: scratch for (r1 - r0) * U partial sums, added to acc at the end
// (acc + sum_b, the association of the XLA form g_acc + g_t).
template <typename T>
void Block(const T* D, const T* V, const T* G, const T* C, const T* acc, T* J, T* g, T* s, int64_t B,
           int64_t L, int64_t U, int64_t r0, int64_t r1) {
  std::fill(s, s + (r1 - r0) * U, T(0));
  for (int64_t b = 0; b < B; ++b) {
    const T* Db = D + b * U;
    const T* Gb = G + b * U;
    const T* Cb = C + b * U;
    int64_t l = r0;
    for (; l + 1 < r1; l += 2) {  // two rows per pass: D, G, C loaded once for both
      T* J0 = J + (b * L + l) * U;
      T* J1 = J0 + U;
      T* s0 = s + (l - r0) * U;
      T* s1 = s0 + U;
      const T v0 = V[b * L + l], v1 = V[b * L + l + 1];
#pragma omp simd
      for (int64_t u = 0; u < U; ++u) {
        const T d = Db[u], gu = Gb[u], c = Cb[u];
        const T j0 = d * J0[u] + v0 * gu;
        const T j1 = d * J1[u] + v1 * gu;
        J0[u] = j0;
        J1[u] = j1;
        s0[u] += c * j0;
        s1[u] += c * j1;
      }
    }
    for (; l < r1; ++l) {
      T* Jr = J + (b * L + l) * U;
      T* sr = s + (l - r0) * U;
      const T v = V[b * L + l];
#pragma omp simd
      for (int64_t u = 0; u < U; ++u) {
        const T j = Db[u] * Jr[u] + v * Gb[u];
        Jr[u] = j;
        sr[u] += Cb[u] * j;
      }
    }
  }
  for (int64_t i = 0; i < (r1 - r0) * U; ++i) g[r0 * U + i] = acc[r0 * U + i] + s[i];
}

// The same for complex pairs (two-component cells: LSTM, LRU).  J (B, L, U) holds pairs (j0, j1)
// as (re, im); every other array is laid out the same way, two reals per unit: G and C (B, U, 2),
// A = (d00, d11) and X = (d01, d10) (B, U, 2) from the per-unit 2x2 blocks (made once per call).
// Per real k of a row, with k' its partner in the pair (j_k' = J[k ^ 1]):
//   n_k = A_k j_k + X_k j_k' + V G_k,  s_k += C_k n_k,  and at the end g_u = acc_u + s_2u + s_2u+1,
// so (j0, j1) <- (d00 j0 + d01 j1 + V G0, d10 j0 + d11 j1 + V G1), g = acc + sum_b C0 j0 + C1 j1.
// Vectors of kLanes reals (pairs never straddle one) make j_k' one in-register swap.  kMasked:
// each component then masked to the SnAp pattern P (U, 2) as apply_pattern does it: multiplied
// by P (0 or 1), or the constant 0 where out[a] (no unit keeps component a).
template <typename T>
using Vec [[gnu::vector_size(64)]] = T;
template <typename T>
constexpr int64_t kLanes = static_cast<int64_t>(64 / sizeof(T));
template <typename T>  // the same lanes as integers: a mask of whole lanes
using Bits [[gnu::vector_size(64)]] = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T>
inline Vec<T> Load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, typename VT>
inline void Store(T* p, VT v) {
  static_assert(sizeof(VT) == sizeof(Vec<T>));
  std::memcpy(p, &v, sizeof(v));
}
inline Vec<float> Swap(Vec<float> v) {
  return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
}
inline Vec<double> Swap(Vec<double> v) { return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6); }

// The pairs of a row from k to K one at a time (the part that does not fill a vector).
template <typename T, bool kMasked>
inline void PairTail(const T* Ab, const T* Xb, const T* Gb, const T* Cb, const T* P, const bool* out, T v, T* Jr,
                     T* sr, int64_t k, int64_t K) {
  for (; k < K; k += 2) {
    const T j0 = Jr[k], j1 = Jr[k + 1];
    T n0 = Ab[k] * j0 + Xb[k] * j1 + v * Gb[k];
    T n1 = Ab[k + 1] * j1 + Xb[k + 1] * j0 + v * Gb[k + 1];
    if constexpr (kMasked) {
      n0 = out[0] ? T(0) : n0 * P[k];
      n1 = out[1] ? T(0) : n1 * P[k + 1];
    }
    Jr[k] = n0;
    Jr[k + 1] = n1;
    sr[k] += Cb[k] * n0;
    sr[k + 1] += Cb[k + 1] * n1;
  }
}

template <typename T, bool kMasked>
void PairBlock(const T* A, const T* X, const T* V, const T* G, const T* C, const T* P, const bool* out,
               const T* acc, T* J, T* g, T* s, int64_t B, int64_t L, int64_t U, int64_t r0, int64_t r1) {
  constexpr int64_t W = kLanes<T>;
  const int64_t K = 2 * U, vec_end = K - K % W;
  Bits<T> keep{};  // kMasked: all bits clear in the lanes of a component no unit keeps
  for (int64_t i = 0; i < W; ++i) keep[i] = (kMasked && out[i % 2]) ? 0 : -1;
  std::fill(s, s + (r1 - r0) * K, T(0));
  for (int64_t b = 0; b < B; ++b) {
    const T* Ab = A + b * K;
    const T* Xb = X + b * K;
    const T* Gb = G + b * K;
    const T* Cb = C + b * K;
    int64_t l = r0;
    for (; l + 1 < r1; l += 2) {  // two rows per pass: A, X, G, C loaded once for both
      T* J0 = J + (b * L + l) * K;
      T* J1 = J0 + K;
      T* s0 = s + (l - r0) * K;
      T* s1 = s0 + K;
      const T v0 = V[b * L + l], v1 = V[b * L + l + 1];
      for (int64_t k = 0; k < vec_end; k += W) {
        const Vec<T> a = Load(Ab + k), x = Load(Xb + k), gk = Load(Gb + k), c = Load(Cb + k);
        const Vec<T> j0 = Load(J0 + k), j1 = Load(J1 + k);
        Vec<T> n0 = a * j0 + x * Swap(j0) + v0 * gk;
        Vec<T> n1 = a * j1 + x * Swap(j1) + v1 * gk;
        if constexpr (kMasked) {
          n0 = reinterpret_cast<Vec<T>>(reinterpret_cast<Bits<T>>(n0 * Load(P + k)) & keep);
          n1 = reinterpret_cast<Vec<T>>(reinterpret_cast<Bits<T>>(n1 * Load(P + k)) & keep);
        }
        Store(J0 + k, n0);
        Store(J1 + k, n1);
        Store(s0 + k, Load(s0 + k) + c * n0);
        Store(s1 + k, Load(s1 + k) + c * n1);
      }
      if (vec_end < K) {
        PairTail<T, kMasked>(Ab, Xb, Gb, Cb, P, out, v0, J0, s0, vec_end, K);
        PairTail<T, kMasked>(Ab, Xb, Gb, Cb, P, out, v1, J1, s1, vec_end, K);
      }
    }
    for (; l < r1; ++l) {
      T* Jr = J + (b * L + l) * K;
      T* sr = s + (l - r0) * K;
      const T v = V[b * L + l];
      int64_t k = 0;
      for (; k < vec_end; k += W) {
        const Vec<T> j = Load(Jr + k);
        Vec<T> n = Load(Ab + k) * j + Load(Xb + k) * Swap(j) + v * Load(Gb + k);
        if constexpr (kMasked) n = reinterpret_cast<Vec<T>>(reinterpret_cast<Bits<T>>(n * Load(P + k)) & keep);
        Store(Jr + k, n);
        Store(sr + k, Load(sr + k) + Load(Cb + k) * n);
      }
      PairTail<T, kMasked>(Ab, Xb, Gb, Cb, P, out, v, Jr, sr, k, K);
    }
  }
  for (int64_t i = 0; i < (r1 - r0) * U; ++i) g[r0 * U + i] = acc[r0 * U + i] + (s[2 * i] + s[2 * i + 1]);
}

// The rows of all leaves in chunks of kRows, cut into one contiguous range of chunks per thread.
// A thread takes chunks from the front of its own range (the prefetcher follows each example's
// rows), then steals from the back of the others' ranges, so a thread that starts late or runs
// slow leaves its rows to the others instead of holding up the call.
class Chunks {
 public:
  Chunks(int64_t chunks, int64_t parts) : ranges_(parts), chunks_(chunks) {
    const int64_t per = (chunks + parts - 1) / parts;
    for (int64_t p = 0; p < parts; ++p)
      ranges_[p].store(Pack(std::min(chunks, p * per), std::min(chunks, (p + 1) * per)));
  }
  int64_t Owner() { return owner_.fetch_add(1); }
  // The next chunk for the thread owning part `own` (or any part, own >= parts); -1 when none left.
  int64_t Next(int64_t own) {
    const int64_t parts = static_cast<int64_t>(ranges_.size());
    if (own < parts) {
      uint64_t r = ranges_[own].load();
      while (Lo(r) < Hi(r))
        if (ranges_[own].compare_exchange_weak(r, Pack(Lo(r) + 1, Hi(r)))) return Lo(r);
    }
    for (int64_t i = 0; i < parts; ++i) {
      const int64_t p = (std::max<int64_t>(own, 0) + 1 + i) % parts;
      uint64_t r = ranges_[p].load();
      while (Lo(r) < Hi(r))
        if (ranges_[p].compare_exchange_weak(r, Pack(Lo(r), Hi(r) - 1))) return Hi(r) - 1;
    }
    return -1;
  }
  void Done() { done_.fetch_add(1); }
  bool Finished() const { return done_.load() >= chunks_; }

 private:
  static uint64_t Pack(int64_t lo, int64_t hi) { return (static_cast<uint64_t>(lo) << 32) | static_cast<uint64_t>(hi); }
  static int64_t Lo(uint64_t r) { return static_cast<int64_t>(r >> 32); }
  static int64_t Hi(uint64_t r) { return static_cast<int64_t>(r & 0xffffffffu); }
  std::vector<std::atomic<uint64_t>> ranges_;
  std::atomic<int64_t> owner_{0}, done_{0};
  const int64_t chunks_;
};

struct Leaf {  // one influence leaf: J (B, L, U) updated in place, g = acc + sum (L, U)
  const void* V;
  const void* G;
  const void* P;  // pairs: the pattern (U, 2), or nullptr (every entry kept)
  bool out[2];    // pairs: a component no unit keeps
  const void* acc;
  void* J;
  void* g;
  int64_t L;
  int64_t first_row;  // of this leaf in the rows of all leaves
};

// DT: the real dtype; JT: J's (DT, or the complex dtype of pairs).
template <ffi::DataType DT, ffi::DataType JT>
ffi::Error Update(ffi::ThreadPool pool, ffi::Buffer<DT> d, ffi::Buffer<DT> c, ffi::RemainingArgs args,
                  ffi::RemainingRets rets) {
  using T = ffi::NativeType<DT>;
  constexpr bool kPairs = DT != JT;
  constexpr int64_t kWidth = kPairs ? 2 : 1;  // reals per J entry
  constexpr size_t kArgs = kPairs ? 5 : 4;     // per leaf: J, V, G, acc (and the pattern P)
  const int64_t B = d.dimensions()[0], U = d.dimensions()[1];
  if (args.size() % kArgs != 0 || rets.size() != 2 * (args.size() / kArgs))
    return ffi::Error::InvalidArgument("snapjax native: expected (J, V, G, acc[, P]) per leaf and (J, g) back");
  if (static_cast<int64_t>(d.element_count()) != B * U * kWidth * kWidth ||
      static_cast<int64_t>(c.element_count()) != B * U * kWidth)
    return ffi::Error::InvalidArgument("snapjax native: D must be (B, U) or (B, U, 4), C (B, U) or (B, U, 2)");
  std::vector<Leaf> leaves;
  int64_t rows = 0;
  for (size_t i = 0; i < args.size() / kArgs; ++i) {
    auto j_in = args.get<ffi::Buffer<JT>>(kArgs * i);
    auto v = args.get<ffi::Buffer<DT>>(kArgs * i + 1);
    auto g_unit = args.get<ffi::Buffer<DT>>(kArgs * i + 2);
    auto acc = args.get<ffi::Buffer<DT>>(kArgs * i + 3);
    auto j_out = rets.get<ffi::Buffer<JT>>(2 * i);
    auto grad = rets.get<ffi::Buffer<DT>>(2 * i + 1);
    if (!j_in || !v || !g_unit || !acc || !j_out || !grad)
      return ffi::Error::InvalidArgument("snapjax native: a buffer of the wrong dtype");
    const int64_t L = v->dimensions()[1];
    // J is any row-major (B, ..., U, ...) holding the entries of (B, L, U): L and U are read off
    // V (B, L) and D (B, U, ...), so a leaf is passed without a reshape (that can make XLA copy it).
    if (static_cast<int64_t>(j_in->element_count()) != B * L * U ||
        static_cast<int64_t>(g_unit->element_count()) != B * U * kWidth ||
        static_cast<int64_t>((*grad)->element_count()) != L * U || static_cast<int64_t>(acc->element_count()) != L * U)
      return ffi::Error::InvalidArgument("snapjax native: J must hold B*L*U entries, G B*U, g and acc L*U");
    Leaf leaf{v->typed_data(), g_unit->typed_data(), nullptr, {false, false}, acc->typed_data(), nullptr,
              (*grad)->typed_data(), L, rows};
    if constexpr (kPairs) {  // P (U, 2), or (0,): no pattern
      auto p = args.get<ffi::Buffer<DT>>(kArgs * i + 4);
      if (!p || (p->element_count() != 0 && static_cast<int64_t>(p->element_count()) != U * 2))
        return ffi::Error::InvalidArgument("snapjax native: the pattern must be (U, 2) or empty");
      if (p->element_count() != 0) {
        const T* P = p->typed_data();
        leaf.P = P;
        for (int a = 0; a < 2; ++a) {
          leaf.out[a] = true;
          for (int64_t u = 0; u < U; ++u) leaf.out[a] = leaf.out[a] && P[2 * u + a] == T(0);
        }
      }
    }
    T* J = reinterpret_cast<T*>((*j_out)->typed_data());  // pairs: (re, im) interleaved
    const T* J_in = reinterpret_cast<const T*>(j_in->typed_data());
    if (J != J_in) std::copy(J_in, J_in + B * L * U * kWidth, J);
    leaf.J = J;
    leaves.push_back(leaf);
    rows += L;
  }
  const T *Dp = d.typed_data(), *Cp = c.typed_data();
  auto ax = std::make_shared<std::vector<T>>(kPairs ? 4 * B * U : 0);  // pairs: A, X (B, U, 2) each
  for (int64_t i = 0; kPairs && i < B * U; ++i) {
    (*ax)[2 * i] = Dp[4 * i];                      // d00
    (*ax)[2 * i + 1] = Dp[4 * i + 3];              // d11
    (*ax)[2 * B * U + 2 * i] = Dp[4 * i + 1];      // d01
    (*ax)[2 * B * U + 2 * i + 1] = Dp[4 * i + 2];  // d10
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), B * rows * U * kWidth / kMinWork));
  const int64_t chunks = (rows + kRows - 1) / kRows;
  auto work = std::make_shared<Chunks>(chunks, parts);
  auto shared = std::make_shared<std::vector<Leaf>>(std::move(leaves));
  auto run = [=]() {
    std::vector<T> scratch(kRows * U * kWidth);
    const int64_t own = work->Owner();
    for (int64_t k; (k = work->Next(own)) >= 0; work->Done()) {
      const int64_t lo = k * kRows, hi = std::min(rows, lo + kRows);
      for (const Leaf& f : *shared) {  // the chunk's rows of each leaf it meets
        const int64_t a = std::max(lo, f.first_row) - f.first_row;
        const int64_t e = std::min(hi, f.first_row + f.L) - f.first_row;
        if (a >= e) continue;
        const T *V = static_cast<const T*>(f.V), *G = static_cast<const T*>(f.G), *A = static_cast<const T*>(f.acc);
        T *J = static_cast<T*>(f.J), *g = static_cast<T*>(f.g);
        if constexpr (kPairs) {
          const T *Ap = ax->data(), *Xp = ax->data() + 2 * B * U, *P = static_cast<const T*>(f.P);
          if (P != nullptr)
            PairBlock<T, true>(Ap, Xp, V, G, Cp, P, f.out, A, J, g, scratch.data(), B, f.L, U, a, e);
          else
            PairBlock<T, false>(Ap, Xp, V, G, Cp, P, f.out, A, J, g, scratch.data(), B, f.L, U, a, e);
        } else
          Block<T>(Dp, V, G, Cp, A, J, g, scratch.data(), B, f.L, U, a, e);
      }
    }
  };
  for (int64_t t = 1; t < parts; ++t) pool.Schedule([run] { run(); });
  run();
  while (!work->Finished()) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

#define SNAPJAX_BIND(DT)                                                                          \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<DT>>().Arg<ffi::Buffer<DT>>().RemainingArgs() \
      .RemainingRets()

XLA_FFI_DEFINE_HANDLER_SYMBOL(SnapjaxDiagUpdateF32, (Update<ffi::DataType::F32, ffi::DataType::F32>),
                              SNAPJAX_BIND(ffi::DataType::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SnapjaxDiagUpdateF64, (Update<ffi::DataType::F64, ffi::DataType::F64>),
                              SNAPJAX_BIND(ffi::DataType::F64));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SnapjaxPairUpdateF32, (Update<ffi::DataType::F32, ffi::DataType::C64>),
                              SNAPJAX_BIND(ffi::DataType::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SnapjaxPairUpdateF64, (Update<ffi::DataType::F64, ffi::DataType::C128>),
                              SNAPJAX_BIND(ffi::DataType::F64));
