// Block-sparse attention forward on the CPU, one fused pass per (sequence, head, query block).
//
// For query block i of head h in sequence b, with kept key tiles j_1 < ... < j_c (CSR: tiles[row_ptr[r]
// .. row_ptr[r + 1]) for row r = h * nq + i):
//
//     S   = q_i [t, D] · [k_{j_1}; ...; k_{j_c}]ᵀ · scale            [t, n]   (n = the row's real keys)
//     out = softmax(S + mask) · [v_{j_1}; ...; v_{j_c}]               [t, Dv]
//
// t = the block's real queries (the last block may be short); a tile's keys stop at the call's k and at
// key_len[b] (right padding), so padding keys are never computed. mask is 0, or the float minimum at the
// cells of a partial tile that the tile's bool bank entry cells[partial[p]] [T, T] disallows. Such a cell
// contributes exactly 0: e^x is written as 0 for every x below ln(FLT_MIN) + 1/2 (-86.8), so no
// probability is subnormal or near the bottom of the float range (products of such values with V are
// subnormal and make the BLAS products several times slower); where the platform has them (x86 SSE),
// each task also runs with flush-to-zero and denormals-are-zero set in its thread, restored after. T is
// any tile side (the mask's own block size: 32, 64, 128, ...). A partial tile runs in chunks of 32
// query rows, each over the keys up to the last one its rows allow (a causal diagonal tile computes
// about 5/8 of its cells in 4 chunks), the columns past a chunk's reach masked like its other cells. Keys,
// values and queries are read in place through their strides (last dimension contiguous), so nothing is
// gathered; the two matrix products per tile go to the BLAS sgemm that torch links. A row that has no
// key gives 0. This is attnmask/masks/blocksparse.py's block_sparse_attention without autograd, dropout
// or an extra score term: the Python kernel handles those calls.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#define ATTNMASK_HAS_MXCSR 1
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// Column-major C [m, n] = alpha · op(A) op(B) + beta · C (Fortran BLAS).
void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  sgemm_(&transa, &transb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

// Below this, e^x is written as exactly 0 (e^-86.8 = 2^-125.2, a little above FLT_MIN = 2^-126).
constexpr float kSmallestExponent = -86.8f;

// e^x for x <= 0: 2^(x log2 e) = 2^r · 2^f with r = round(x log2 e), |f| <= 1/2 and 2^f a degree-6
// polynomial (relative error < 4e-6 over [-86.8, 0]); exactly 0 below -86.8 (masked cells, whose score
// is the float minimum, and scores that far below their row's maximum), so every result is 0 or a normal
// float >= 2^-125.3; written without calls so the loops vectorise.
inline float exp_nonpositive(float x) {
  const bool vanishes = x < kSmallestExponent;
  x = std::max(x, kSmallestExponent);
  const float t = x * 1.4426950408889634f;
  const float r = (t + 12582912.f) - 12582912.f;  // adding 1.5 · 2^23 rounds to an integer
  const float f = t - r;
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6184458e-3f;
  p = p * f + 5.5503370e-2f;
  p = p * f + 2.4022652e-1f;
  p = p * f + 6.9314712e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return vanishes ? 0.f : p * scale;
}

// Flush-to-zero and denormals-are-zero in the calling thread while in scope (x86 SSE; elsewhere nothing).
class FlushDenormals {
 public:
#ifdef ATTNMASK_HAS_MXCSR
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// Softmax of each of `rows` rows of s [rows, n] in place, except the division: returns 1 / row sums.
void exponentiate_rows(float* s, int64_t rows, int64_t n, float* inverse_sums) {
  for (int64_t x = 0; x < rows; ++x) {
    float* row = s + x * n;
    float top = row[0];
#pragma omp simd reduction(max : top)
    for (int64_t y = 1; y < n; ++y) top = row[y] > top ? row[y] : top;
#pragma omp simd
    for (int64_t y = 0; y < n; ++y) row[y] = exp_nonpositive(row[y] - top);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t y = 0; y < n; ++y) total += row[y];
    inverse_sums[x] = 1.f / total;
  }
}

constexpr int64_t CHUNK = 32;  // query rows per chunk of a partial tile

// The keys of a partial tile that rows x0 .. x0 + chunk - 1 of its bool cells [T, T] reach: one past the
// last allowed column among those rows (at most `keys`; 0 when the rows allow none).
int64_t chunk_reach(const bool* cell, int64_t tile, int64_t x0, int64_t chunk, int64_t keys) {
  int64_t width = 0;
  for (int64_t x = x0; x < x0 + chunk; ++x) {
    for (int64_t y = keys - 1; y >= width; --y) {
      if (cell[x * tile + y]) {
        width = y + 1;
        break;
      }
    }
  }
  return width;
}

int64_t check_long(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.dim() == 1, name,
              " must be a contiguous 1-d int64 tensor");
  return t.numel();
}

}  // namespace

