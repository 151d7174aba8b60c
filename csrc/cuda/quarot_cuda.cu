// CUDA kernels of vllm_quarot, registered as torch.ops.quarot_cuda.*:
//   hadamard_quantize, w4a4_gemm, kv4_cache_update, kv4_decode_attention.
// They implement the math of the PyTorch reference ops (vllm_quarot/runtime/ops/reference.py,
// vllm_quarot/kv_attention.py); see csrc/cuda/README.md.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "hadamard_quant.cuh"
#include "kv4_attention.cuh"
#include "w4a4_gemm.cuh"

namespace quarot_cuda {
namespace {

using at::Tensor;

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;
};

DeviceInfo device_info(int device) {
  static DeviceInfo cache[64];
  DeviceInfo& d = cache[device & 63];
  if (d.sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin,
                                          cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  }
  return d;
}

bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return (int64_t{1} << l) == v ? l : -1;
}

// Calls f(T{}) with T the CUDA type of a float32 / float16 / bfloat16 tensor.
template <typename F>
void dispatch_float(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", st);
  }
}

// Same for the 16-bit types only (activations / outputs of the serving path).
template <typename F>
void dispatch_half(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, what, ": dtype must be float16 or bfloat16, got ", st);
  }
}

// ------------------------------------------------------------------ hadamard_quantize

template <typename T, int THREADS>
void launch_hadamard_quant(HadQuantParams p, int device, cudaStream_t stream,
                           const at::TensorOptions& fopts, Tensor& scratch) {
  const DeviceInfo info = device_info(device);
  const bool mix = p.do_had && p.K > 1;
  const size_t hs_words = mix ? static_cast<size_t>(p.K) * p.W : 0;
  const size_t fixed = (36 + ((hs_words + 3) & ~size_t{3})) * sizeof(float);
  const size_t bufs = (mix ? 2 : 1) * static_cast<size_t>(p.n) * sizeof(float);
  auto kernel = hadamard_quant_kernel<T, THREADS>;
  p.use_smem = fixed + bufs <= static_cast<size_t>(info.smem_optin);
  const size_t smem = p.use_smem ? fixed + bufs : fixed;
  TORCH_CHECK(smem <= static_cast<size_t>(info.smem_optin),
              "hadamard_quantize: the K x K sign table does not fit in shared memory");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem));
  per_sm = per_sm < 1 ? 1 : per_sm;
  const int64_t resident = static_cast<int64_t>(per_sm) * info.sms;
  int64_t grid64 = p.M < resident ? p.M : resident;
  if (!p.use_smem && grid64 > 2 * info.sms) grid64 = 2 * info.sms;  // bounds the scratch
  const int grid = static_cast<int>(grid64);
  if (!p.use_smem) {
    scratch = at::empty({grid, 2 * static_cast<int64_t>(p.n)}, fopts);
    p.scratch = scratch.data_ptr<float>();
  }
  kernel<<<grid, THREADS, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> hadamard_quantize(const Tensor& x, const std::optional<Tensor>& had_k,
                                             int64_t bits, double clip_ratio) {
  TORCH_CHECK(x.is_cuda(), "hadamard_quantize: x must be a CUDA tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "hadamard_quantize: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "hadamard_quantize: empty last dimension");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1);
  TORCH_CHECK(bits == 8 || n % 2 == 0, "hadamard_quantize: 4-bit packing needs an even size");
  TORCH_CHECK(n <= (int64_t{1} << 30), "hadamard_quantize: row too long");
  const Tensor xc = x.contiguous();
  const int64_t M = xc.numel() / n;

  std::vector<int64_t> code_shape(x.sizes().begin(), x.sizes().end());
  std::vector<int64_t> scale_shape = code_shape;
  code_shape.back() = bits == 4 ? n / 2 : n;
  scale_shape.back() = 1;
  Tensor codes = at::empty(code_shape, x.options().dtype(bits == 4 ? at::kByte : at::kChar));
  Tensor scales = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (M == 0) return {codes, scales};

  HadQuantParams p{};
  p.x = xc.data_ptr();
  p.codes = static_cast<uint8_t*>(codes.data_ptr());
  p.scales = scales.data_ptr<float>();
  p.M = static_cast<int>(M);
  p.n = static_cast<int>(n);
  p.bits = static_cast<int>(bits);
  p.qmax = (1 << (bits - 1)) - 1;
  p.mult = static_cast<float>(clip_ratio / p.qmax);
  p.do_had = had_k.has_value();
  p.K = 1;
  p.W = 1;
  p.log2P = 0;
  p.norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  Tensor had;
  if (p.do_had) {
    TORCH_CHECK(had_k->dim() == 2 && had_k->size(0) == had_k->size(1),
                "hadamard_quantize: had_k must be square");
    const int64_t K = had_k->size(0);
    TORCH_CHECK(K >= 1 && n % K == 0, "hadamard_quantize: size ", n,
                " is not a multiple of the factor ", K);
    const int l2 = log2_exact(n / K);
    TORCH_CHECK(l2 >= 0, "hadamard_quantize: n / K = ", n / K, " is not a power of two");
    p.K = static_cast<int>(K);
    p.W = static_cast<int>((K + 31) / 32);
    p.log2P = l2;
    if (K > 1) {
      had = had_k->to(x.device(), at::kFloat).contiguous();
      p.had = had.data_ptr<float>();
    }
  }
  const size_t esize = xc.element_size();
  p.vec = n % 8 == 0 && aligned(p.x, 16) && aligned(p.codes, bits == 4 ? 4 : 8) &&
          (esize == 2 || n % 4 == 0);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  Tensor scratch;
  const auto fopts = x.options().dtype(at::kFloat);
  dispatch_float(xc.scalar_type(), "hadamard_quantize", [&](auto tag) {
    using T = decltype(tag);
    if (n <= 2048) {
      launch_hadamard_quant<T, 256>(p, device, stream, fopts, scratch);
    } else {
      launch_hadamard_quant<T, 512>(p, device, stream, fopts, scratch);
    }
  });
  return {codes, scales};
}

