// KV4 paged cache: quantize-and-store of keys/values, and causal attention over it.
//
// Cache: uint8 [num_blocks, H_kv, block_size, 2 * (D/2 + 4)], per (block, kv head, slot)
//   [K codes D/2 | K scale, zero (fp16, fp16) | V codes D/2 | V scale, zero]
// codes two per byte, low nibble = even dimension (vllm_quarot.kv_attention.pack_kv).
// Quantization is quant.quantize_kv(x, 4, clip): asymmetric per (token, head),
//   hi = max(x) * clip, lo = min(x) * clip,
//   scale = fp16(max((hi - lo) / 15, max(|hi|, |lo|) / 1024, 1e-6)),
//   zero = fp16(rint(-lo / scale)), q = clamp(rint(x / scale) + zero, 0, 15),
// dequantized as (q - zero) * scale. R3 (keys before quantization, queries before
// attention) is the normalised Walsh–Hadamard transform of size D, in float32.
//
// Both kernels give one warp a (token, head) row of D = 32·E values, lane l holding the
// E contiguous values l·E .. l·E+E-1; the FWHT runs in registers and over __shfl_xor.
#pragma once

#include "quarot_common.cuh"

namespace quarot_cuda {

// In-warp normalised-later FWHT of D = 32·E values (lane-major, E contiguous per lane).
template <int E>
__device__ __forceinline__ void fwht_warp(float (&v)[E]) {
  butterflies<E>(v, E);
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float other = __shfl_xor_sync(0xffffffffu, v[j], m);
      v[j] = upper ? other - v[j] : v[j] + other;
    }
  }
}

template <int E, typename T>
__device__ __forceinline__ void load_row(const T* src, float (&v)[E]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < E; ++j) v[j] = to_float(src[lane * E + j]);
}

// Asymmetric 4-bit quantization of the warp's row and its store at dst:
// E/2 code bytes per lane at dst + lane·E/2, then (scale, zero) fp16 at dst + D/2.
template <int E>
__device__ __forceinline__ void quantize_store_kv(const float (&v)[E], float clip,
                                                  uint8_t* dst) {
  constexpr int D = 32 * E;
  const int lane = threadIdx.x & 31;
  float mx = v[0], mn = v[0];
#pragma unroll
  for (int j = 1; j < E; ++j) {
    mx = fmaxf(mx, v[j]);
    mn = fminf(mn, v[j]);
  }
  mx = warp_max(mx);
  mn = warp_min(mn);
  const float hi = mx * clip, lo = mn * clip;
  // scale >= max|x|/1024 keeps the zero point an exact fp16 integer (as quant.quantize_kv)
  const float floor = fmaxf(fabsf(hi), fabsf(lo)) * (1.f / 1024.f);
  const __half sc_h = __float2half_rn(fmaxf(fmaxf(__fdiv_rn(hi - lo, 15.f), floor), 1e-6f));
  const float sc = __half2float(sc_h);
  const __half z_h = __float2half_rn(rintf(__fdiv_rn(-lo, sc)));
  const float z = __half2float(z_h);
  uint32_t packed = 0;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const float q = fminf(fmaxf(rintf(__fdiv_rn(v[j], sc)) + z, 0.f), 15.f);
    packed |= (static_cast<uint32_t>(q) & 0xFu) << (4 * j);
  }
  if constexpr (E == 2) {
    dst[lane] = static_cast<uint8_t>(packed);
  } else if constexpr (E == 4) {
    reinterpret_cast<uint16_t*>(dst)[lane] = static_cast<uint16_t>(packed);
  } else {
    static_assert(E == 8, "head_dim must be 64, 128 or 256");
    reinterpret_cast<uint32_t*>(dst)[lane] = packed;
  }
  if (lane == 0) {
    const uint32_t s = __half_as_ushort(sc_h), zz = __half_as_ushort(z_h);
    *reinterpret_cast<uint32_t*>(dst + D / 2) = s | (zz << 16);
  }
}

struct KVUpdateParams {
  const void* key;     // [T, H_kv, D], last dim contiguous
  const void* value;
  int64_t k_s0, k_s1, v_s0, v_s1;  // element strides
  uint8_t* cache;
  int64_t c_s0, c_s1, c_s2;        // byte strides (block, head, slot)
  const void* slots;               // [T] int32 or int64, -1 = skip
  int T, H, block_size;
  float clip, norm;                // norm = 1/sqrt(D) (R3)
  bool r3;
};