torch::Tensor attend(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                     const torch::Tensor& row_ptr, const torch::Tensor& tiles, const torch::Tensor& partial,
                     const torch::Tensor& cells, const c10::optional<torch::Tensor>& key_len, double scale,
                     int64_t tile) {
  for (const auto* t : {&query, &key, &value}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat && t->dim() == 4 && t->stride(3) == 1,
                "query, key and value must be 4-d float32 CPU tensors with a contiguous last dimension");
  }
  const int64_t batch = query.size(0), heads = query.size(1), q_len = query.size(2), dim = query.size(3);
  const int64_t kv_heads = key.size(1), k_len = key.size(2), value_dim = value.size(3);
  TORCH_CHECK(heads % kv_heads == 0 && value.size(1) == kv_heads && value.size(2) == k_len && key.size(3) == dim,
              "key/value shapes do not fit the query");
  const int64_t nq = (q_len + tile - 1) / tile, group = heads / kv_heads;
  TORCH_CHECK(check_long(row_ptr, "row_ptr") == heads * nq + 1, "row_ptr must have H * nq + 1 entries");
  TORCH_CHECK(check_long(tiles, "tiles") == check_long(partial, "partial"), "tiles and partial differ in length");
  TORCH_CHECK(cells.scalar_type() == torch::kBool && cells.is_contiguous() && cells.dim() == 3, "cells must be bool [P, T, T]");
  const int64_t* lengths = nullptr;
  if (key_len.has_value()) {
    TORCH_CHECK(check_long(*key_len, "key_len") == batch, "key_len must have B entries");
    lengths = key_len->data_ptr<int64_t>();
  }

  // [B, q, H, Dv] seen as [B, H, q, Dv]: the layout a model's output projection reads without a copy
  auto out = torch::empty({batch, q_len, heads, value_dim}, query.options()).transpose(1, 2);
  const float* q = query.data_ptr<float>();
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t* starts = row_ptr.data_ptr<int64_t>();
  const int64_t* kept = tiles.data_ptr<int64_t>();
  const int64_t* bank = partial.data_ptr<int64_t>();
  const bool* allowed = cells.data_ptr<bool>();
  const auto qs = query.strides(), ks = key.strides(), vs = value.strides(), os = out.strides();
  int64_t widest = 1;
  for (int64_t r = 0; r < heads * nq; ++r) widest = std::max(widest, starts[r + 1] - starts[r]);

  at::parallel_for(0, batch * heads * nq, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    std::vector<float> scores(tile * widest * tile);
    std::vector<float> inverse_sums(tile);
    const int64_t chunks = (tile + CHUNK - 1) / CHUNK;
    std::vector<int64_t> reach(chunks), reaches(widest * chunks);  // per partial tile and chunk: keys computed
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (heads * nq), r = task % (heads * nq), h = r / nq, i = r % nq;
      const int64_t rows = std::min(tile, q_len - i * tile);
      const int64_t key_end = lengths ? std::min(k_len, lengths[b]) : k_len;
      const float* qi = q + b * qs[0] + h * qs[1] + i * tile * qs[2];
      const float* kb = k + b * ks[0] + (h / group) * ks[1];
      const float* vb = v + b * vs[0] + (h / group) * vs[1];
      float* oi = o + b * os[0] + h * os[1] + i * tile * os[2];
      const int64_t first = starts[r], last = starts[r + 1];
      int64_t n = 0;
      for (int64_t p = first; p < last; ++p) n += std::max<int64_t>(0, std::min(tile, key_end - kept[p] * tile));
      if (n == 0) {
        for (int64_t x = 0; x < rows; ++x) std::fill_n(oi + x * os[2], value_dim, 0.f);
        continue;
      }
      // A partial tile runs in chunks of CHUNK query rows, each over the tile's keys up to the chunk's
      // last allowed one (reach): a causal diagonal tile computes about (1 + 1/c) / 2 of its cells for c
      // chunks instead of all of them. Columns past a chunk's reach are masked like disallowed cells.
      int64_t offset = 0;  // S [rows, n] row-major is column-major [n, rows]: per tile K_j · q_iᵀ
      for (int64_t p = first; p < last; ++p) {
        const int64_t j = kept[p], keys = std::min(tile, key_end - j * tile);
        if (keys <= 0) continue;
        float* s = scores.data() + offset;
        const float* kj = kb + j * tile * ks[2];
        if (bank[p] < 0) {
          gemm('T', 'N', keys, rows, dim, scale, kj, ks[2], qi, qs[2], 0.f, s, n);
        } else {
          const bool* cell = allowed + bank[p] * tile * tile;
          for (int64_t x0 = 0; x0 < rows; x0 += CHUNK) {
            const int64_t chunk = std::min(CHUNK, rows - x0), width = chunk_reach(cell, tile, x0, chunk, keys);
            reach[x0 / CHUNK] = width;
            if (width > 0) gemm('T', 'N', width, chunk, dim, scale, kj, ks[2], qi + x0 * qs[2], qs[2], 0.f, s + x0 * n, n);
            for (int64_t x = x0; x < x0 + chunk; ++x) {
#pragma omp simd
              for (int64_t y = 0; y < width; ++y) s[x * n + y] = cell[x * tile + y] ? s[x * n + y] : -FLT_MAX;
              std::fill(s + x * n + width, s + x * n + keys, -FLT_MAX);
            }
          }
          std::copy(reach.begin(), reach.end(), reaches.begin() + (p - first) * chunks);
        }
        offset += keys;
      }
      exponentiate_rows(scores.data(), rows, n, inverse_sums.data());
      offset = 0;  // out [rows, Dv] row-major is column-major [Dv, rows]: Σ_j V_jᵀ · P_jᵀ
      for (int64_t p = first; p < last; ++p) {
        const int64_t j = kept[p], keys = std::min(tile, key_end - j * tile);
        if (keys <= 0) continue;
        const float* vj = vb + j * tile * vs[2];
        const float beta = offset == 0 ? 0.f : 1.f;
        if (bank[p] < 0) {
          gemm('N', 'N', value_dim, rows, keys, 1.f, vj, vs[2], scores.data() + offset, n, beta, oi, os[2]);
        } else {
          for (int64_t x0 = 0; x0 < rows; x0 += CHUNK) {
            const int64_t chunk = std::min(CHUNK, rows - x0), width = reaches[(p - first) * chunks + x0 / CHUNK];
            if (width > 0) {
              gemm('N', 'N', value_dim, chunk, width, 1.f, vj, vs[2], scores.data() + offset + x0 * n, n, beta,
                   oi + x0 * os[2], os[2]);
            } else if (beta == 0.f) {  // nothing of this tile reaches these rows, and no tile wrote them yet
              for (int64_t x = x0; x < x0 + chunk; ++x) std::fill_n(oi + x * os[2], value_dim, 0.f);
            }
          }
        }
        offset += keys;
      }
      for (int64_t x = 0; x < rows; ++x) {
        float* row = oi + x * os[2];
        const float w = inverse_sums[x];
#pragma omp simd
        for (int64_t y = 0; y < value_dim; ++y) row[y] *= w;
      }
    }
  });
  return out;
}

// exp_nonpositive elementwise on a contiguous float32 tensor of values <= 0 (what the softmax computes).
torch::Tensor exp_of_nonpositive(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 CPU tensor");
  auto out = torch::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) o[i] = exp_nonpositive(in[i]);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "Block-sparse attention forward over kept key tiles (float32, CPU)");
  m.def("exp_nonpositive", &exp_of_nonpositive, "The kernel's softmax exponential, elementwise (for tests)");
}