// ------------------------------------------------------------------ w4a4_gemm

template <int WM, int WN, typename OutT>
void launch_gemm_tc(const GemmParams& p, cudaStream_t stream) {
  constexpr int smem = gemm_smem_bytes<WM, WN>();
  auto kernel = w4a4_gemm_tc_kernel<WM, WN, OutT>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.N + 32 * WN - 1) / (32 * WN), (p.M + 64 * WM - 1) / (64 * WM));
  kernel<<<grid, WM * WN * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor w4a4_gemm(const Tensor& a_packed, const Tensor& a_scale, const Tensor& w_packed,
                 const Tensor& w_scale, const std::optional<Tensor>& bias,
                 at::ScalarType out_dtype) {
  TORCH_CHECK(a_packed.is_cuda() && w_packed.is_cuda(), "w4a4_gemm: CUDA tensors expected");
  TORCH_CHECK(a_packed.dim() == 2 && w_packed.dim() == 2, "w4a4_gemm: 2-D operands expected");
  TORCH_CHECK(a_packed.scalar_type() == at::kByte || a_packed.scalar_type() == at::kChar,
              "w4a4_gemm: a_packed must be uint8/int8");
  TORCH_CHECK(w_packed.scalar_type() == at::kByte || w_packed.scalar_type() == at::kChar,
              "w4a4_gemm: w_packed must be uint8/int8");
  TORCH_CHECK(a_packed.size(1) == w_packed.size(1), "w4a4_gemm: K mismatch (", a_packed.size(1),
              " vs ", w_packed.size(1), " packed bytes)");
  const c10::cuda::CUDAGuard guard(a_packed.device());
  const int64_t M = a_packed.size(0), N = w_packed.size(0), K = 2 * a_packed.size(1);
  TORCH_CHECK(a_scale.numel() == M, "w4a4_gemm: a_scale must have M entries");
  TORCH_CHECK(w_scale.numel() == N,
              "w4a4_gemm: w_scale must be per output channel ([N] or [N, 1]); group-wise "
              "scales are not supported by this kernel");
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "w4a4_gemm: out_dtype must be float16 or bfloat16");
  TORCH_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 31) && K < (int64_t{1} << 31),
              "w4a4_gemm: dimensions too large");

  Tensor out = at::empty({M, N}, a_packed.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const Tensor a = a_packed.contiguous(), w = w_packed.contiguous();
  const Tensor as = a_scale.to(at::kFloat).contiguous();
  const Tensor ws = w_scale.to(at::kFloat).contiguous();
  Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "w4a4_gemm: bias must have N entries");
    b = bias->to(at::kFloat).contiguous();
  }

  GemmParams p{};
  p.a = static_cast<const uint8_t*>(a.data_ptr());
  p.w = static_cast<const uint8_t*>(w.data_ptr());
  p.a_scale = as.data_ptr<float>();
  p.w_scale = ws.data_ptr<float>();
  p.bias = bias.has_value() ? b.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool tc = K % 32 == 0 && aligned(p.a, 16) && aligned(p.w, 16);
  dispatch_half(out_dtype, "w4a4_gemm", [&](auto tag) {
    using OutT = decltype(tag);
    if (!tc) {
      const int64_t total = M * N;
      const int threads = 256;
      w4a4_simt_kernel<OutT><<<static_cast<unsigned>((total + threads - 1) / threads), threads,
                               0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (M <= 16) {
      const int grid = static_cast<int>((N + kGemvNT * 8 - 1) / (kGemvNT * 8));
      w4a4_gemv_kernel<OutT><<<grid, kGemvSplit * 32, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (M <= 256) {
      launch_gemm_tc<1, 4, OutT>(p, stream);  // 64 x 128 tiles, 4 warps
    } else {
      launch_gemm_tc<2, 4, OutT>(p, stream);  // 128 x 128 tiles, 8 warps
    }
  });
  return out;
}

// ------------------------------------------------------------------ KV4

int check_kv_cache(const Tensor& kv_cache, int64_t D, int64_t H_kv) {
  TORCH_CHECK(kv_cache.is_cuda() && kv_cache.scalar_type() == at::kByte && kv_cache.dim() == 4,
              "KV4: kv_cache must be a uint8 CUDA tensor [num_blocks, H_kv, block_size, "
              "2 * (D/2 + 4)]");
  TORCH_CHECK(kv_cache.size(1) == H_kv, "KV4: kv_cache has ", kv_cache.size(1),
              " kv heads, expected ", H_kv);
  TORCH_CHECK(kv_cache.size(3) == 2 * (D / 2 + 4) && kv_cache.stride(3) == 1,
              "KV4: kv_cache last dim must be contiguous with 2 * (D/2 + 4) = ", 2 * (D / 2 + 4),
              " bytes");
  TORCH_CHECK(aligned(kv_cache.data_ptr(), 8) && kv_cache.stride(0) % 8 == 0 &&
                  kv_cache.stride(1) % 8 == 0 && kv_cache.stride(2) % 8 == 0,
              "KV4: kv_cache must be 8-byte aligned");
  return static_cast<int>(kv_cache.size(2));
}

void check_r3(const std::optional<Tensor>& had_k) {
  TORCH_CHECK(!had_k.has_value() || had_k->numel() == 1,
              "KV4: only power-of-two head dims (a 1x1 had_k factor) are supported by the CUDA "
              "kernels");
}

template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, "KV4: head_dim must be 64 or 128, got ", D);
  }
}

