// KV4 on CPU: store keys/values into vLLM's paged cache as asymmetric 4-bit codes
// (per token and KV head, fp16 scale and zero point), with the R3 Hadamard on keys, and
// attend over that cache without dequantizing it to memory.
//
// Layout per (block, kv head, slot), identical to vllm_quarot/kv_attention.py:
//   [K codes D/2 (low nibble = even d) | K scale, zero (fp16) | V codes D/2 | V scale, zero]
// With kv_cache.pivots = P > 0 (IntactKV) every block's page ends in a tail of
// [kv heads][P][K | V] float16 vectors of D: the first P tokens of a sequence keep their
// key (after the shift and R3) and value there, in the tail of the sequence's first
// block, and attention reads them instead of their 4-bit codes. Blocks are then further
// apart than their codes (kv_cache.stride(0) > heads·block·row bytes): vLLM pads the page.
// Math (as quant.quantize_kv): scale = fp16(max((hi − lo)/15, max(|hi|, |lo|)/1024, 1e-6)),
// zero = fp16(round(−lo/s)),
// code = clamp(round(x/s) + zero, 0, 15); x̂ = (code − zero)·s. Scores use
// q·k̂ = s·(Σ q·code − zero·Σ q), values accumulate Σ p·s·code and subtract Σ p·s·zero.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "hadamard.h"
#include "isa.h"

namespace quarot_cpu {

using at::Tensor;

// One head vector -> packed codes + fp16 scale/zero (d/2 + 4 bytes).
static QUAROT_INLINE void pack_one(const float* x, int64_t d, float clip, uint8_t* dst) {
  float hi = x[0], lo = x[0];
  for (int64_t i = 1; i < d; ++i) {
    hi = std::max(hi, x[i]);
    lo = std::min(lo, x[i]);
  }
  hi *= clip;
  lo *= clip;
  // scale >= max|x|/1024 keeps the zero point an exact fp16 integer (as quant.quantize_kv)
  const float floor = std::max(std::fabs(hi), std::fabs(lo)) * (1.f / 1024.f);
  const float s =
      static_cast<float>(c10::Half(std::max(std::max((hi - lo) / 15.f, floor), 1e-6f)));
  const float z = static_cast<float>(c10::Half(std::nearbyint(-lo / s)));
  for (int64_t i = 0; i < d; i += 2) {
    const float q0 = std::min(std::max(std::nearbyint(x[i] / s) + z, 0.f), 15.f);
    const float q1 = std::min(std::max(std::nearbyint(x[i + 1] / s) + z, 0.f), 15.f);
    dst[i / 2] = static_cast<uint8_t>(static_cast<int>(q0) | (static_cast<int>(q1) << 4));
  }
  const c10::Half sz[2] = {c10::Half(s), c10::Half(z)};
  std::memcpy(dst + d / 2, sz, 4);
}

// The pivot tail of a KV4 cache: float16 [blocks, kv heads, P, 2 (K, V), D], the blocks
// block_stride halves apart (the page's stride; the inner dimensions contiguous).
struct Pivots {
  c10::Half* base = nullptr;
  int64_t count = 0, block_stride = 0;
  QUAROT_INLINE c10::Half* at(int64_t blk, int64_t h, int64_t p, int64_t d) const {
    return base + blk * block_stride + ((h * count + p) * 2) * d;
  }
};

static Pivots check_pivots(const c10::optional<Tensor>& tail, const Tensor& kv_cache,
                           int64_t d) {
  Pivots pv;
  if (!tail.has_value()) return pv;
  const Tensor& t = *tail;
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.dim() == 5 && t.size(0) == kv_cache.size(0) &&
                  t.size(1) == kv_cache.size(1) && t.size(3) == 2 && t.size(4) == d &&
                  t.stride(4) == 1 && t.stride(3) == d && t.stride(2) == 2 * d &&
                  t.stride(1) == t.size(2) * 2 * d,
              "quarot_cpu KV4: pivot tail must be float16 [blocks, kv heads, P, 2, head_dim] "
              "with contiguous blocks, got ", t.sizes(), " strides ", t.strides());
  pv.base = reinterpret_cast<c10::Half*>(t.data_ptr<at::Half>());
  pv.count = t.size(2);
  pv.block_stride = t.stride(0);
  return pv;
}

