// Cross-attention of a decoding step to cached slow keys/values on a CPU with AVX512-BF16.
//
// Per (sample, kv head): G query rows (the kv head's group of query heads, one new token each) against
// N cached keys. SDPA's CPU kernel runs this as two small GEMMs per block of keys; here each key and
// value is read once, with the G rows in registers (cpu_decode_attention.py says why and when).
//
// Layouts (made once per request by `pack_key_value` in Python):
//   packed keys   (B, H, ceil(N/16), D/2, 16, 2): 16 keys' dims (2j, 2j+1) in one 64-byte vector, so one
//                 vdpbf16ps adds a dimension pair to 16 keys' scores (no horizontal sums);
//   packed values (B, H, ceil(N/16)*8, D, 2): key pair (2i, 2i+1) of 16 dims in one vector, so one
//                 vdpbf16ps adds two keys' weighted values to 16 output dims.
// Arithmetic as SDPA's CPU kernel: bf16 products summed in fp32, softmax in fp32, the probabilities
// rounded to bf16 before they weight the values, the sum of the fp32 probabilities dividing at the end.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int kBlock = 16;  // keys per packed block (one vector of fp32 scores)

// e^x for 16 floats: x = k ln2 + r (|r| <= ln2 / 2), e^r by its degree-6 Taylor polynomial (relative
// error below 1e-7), times 2^k. Below -87 (e^x under fp32's smallest normal, and masked keys' -inf) it
// returns 0.
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);  // ln2, high part
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);    // ln2, low part
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), p, k);
}

inline __m512bh as_bf16(__m512i v) { return reinterpret_cast<__m512bh>(v); }

inline __m512bh broadcast_pair(const uint16_t* pair) {
  return as_bf16(_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(pair)));
}

// One (sample, kv head). `chunks`: output vectors of 16 dims accumulated per pass over the values.
template <int G, int chunks>
void attend(const uint16_t* query, const uint16_t* keys, const uint16_t* values, int64_t num_keys,
            int64_t head_dim, const float* bias, float scale, float* scores, uint16_t* probs,
            uint16_t* out) {
  const int64_t blocks = (num_keys + kBlock - 1) / kBlock, padded = blocks * kBlock;
  const int64_t pairs = head_dim / 2;
  float row_max[G], row_sum[G];

  // Scores (G, padded): scale * q.k (+ bias), -inf past the last key.
  __m512 max_vec[G];
  for (int g = 0; g < G; ++g) max_vec[g] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    const uint16_t* block = keys + b * pairs * 2 * kBlock;
    for (int64_t j = 0; j < pairs; ++j) {
      const __m512bh k = as_bf16(_mm512_loadu_si512(block + j * 2 * kBlock));
      for (int g = 0; g < G; ++g) acc[g] = _mm512_dpbf16_ps(acc[g], k, broadcast_pair(query + g * head_dim + 2 * j));
    }
    const int64_t left = num_keys - b * kBlock;
    const __mmask16 real = left >= kBlock ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(real, bias + b * kBlock) : _mm512_setzero_ps();
    const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int g = 0; g < G; ++g) {
      const __m512 s = _mm512_mask_blend_ps(real, minus_inf, _mm512_fmadd_ps(acc[g], _mm512_set1_ps(scale), add));
      _mm512_storeu_ps(scores + g * padded + b * kBlock, s);
      max_vec[g] = _mm512_max_ps(max_vec[g], s);
    }
  }

  // Softmax numerators e^(s - max) in bf16 (G, padded); their fp32 sums.
  for (int g = 0; g < G; ++g) {
    row_max[g] = _mm512_reduce_max_ps(max_vec[g]);
    const __m512 m = _mm512_set1_ps(row_max[g]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + g * padded + b * kBlock), m));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + g * padded + b * kBlock),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
    }
    row_sum[g] = _mm512_reduce_add_ps(sum);
  }

  // Output (G, head_dim) = probs @ values / sum, `chunks` vectors of 16 dims per pass.
  const int64_t dim_vectors = head_dim / 16;
  for (int64_t first = 0; first < dim_vectors; first += chunks) {
    __m512 acc[G][chunks];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < chunks; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < padded / 2; ++i) {
      __m512bh v[chunks];
      for (int c = 0; c < chunks; ++c)
        v[c] = as_bf16(_mm512_loadu_si512(values + (i * head_dim + (first + c) * 16) * 2));
      for (int g = 0; g < G; ++g) {
        const __m512bh p = broadcast_pair(probs + g * padded + 2 * i);
        for (int c = 0; c < chunks; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], v[c], p);
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m512 inverse = _mm512_set1_ps(1.0f / row_sum[g]);
      for (int c = 0; c < chunks; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * head_dim + (first + c) * 16),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][c], inverse))));
    }
  }
}

using AttendFn = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, int64_t, int64_t, const float*,
                          float, float*, uint16_t*, uint16_t*);

template <int G>
AttendFn pick(int chunks) {
  return chunks == 4 ? attend<G, 4> : attend<G, 2>;
}

AttendFn pick_rows(int64_t rows, int chunks) {
  switch (rows) {
    case 1: return pick<1>(chunks);
    case 2: return pick<2>(chunks);
    case 3: return pick<3>(chunks);
    case 4: return pick<4>(chunks);
    case 5: return pick<5>(chunks);
    case 6: return pick<6>(chunks);
    case 7: return pick<7>(chunks);
    default: return pick<8>(chunks);
  }
}

}  // namespace

// query (B, H, G, D) bf16; packed keys/values as above; bias (B, N) fp32 or an empty tensor -> (B, H, G, D) bf16.
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor packed_keys, torch::Tensor packed_values,
                               int64_t num_keys, torch::Tensor bias, double scale) {
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && query.is_contiguous() && query.dim() == 4,
              "query: a contiguous (B, H, G, D) bf16 tensor");
  const int64_t batch = query.size(0), heads = query.size(1), rows = query.size(2), head_dim = query.size(3);
  TORCH_CHECK(rows >= 1 && rows <= 8 && head_dim % 32 == 0, "query: 1 to 8 rows, head_dim a multiple of 32");
  const int64_t padded = (num_keys + kBlock - 1) / kBlock * kBlock;
  TORCH_CHECK(packed_keys.is_contiguous() && packed_keys.numel() == batch * heads * padded * head_dim &&
                  packed_values.is_contiguous() && packed_values.numel() == packed_keys.numel(),
              "packed keys/values: made by pack_key_value for ", num_keys, " keys");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                            bias.numel() == batch * num_keys), "bias: a contiguous (B, N) fp32 tensor");
  auto out = torch::empty_like(query);
  const int chunks = (rows <= 4 && head_dim % 64 == 0) ? 4 : 2;  // accumulators kept within 32 registers
  const AttendFn fn = pick_rows(rows, chunks);
  const auto* q = reinterpret_cast<const uint16_t*>(query.data_ptr<at::BFloat16>());
  const auto* k = reinterpret_cast<const uint16_t*>(packed_keys.data_ptr<at::BFloat16>());
  const auto* v = reinterpret_cast<const uint16_t*>(packed_values.data_ptr<at::BFloat16>());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float* bias_ptr = has_bias ? bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(rows * padded);
    std::vector<uint16_t> probs(rows * padded);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t sample = bh / heads;
      fn(q + bh * rows * head_dim, k + bh * padded * head_dim, v + bh * padded * head_dim, num_keys, head_dim,
         bias_ptr ? bias_ptr + sample * num_keys : nullptr, static_cast<float>(scale), scores.data(),
         probs.data(), o + bh * rows * head_dim);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_attention", &decode_attention); }