void kv4_cache_update(const Tensor& key, const Tensor& value, Tensor& kv_cache,
                      const Tensor& slot_mapping, const std::optional<Tensor>& had_k,
                      double clip_ratio) {
  TORCH_CHECK(key.is_cuda() && value.is_cuda() && slot_mapping.is_cuda(),
              "kv4_cache_update: CUDA tensors expected");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(),
              "kv4_cache_update: key and value must both be [T, H_kv, D]");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "kv4_cache_update: key/value dtypes");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1,
              "kv4_cache_update: the head dim of key/value must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt,
              "kv4_cache_update: slot_mapping must be int32 or int64");
  check_r3(had_k);
  const c10::cuda::CUDAGuard guard(key.device());
  const int64_t D = key.size(2), H = key.size(1);
  const int block_size = check_kv_cache(kv_cache, D, H);
  const Tensor slots = slot_mapping.contiguous();
  const int64_t T = slots.numel();
  TORCH_CHECK(T <= key.size(0), "kv4_cache_update: more slots than tokens");
  if (T == 0) return;

  KVUpdateParams p{};
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.k_s0 = key.stride(0);
  p.k_s1 = key.stride(1);
  p.v_s0 = value.stride(0);
  p.v_s1 = value.stride(1);
  p.cache = static_cast<uint8_t*>(kv_cache.data_ptr());
  p.c_s0 = kv_cache.stride(0);
  p.c_s1 = kv_cache.stride(1);
  p.c_s2 = kv_cache.stride(2);
  p.slots = slots.data_ptr();
  p.T = static_cast<int>(T);
  p.H = static_cast<int>(H);
  p.block_size = block_size;
  p.clip = static_cast<float>(clip_ratio);
  p.norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  p.r3 = had_k.has_value();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>((T * H + kKVWarps - 1) / kKVWarps);
  const bool slots64 = slots.scalar_type() == at::kLong;
  dispatch_head_dim(D, [&](auto dtag) {
    constexpr int Dc = decltype(dtag)::value;
    dispatch_half(key.scalar_type(), "kv4_cache_update", [&](auto tag) {
      using T_ = decltype(tag);
      if (slots64) {
        kv4_cache_update_kernel<Dc, T_, int64_t><<<grid, kKVWarps * 32, 0, stream>>>(p);
      } else {
        kv4_cache_update_kernel<Dc, T_, int32_t><<<grid, kKVWarps * 32, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename F>
void dispatch_group(int64_t G, F&& f) {
  if (G <= 1) f(std::integral_constant<int, 1>{});
  else if (G <= 2) f(std::integral_constant<int, 2>{});
  else if (G <= 4) f(std::integral_constant<int, 4>{});
  else if (G <= 8) f(std::integral_constant<int, 8>{});
  else if (G <= 16) f(std::integral_constant<int, 16>{});
  else TORCH_CHECK(false, "kv4_decode_attention: at most 16 query heads per kv head, got ", G);
}

Tensor kv4_decode_attention(const Tensor& query, const Tensor& kv_cache, const Tensor& block_table,
                            const Tensor& seq_lens, const Tensor& query_start_loc, double scale,
                            const std::optional<Tensor>& had_k) {
  TORCH_CHECK(query.is_cuda() && query.dim() == 3 && query.stride(2) == 1,
              "kv4_decode_attention: query must be a CUDA [T, H, D] tensor, last dim contiguous");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt,
              "kv4_decode_attention: block_table, seq_lens and query_start_loc must be int32");
  TORCH_CHECK(block_table.dim() == 2 && block_table.stride(1) == 1,
              "kv4_decode_attention: block_table must be [B, max_blocks], rows contiguous");
  const int64_t B = seq_lens.numel();
  TORCH_CHECK(query_start_loc.numel() == B + 1 && block_table.size(0) >= B,
              "kv4_decode_attention: query_start_loc must have B + 1 entries");
  check_r3(had_k);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t T = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t Hkv = kv_cache.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "kv4_decode_attention: H = ", H,
              " is not a multiple of H_kv = ", Hkv);
  const int block_size = check_kv_cache(kv_cache, D, Hkv);
  Tensor out = at::empty({T, H, D}, query.options());
  if (T == 0 || H == 0) return out;
  if (B == 0) return out.zero_();
  const Tensor sl = seq_lens.contiguous(), qsl = query_start_loc.contiguous();

  const int device = query.get_device();
  const DeviceInfo info = device_info(device);
  const int64_t ctas = T * Hkv;
  int64_t S = 1;
  if (ctas < 2 * info.sms) S = (2 * info.sms + ctas - 1) / ctas;
  S = S > 16 ? 16 : S;

  KVAttnParams p{};
  p.q = query.data_ptr();
  p.q_s0 = query.stride(0);
  p.q_s1 = query.stride(1);
  p.cache = static_cast<const uint8_t*>(kv_cache.data_ptr());
  p.c_s0 = kv_cache.stride(0);
  p.c_s1 = kv_cache.stride(1);
  p.c_s2 = kv_cache.stride(2);
  p.block_table = block_table.data_ptr<int>();
  p.bt_s0 = block_table.stride(0);
  p.seq_lens = sl.data_ptr<int>();
  p.qsl = qsl.data_ptr<int>();
  p.out = out.data_ptr();
  p.T = static_cast<int>(T);
  p.H = static_cast<int>(H);
  p.Hkv = static_cast<int>(Hkv);
  p.G = static_cast<int>(H / Hkv);
  p.B = static_cast<int>(B);
  p.block_size = block_size;
  p.scale = static_cast<float>(scale);
  p.norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  p.r3 = had_k.has_value();
  Tensor part_o, part_ml;
  if (S > 1) {
    const auto fopts = query.options().dtype(at::kFloat);
    part_o = at::empty({T, H, S, D}, fopts);
    part_ml = at::empty({T, H, S, 2}, fopts);
    p.part_o = part_o.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(Hkv), static_cast<unsigned>(S));
  dispatch_head_dim(D, [&](auto dtag) {
    constexpr int Dc = decltype(dtag)::value;
    dispatch_group(p.G, [&](auto gtag) {
      constexpr int GMAX = decltype(gtag)::value;
      dispatch_half(query.scalar_type(), "kv4_decode_attention", [&](auto tag) {
        using T_ = decltype(tag);
        constexpr size_t smem = sizeof(AttnSmem<Dc, GMAX>);
        static_assert(smem <= 48 * 1024, "attention tile exceeds the default shared memory");
        kv4_attention_kernel<Dc, GMAX, T_><<<grid, kKVWarps * 32, smem, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (S > 1) {
          kv4_attention_combine_kernel<T_><<<dim3(static_cast<unsigned>(T),
                                                  static_cast<unsigned>(H)),
                                             128, 0, stream>>>(
              p.part_o, p.part_ml, p.out, p.H, static_cast<int>(S), static_cast<int>(D));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace quarot_cuda

TORCH_LIBRARY(quarot_cuda, m) {
  m.def(
      "hadamard_quantize(Tensor x, Tensor? had_k, int bits, float clip_ratio)"
      " -> (Tensor, Tensor)");
  m.def(
      "w4a4_gemm(Tensor a_packed, Tensor a_scale, Tensor w_packed, Tensor w_scale,"
      " Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def(
      "kv4_cache_update(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping,"
      " Tensor? had_k, float clip_ratio) -> ()");
  m.def(
      "kv4_decode_attention(Tensor query, Tensor kv_cache, Tensor block_table,"
      " Tensor seq_lens, Tensor query_start_loc, float scale, Tensor? had_k) -> Tensor");
}

TORCH_LIBRARY_IMPL(quarot_cuda, CUDA, m) {
  m.impl("hadamard_quantize", &quarot_cuda::hadamard_quantize);
  m.impl("w4a4_gemm", &quarot_cuda::w4a4_gemm);
  m.impl("kv4_cache_update", &quarot_cuda::kv4_cache_update);
  m.impl("kv4_decode_attention", &quarot_cuda::kv4_decode_attention);
}

// An importable (empty) Python module, so that `import vllm_quarot._C_cuda` loads the
// library and runs the registrations above (torch.ops.load_library works too).
#define QUAROT_CONCAT_(a, b) a##b
#define QUAROT_CONCAT(a, b) QUAROT_CONCAT_(a, b)
#define QUAROT_STR_(a) #a
#define QUAROT_STR(a) QUAROT_STR_(a)
#ifdef TORCH_EXTENSION_NAME
PyMODINIT_FUNC QUAROT_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, QUAROT_STR(TORCH_EXTENSION_NAME),
                                      nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
#endif