template <typename T>
static void cache_update_impl(const T* key, const T* value, int64_t t, int64_t hkv, int64_t d,
                              int64_t key_stride, int64_t value_stride, uint8_t* cache,
                              int64_t block_size, int64_t block_stride, const int64_t* slots,
                              const float* had, int64_t kh, float clip, const Pivots& pv,
                              const int32_t* pos) {
  const int64_t half = d / 2 + 4, row = 2 * half;
  at::parallel_for(0, t, 8, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(d), tmp(d);
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t slot = slots[i];
      if (slot < 0) continue;
      const int64_t blk = slot / block_size, off = slot % block_size;
      // a pivot (position < P) lies in its sequence's first block
      const bool pivot = pv.count && pos && pos[i] >= 0 && pos[i] < pv.count;
      for (int64_t h = 0; h < hkv; ++h) {
        uint8_t* dst = cache + blk * block_stride + (h * block_size + off) * row;
        const T* k = key + i * key_stride + h * d;
        for (int64_t j = 0; j < d; ++j) buf[j] = static_cast<float>(k[j]);
        if (had) hadamard_row(buf.data(), tmp.data(), d, had, kh);
        pack_one(buf.data(), d, clip, dst);
        c10::Half* pk = pivot ? pv.at(blk, h, pos[i], d) : nullptr;
        if (pk)
          for (int64_t j = 0; j < d; ++j) pk[j] = c10::Half(buf[j]);
        const T* v = value + i * value_stride + h * d;
        for (int64_t j = 0; j < d; ++j) buf[j] = static_cast<float>(v[j]);
        pack_one(buf.data(), d, clip, dst + half);
        if (pk)
          for (int64_t j = 0; j < d; ++j) pk[d + j] = c10::Half(buf[j]);
      }
    }
  });
}

// Each query token's position in its sequence (-1 past query_start_loc[-1]).
static std::vector<int32_t> token_positions(const Tensor& query_start_loc, const Tensor& seq_lens,
                                            int64_t n) {
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "quarot_cpu KV4: query_start_loc and seq_lens must be int32");
  Tensor qsl = query_start_loc.contiguous(), sl = seq_lens.contiguous();
  const int32_t* qs = qsl.data_ptr<int32_t>();
  const int32_t* lens = sl.data_ptr<int32_t>();
  std::vector<int32_t> pos(n, -1);
  for (int64_t r = 0; r < sl.size(0); ++r) {
    const int64_t n_q = qs[r + 1] - qs[r];
    for (int64_t i = qs[r]; i < qs[r + 1] && i < n; ++i)
      pos[i] = static_cast<int32_t>(lens[r] - n_q + (i - qs[r]));
  }
  return pos;
}

static void check_cache(const Tensor& kv_cache, int64_t hkv, int64_t d) {
  TORCH_CHECK(kv_cache.scalar_type() == at::kByte && kv_cache.dim() == 4 &&
                  kv_cache.stride(3) == 1 && kv_cache.stride(2) == kv_cache.size(3) &&
                  kv_cache.stride(1) == kv_cache.size(2) * kv_cache.size(3) &&
                  kv_cache.stride(0) >= kv_cache.size(1) * kv_cache.stride(1),
              "quarot_cpu KV4: kv_cache must be uint8 [blocks, kv heads, block, bytes] with "
              "contiguous blocks");
  TORCH_CHECK(kv_cache.size(1) == hkv && kv_cache.size(3) == 2 * (d / 2 + 4),
              "quarot_cpu KV4: cache ", kv_cache.sizes(), " does not match ", hkv,
              " kv heads of head_dim ", d);
  TORCH_CHECK(d % 2 == 0, "quarot_cpu KV4: head_dim must be even");
}