constexpr int kKVWarps = 4;

template <int D, typename T, typename SlotT>
__global__ void __launch_bounds__(kKVWarps * 32) kv4_cache_update_kernel(const KVUpdateParams p) {
  constexpr int E = D / 32;
  const int gw = blockIdx.x * kKVWarps + (threadIdx.x >> 5);
  if (gw >= p.T * p.H) return;
  const int tok = gw / p.H, head = gw - tok * p.H;
  const int64_t slot = static_cast<int64_t>(static_cast<const SlotT*>(p.slots)[tok]);
  if (slot < 0) return;  // warp-uniform
  const int64_t blk = slot / p.block_size, off = slot - blk * p.block_size;
  uint8_t* dst = p.cache + blk * p.c_s0 + head * p.c_s1 + off * p.c_s2;

  float k[E], v[E];
  load_row<E>(static_cast<const T*>(p.key) + tok * p.k_s0 + head * p.k_s1, k);
  load_row<E>(static_cast<const T*>(p.value) + tok * p.v_s0 + head * p.v_s1, v);
  if (p.r3) {
    fwht_warp<E>(k);
#pragma unroll
    for (int j = 0; j < E; ++j) k[j] *= p.norm;
  }
  quantize_store_kv<E>(k, p.clip, dst);
  quantize_store_kv<E>(v, p.clip, dst + D / 2 + 4);
}

// ---------------------------------------------------------------- attention
//
// Grid (T, H_kv, S). The CTA of (token t, kv head hk, split s) serves the GQA group of
// query heads hk·G .. hk·G+G-1 against keys [s·chunk, min((s+1)·chunk, kv_len)), where
// kv_len = pos(t) + 1 (causal) and chunk = ceil(kv_len / S) rounded up to 32. Its
// kKVWarps warps take 32-key tiles in turn, each keeping an online softmax (m, l, O) per
// head:
//   scores: lane j dequantizes key j of the tile (K codes, 8-byte loads) and dots it
//     with every head's query (float32 in shared memory, read as broadcasts); it also
//     copies V row j into the warp's shared tile;
//   softmax: per-head warp max / sum;
//   PV: lane l owns dimensions l·E..l·E+E-1 and accumulates p[h][j] · v[j] over the tile.
// The warps are merged in shared memory; with S > 1 the CTA writes its normalised output
// and (m, l) to a workspace that kv4_attention_combine_kernel reduces.

struct KVAttnParams {
  const void* q;          // [T, H, D], last dim contiguous
  int64_t q_s0, q_s1;
  const uint8_t* cache;
  int64_t c_s0, c_s1, c_s2;
  const int* block_table;  // [B, max_blocks]
  int64_t bt_s0;
  const int* seq_lens;     // [B]
  const int* qsl;          // [B + 1]
  void* out;               // [T, H, D] contiguous (S == 1)
  float* part_o;           // [T, H, S, D] (S > 1)
  float* part_ml;          // [T, H, S, 2]
  int T, H, Hkv, G, B, block_size;
  float scale, norm;
  bool r3;
};

template <int D, int GMAX>
struct AttnSmem {
  static constexpr int E = D / 32;
  static constexpr int VROW = D / 2 + 8;  // V codes + scale/zero, padded to 8 bytes
  float q[GMAX][D];
  float p[kKVWarps][GMAX][32];
  float ml[kKVWarps][GMAX][2];
  alignas(16) uint8_t v[kKVWarps][32][VROW];
};