void kv4_cache_update(const Tensor& key, const Tensor& value, Tensor& kv_cache,
                      const Tensor& slot_mapping, const c10::optional<Tensor>& had_k,
                      double clip_ratio, const c10::optional<Tensor>& pivot_tail,
                      const c10::optional<Tensor>& query_start_loc,
                      const c10::optional<Tensor>& seq_lens) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.stride(2) == 1 &&
                  key.stride(1) == key.size(2) && value.stride(2) == 1 &&
                  value.stride(1) == value.size(2) && key.scalar_type() == value.scalar_type(),
              "quarot_cpu KV4: key/value must be [T, H, D] with contiguous heads");
  const int64_t hkv = key.size(1), d = key.size(2);
  check_cache(kv_cache, hkv, d);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1,
              "quarot_cpu KV4: slot_mapping must be int64 [T]");
  const int64_t t = std::min(slot_mapping.size(0), key.size(0));
  const int64_t kh = check_had(had_k, d);
  const std::vector<float> had_t = transposed(kh ? had_k->data_ptr<float>() : nullptr, kh);
  const float* had = kh ? had_t.data() : nullptr;
  Tensor slots = slot_mapping.contiguous();
  const Pivots pv = check_pivots(pivot_tail, kv_cache, d);
  std::vector<int32_t> pos;
  if (pv.count) {
    TORCH_CHECK(query_start_loc.has_value() && seq_lens.has_value(),
                "quarot_cpu KV4: pivots need query_start_loc and seq_lens");
    pos = token_positions(*query_start_loc, *seq_lens, t);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "kv4_update", [&] {
    cache_update_impl<scalar_t>(key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), t, hkv, d,
                                key.stride(0), value.stride(0), kv_cache.data_ptr<uint8_t>(),
                                kv_cache.size(2), kv_cache.stride(0), slots.data_ptr<int64_t>(),
                                had, kh, static_cast<float>(clip_ratio), pv,
                                pos.empty() ? nullptr : pos.data());
  });
}

// One (query token, head): online-softmax attention over keys [0, n_keys).
struct Row {
  const uint8_t* cache;
  const int32_t* blocks;
  int64_t block_size, block_stride, hk, half, row;
  const c10::Half* pivots;  // this sequence's pivots of KV head hk: [P][K | V] (or null)
  int64_t n_pivots;
  QUAROT_INLINE const uint8_t* at(int64_t j) const {
    return cache + static_cast<int64_t>(blocks[j / block_size]) * block_stride +
           (hk * block_size + j % block_size) * row;
  }
};

static QUAROT_INLINE float half_at(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

// Codes of one head vector -> float32 [d] (even d in the low nibble).
static QUAROT_INLINE void unpack_codes(const uint8_t* c, int64_t d, float* out) {
  for (int64_t i = 0; i < d / 2; ++i) {
    out[2 * i] = static_cast<float>(c[i] & 0xF);
    out[2 * i + 1] = static_cast<float>(c[i] >> 4);
  }
}

// Σ a·b over d with 16 independent partial sums (vectorizes without reassociation).
static QUAROT_INLINE float dot16(const float* a, const float* b, int64_t d) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  for (; i < d; ++i) part[i % 16] += a[i] * b[i];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += part[j];
  return s;
}

// The g query heads of one KV head (rows of q, acc, out: d floats each) attend over keys
// [0, n_keys): each key's codes are unpacked once for the whole group. st: 4·g floats
// (running max, sum, value zero-point correction, Σq per head); scratch: 2·d floats.
static QUAROT_INLINE void attend_body(const float* q, int64_t g, int64_t d, const Row& r,
                                  int64_t n_keys, float sm_scale, float* acc, float* st,
                                  float* scratch, float* out) {
  float* mx = st;
  float* l = st + g;
  float* zc = st + 2 * g;
  float* qsum = st + 3 * g;
  for (int64_t h = 0; h < g; ++h) {
    float s = 0.f;
    for (int64_t i = 0; i < d; ++i) s += q[h * d + i];
    qsum[h] = s;
    mx[h] = -std::numeric_limits<float>::infinity();
    l[h] = zc[h] = 0.f;
  }
  std::fill(acc, acc + g * d, 0.f);
  const int64_t hb = d / 2;
  float* kf = scratch;
  float* vf = scratch + d;
  // the pivots: exact float16 keys and values, no zero point
  const int64_t n_piv = std::min(r.n_pivots, n_keys);
  for (int64_t j = 0; j < n_piv; ++j) {
    const c10::Half* pk = r.pivots + j * 2 * d;
    for (int64_t i = 0; i < d; ++i) {
      kf[i] = static_cast<float>(pk[i]);
      vf[i] = static_cast<float>(pk[d + i]);
    }
    for (int64_t h = 0; h < g; ++h) {
      const float score = dot16(q + h * d, kf, d) * sm_scale;
      float* a = acc + h * d;
      float p = 1.f;
      if (score > mx[h]) {
        const float corr = std::exp(mx[h] - score);
        mx[h] = score;
        l[h] *= corr;
        zc[h] *= corr;
        for (int64_t i = 0; i < d; ++i) a[i] *= corr;
      } else {
        p = std::exp(score - mx[h]);
      }
      l[h] += p;
      for (int64_t i = 0; i < d; ++i) a[i] += p * vf[i];
    }
  }
  for (int64_t j = n_piv; j < n_keys; ++j) {
    const uint8_t* kv = r.at(j);
    const uint8_t* v = kv + r.half;
    unpack_codes(kv, d, kf);
    unpack_codes(v, d, vf);
    const float ks = half_at(kv + hb), kz = half_at(kv + hb + 2);
    const float vs0 = half_at(v + hb), vz = half_at(v + hb + 2);
    for (int64_t h = 0; h < g; ++h) {
      const float score = ks * (dot16(q + h * d, kf, d) - kz * qsum[h]) * sm_scale;
      float* a = acc + h * d;
      float p = 1.f;  // one exp per key: rescale the running sums only when the max grows
      if (score > mx[h]) {
        const float corr = std::exp(mx[h] - score);
        mx[h] = score;
        l[h] *= corr;
        zc[h] *= corr;
        for (int64_t i = 0; i < d; ++i) a[i] *= corr;
      } else {
        p = std::exp(score - mx[h]);
      }
      l[h] += p;
      const float vs = vs0 * p;
      zc[h] += vs * vz;
      for (int64_t i = 0; i < d; ++i) a[i] += vs * vf[i];
    }
  }
  for (int64_t h = 0; h < g; ++h) {
    const float inv = n_keys ? 1.f / l[h] : 0.f;
    for (int64_t i = 0; i < d; ++i) out[h * d + i] = (acc[h * d + i] - zc[h]) * inv;
  }
}

#define KV_ATTEND_ARGS                                                                   \
  const float *q, int64_t g, int64_t d, const Row &r, int64_t n, float s, float *acc, float *st, \
      float *scr, float *out
#define KV_ATTEND_CALL q, g, d, r, n, s, acc, st, scr, out
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) static void attend_avx512(KV_ATTEND_ARGS) {
  attend_body(KV_ATTEND_CALL);
}
__attribute__((target("avx2,fma,f16c"))) static void attend_avx2(KV_ATTEND_ARGS) {
  attend_body(KV_ATTEND_CALL);
}
static void attend_scalar(KV_ATTEND_ARGS) { attend_body(KV_ATTEND_CALL); }