template <int D, int GMAX, typename T>
__global__ void __launch_bounds__(kKVWarps * 32) kv4_attention_kernel(const KVAttnParams p) {
  constexpr int E = D / 32;
  using Smem = AttnSmem<D, GMAX>;
  extern __shared__ uint4 smem_u4[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_u4);
  const int t = blockIdx.x, hk = blockIdx.y, split = blockIdx.z, S = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int G = p.G;

  // request of token t: the largest b with qsl[b] <= t
  int kv_len = 0;
  int b = 0;
  if (t < p.qsl[p.B]) {
    int lo = 0, hi = p.B - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (p.qsl[mid] <= t) lo = mid; else hi = mid - 1;
    }
    b = lo;
    const int tq = p.qsl[b + 1] - p.qsl[b];
    const int seq_len = p.seq_lens[b];
    kv_len = seq_len - tq + (t - p.qsl[b]) + 1;
    kv_len = kv_len < 0 ? 0 : (kv_len > seq_len ? seq_len : kv_len);
  }
  int chunk = (kv_len + S - 1) / S;
  chunk = (chunk + 31) & ~31;
  const int j_begin = split * chunk;
  const int j_end = min(kv_len, j_begin + chunk);

  // queries of the group (R3-rotated), float32 in shared memory; zeros for h >= G
  for (int h = warp; h < GMAX; h += kKVWarps) {
    float qv[E];
    if (h < G) {
      load_row<E>(static_cast<const T*>(p.q) + t * p.q_s0 + (hk * G + h) * p.q_s1, qv);
      if (p.r3) {
        fwht_warp<E>(qv);
#pragma unroll
        for (int j = 0; j < E; ++j) qv[j] *= p.norm;
      }
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) qv[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < E; ++j) sm.q[h][lane * E + j] = qv[j];
  }
  __syncthreads();

  float m[GMAX], l[GMAX], o[GMAX][E];
#pragma unroll
  for (int h = 0; h < GMAX; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int j = 0; j < E; ++j) o[h][j] = 0.f;
  }

  const int* bt = p.block_table + b * p.bt_s0;
  for (int j0 = j_begin + warp * 32; j0 < j_end; j0 += kKVWarps * 32) {
    const int j = j0 + lane;
    const bool valid = j < j_end;
    float s[GMAX];
#pragma unroll
    for (int h = 0; h < GMAX; ++h) s[h] = 0.f;
    if (valid) {
      const int blk = bt[j / p.block_size];
      const int off = j - (j / p.block_size) * p.block_size;
      const uint8_t* slot = p.cache + blk * p.c_s0 + hk * p.c_s1 + off * p.c_s2;
      // V row -> shared tile (codes + scale/zero)
      // (V starts at byte D/2 + 4 of the slot: 4-byte aligned only)
      const uint32_t* vsrc = reinterpret_cast<const uint32_t*>(slot + D / 2 + 4);
      uint32_t* vdst = reinterpret_cast<uint32_t*>(sm.v[warp][lane]);
#pragma unroll
      for (int i = 0; i < D / 8 + 1; ++i) vdst[i] = vsrc[i];
      // K row: scores against every head
      const uint32_t ksz = *reinterpret_cast<const uint32_t*>(slot + D / 2);
      const float ksc = __half2float(__ushort_as_half(static_cast<unsigned short>(ksz & 0xFFFFu)));
      const float kz = __half2float(__ushort_as_half(static_cast<unsigned short>(ksz >> 16)));
      const uint2* ksrc = reinterpret_cast<const uint2*>(slot);
#pragma unroll
      for (int i = 0; i < D / 16; ++i) {
        const uint2 w = ksrc[i];
        float kv[16];
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          kv[c] = (static_cast<float>((w.x >> (4 * c)) & 0xFu) - kz) * ksc;
          kv[8 + c] = (static_cast<float>((w.y >> (4 * c)) & 0xFu) - kz) * ksc;
        }
#pragma unroll
        for (int h = 0; h < GMAX; ++h) {
          if (h < G) {
            const float4* qh = reinterpret_cast<const float4*>(&sm.q[h][i * 16]);
#pragma unroll
            for (int c4 = 0; c4 < 4; ++c4) {
              const float4 qq = qh[c4];
              s[h] = fmaf(qq.x, kv[4 * c4 + 0], s[h]);
              s[h] = fmaf(qq.y, kv[4 * c4 + 1], s[h]);
              s[h] = fmaf(qq.z, kv[4 * c4 + 2], s[h]);
              s[h] = fmaf(qq.w, kv[4 * c4 + 3], s[h]);
            }
          }
        }
      }
    }
    // online softmax (lane 0 of the tile is always valid, so every max is finite)
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
      if (h < G) {
        const float sc = valid ? s[h] * p.scale : -INFINITY;
        const float mnew = fmaxf(m[h], warp_max(sc));
        const float pj = valid ? __expf(sc - mnew) : 0.f;
        const float alpha = __expf(m[h] - mnew);  // exp(-inf) = 0 on the first tile
        l[h] = l[h] * alpha + warp_sum(pj);
        m[h] = mnew;
#pragma unroll
        for (int e = 0; e < E; ++e) o[h][e] *= alpha;
        sm.p[warp][h][lane] = pj;
      }
    }
    __syncwarp();
    const int nk = min(32, j_end - j0);
    for (int jj = 0; jj < nk; ++jj) {
      const uint8_t* vr = sm.v[warp][jj];
      const uint32_t vsz = *reinterpret_cast<const uint32_t*>(vr + D / 2);
      const float vsc = __half2float(__ushort_as_half(static_cast<unsigned short>(vsz & 0xFFFFu)));
      const float vz = __half2float(__ushort_as_half(static_cast<unsigned short>(vsz >> 16)));
      uint32_t codes;
      if constexpr (E == 2) codes = vr[lane];
      else if constexpr (E == 4) codes = reinterpret_cast<const uint16_t*>(vr)[lane];
      else codes = reinterpret_cast<const uint32_t*>(vr)[lane];
      float vv[E];
#pragma unroll
      for (int e = 0; e < E; ++e) vv[e] = (static_cast<float>((codes >> (4 * e)) & 0xFu) - vz) * vsc;
#pragma unroll
      for (int h = 0; h < GMAX; ++h) {
        if (h < G) {
          const float pj = sm.p[warp][h][jj];
#pragma unroll
          for (int e = 0; e < E; ++e) o[h][e] = fmaf(pj, vv[e], o[h][e]);
        }
      }
    }
    __syncwarp();
  }

  // merge the warps: M = max_w m_w, L = sum_w l_w e^(m_w - M), O = sum_w o_w e^(m_w - M)
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
      sm.ml[warp][h][0] = m[h];
      sm.ml[warp][h][1] = l[h];
    }
  }
  __syncthreads();  // also: no warp reads sm.q any more, so it can hold the sums
  float wgt[GMAX];