void kv4_attention(const Tensor& query, const Tensor& kv_cache, const Tensor& block_table,
                   const Tensor& seq_lens, const Tensor& query_start_loc, double scale,
                   bool causal, const c10::optional<Tensor>& had_k, Tensor& output,
                   const c10::optional<Tensor>& pivot_tail) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2),
              "quarot_cpu KV4: query must be [T, H, D] with contiguous heads");
  TORCH_CHECK(output.dim() == 3 && output.is_contiguous() && output.size(1) == query.size(1) &&
                  output.size(2) == query.size(2) && output.scalar_type() == query.scalar_type(),
              "quarot_cpu KV4: output must be contiguous like query");
  const int64_t hq = query.size(1), d = query.size(2), hkv = kv_cache.size(1);
  check_cache(kv_cache, hkv, d);
  TORCH_CHECK(hq % hkv == 0, "quarot_cpu KV4: ", hq, " query heads for ", hkv, " kv heads");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt,
              "quarot_cpu KV4: block_table, seq_lens, query_start_loc must be int32");
  const int64_t kh = check_had(had_k, d);
  const std::vector<float> had_t = transposed(kh ? had_k->data_ptr<float>() : nullptr, kh);
  const float* had = kh ? had_t.data() : nullptr;
  const int64_t b = seq_lens.size(0), group = hq / hkv;
  Tensor bt = block_table.contiguous(), sl = seq_lens.contiguous(), qsl = query_start_loc.contiguous();
  const int32_t* qs = qsl.data_ptr<int32_t>();
  const int64_t t = qs[b];
  TORCH_CHECK(t <= query.size(0) && t <= output.size(0), "quarot_cpu KV4: query_start_loc[-1]=",
              t, " exceeds the number of query tokens");
  // token -> sequence
  std::vector<int32_t> seq_of(t);
  for (int64_t r = 0; r < b; ++r)
    for (int64_t i = qs[r]; i < qs[r + 1]; ++i) seq_of[i] = static_cast<int32_t>(r);
  const int isa = current_isa();
  auto* fn = isa == kAvx512Vnni ? &attend_avx512 : isa == kAvx2 ? &attend_avx2 : &attend_scalar;
  const uint8_t* cache = kv_cache.data_ptr<uint8_t>();
  const int64_t bs = kv_cache.size(2), half = d / 2 + 4, max_blocks = bt.size(1);
  const int64_t block_stride = kv_cache.stride(0);
  const Pivots pv = check_pivots(pivot_tail, kv_cache, d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "kv4_attn", [&] {
    const scalar_t* qp = query.data_ptr<scalar_t>();
    scalar_t* op = output.data_ptr<scalar_t>();
    at::parallel_for(0, t * hkv, 1, [&](int64_t w0, int64_t w1) {
      std::vector<float> q(group * d), tmp(d), acc(group * d), o(group * d), st(4 * group),
          scratch(2 * d);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t i = w / hkv, hk = w % hkv, r = seq_of[i];
        const int64_t seq_len = sl.data_ptr<int32_t>()[r];
        const int64_t n_q = qs[r + 1] - qs[r];
        const int64_t pos = seq_len - n_q + (i - qs[r]);
        const int64_t n_keys = causal ? pos + 1 : seq_len;
        TORCH_CHECK((n_keys + bs - 1) / bs <= max_blocks, "quarot_cpu KV4: block table too short");
        for (int64_t h = 0; h < group; ++h) {
          const scalar_t* qi = qp + i * query.stride(0) + (hk * group + h) * d;
          float* qh = q.data() + h * d;
          for (int64_t j = 0; j < d; ++j) qh[j] = static_cast<float>(qi[j]);
          if (had) hadamard_row(qh, tmp.data(), d, had, kh);
        }
        const int32_t* blocks = bt.data_ptr<int32_t>() + r * max_blocks;
        const Row row{cache, blocks, bs, block_stride, hk, half, 2 * half,
                      pv.count ? pv.at(blocks[0], hk, 0, d) : nullptr, pv.count};
        fn(q.data(), group, d, row, n_keys, static_cast<float>(scale), acc.data(), st.data(),
           scratch.data(), o.data());
        scalar_t* oi = op + (i * hq + hk * group) * d;
        for (int64_t j = 0; j < group * d; ++j) oi[j] = static_cast<scalar_t>(o[j]);
      }
    });
  });
}

}  // namespace quarot_cpu

TORCH_LIBRARY_FRAGMENT(quarot_cpu, m) {
  m.def(
      "kv4_cache_update(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, "
      "Tensor? had_k, float clip_ratio, Tensor(b!)? pivot_tail=None, "
      "Tensor? query_start_loc=None, Tensor? seq_lens=None) -> ()");
  m.def(
      "kv4_attention(Tensor query, Tensor kv_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor query_start_loc, float scale, bool causal, Tensor? had_k, Tensor(a!) output, "
      "Tensor? pivot_tail=None) -> ()");
}

TORCH_LIBRARY_IMPL(quarot_cpu, CPU, m) {
  m.impl("kv4_cache_update", &quarot_cpu::kv4_cache_update);
  m.impl("kv4_attention", &quarot_cpu::kv4_attention);
}