#pragma unroll
  for (int h = 0; h < GMAX; ++h) {
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kKVWarps; ++w) M = fmaxf(M, sm.ml[w][h][0]);
    wgt[h] = m[h] == -INFINITY ? 0.f : __expf(m[h] - M);
  }
  // deterministic sum of the weighted o over the warps, into sm.q
  for (int w = 0; w < kKVWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int h = 0; h < GMAX; ++h) {
        if (h < G) {
#pragma unroll
          for (int e = 0; e < E; ++e) {
            float& dst = sm.q[h][lane * E + e];
            dst = (w == 0 ? 0.f : dst) + o[h][e] * wgt[h];
          }
        }
      }
    }
    __syncthreads();
  }
  // write: thread i handles dimensions i, i + blockDim.x, ... of every head
  for (int h = 0; h < G; ++h) {
    float M = -INFINITY, L = 0.f;
    for (int w = 0; w < kKVWarps; ++w) M = fmaxf(M, sm.ml[w][h][0]);
    for (int w = 0; w < kKVWarps; ++w) {
      const float mw = sm.ml[w][h][0];
      if (mw != -INFINITY) L += sm.ml[w][h][1] * __expf(mw - M);
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    const int64_t row = static_cast<int64_t>(t) * p.H + hk * G + h;
    if (S > 1 && threadIdx.x == 0) {
      p.part_ml[(row * S + split) * 2] = M;
      p.part_ml[(row * S + split) * 2 + 1] = L;
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      const float val = sm.q[h][d] * inv;
      if (S == 1) {
        static_cast<T*>(p.out)[row * D + d] = from_float<T>(val);
      } else {
        p.part_o[(row * S + split) * D + d] = val;
      }
    }
  }
}

// out[t, h] = sum_s o_s · l_s e^(m_s - M) / sum_s l_s e^(m_s - M), M = max_s m_s
template <typename T>
__global__ void kv4_attention_combine_kernel(const float* part_o, const float* part_ml,
                                             void* out, int H, int S, int D) {
  const int t = blockIdx.x, h = blockIdx.y;
  const int64_t row = static_cast<int64_t>(t) * H + h;
  const float* ml = part_ml + row * S * 2;
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, ml[2 * s]);
  float den = 0.f;
  for (int s = 0; s < S; ++s)
    if (ml[2 * s] != -INFINITY) den += ml[2 * s + 1] * __expf(ml[2 * s] - M);
  const float inv = den > 0.f ? 1.f / den : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      if (ml[2 * s] != -INFINITY)
        acc += part_o[(row * S + s) * D + d] * ml[2 * s + 1] * __expf(ml[2 * s] - M);
    }
    static_cast<T*>(out)[row * D + d] = from_float<T>(acc * inv);
  }
}

}  // namespace quarot_cuda
