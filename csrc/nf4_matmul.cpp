// Torch binding of csrc/nf4_matmul.cu (which is plain CUDA with a C entry point). Built with
// the .cu by torch.utils.cpp_extension.load on the GPU machine: see onelayer/nf4_dispatch.py.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

extern "C" cudaError_t onelayer_nf4_matmul(int dtype, const void* x, int64_t stride_xm, const uint8_t* packed,
                                           const void* absmax, const float* absmax2, const float* code2,
                                           const float* offset, const float* code, const void* bias, void* out,
                                           int M, int N, int K, int blocksize, cudaStream_t stream);
extern "C" cudaError_t onelayer_nf4_matmul_mma(int dtype, const void* x, int64_t stride_xm, const uint8_t* packed,
                                               const void* absmax, const float* absmax2, const float* code2,
                                               const float* offset, const float* code, const void* bias, void* out,
                                               int M, int N, int K, int blocksize, cudaStream_t stream);
extern "C" cudaError_t onelayer_nf4_matmul_mma_registers(
    int dtype, const void* x, int64_t stride_xm, const uint8_t* packed, const void* absmax, const float* absmax2,
    const float* code2, const float* offset, const float* code, const void* bias, void* out, int M, int N, int K,
    int blocksize, cudaStream_t stream);

namespace {

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_f32(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "nf4_matmul: ", name, " must be a contiguous fp32 tensor on x's device");
}

using Entry = cudaError_t (*)(int, const void*, int64_t, const uint8_t*, const void*, const float*, const float*,
                              const float*, const float*, const void*, void*, int, int, int, int, cudaStream_t);

// x [M, K] @ W^T (+ bias) -> [M, N] in x's dtype by `entry`; W [N, K] as onelayer/nf4.py describes.
at::Tensor run(Entry entry, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
               const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
               const std::optional<at::Tensor>& offset, const at::Tensor& code,
               const std::optional<at::Tensor>& bias, int64_t n, int64_t blocksize) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "nf4_matmul: x must be a 2-D CUDA tensor");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0,
              "nf4_matmul: the blocksize ", blocksize, " must be a power of two >= 32");
  TORCH_CHECK(k % blocksize == 0, "nf4_matmul: K = ", k, " must be a multiple of the blocksize ", blocksize);
  TORCH_CHECK(packed.device() == x.device() && packed.scalar_type() == at::kByte && packed.is_contiguous()
                  && packed.numel() == n * k / 2 && aligned16(packed),
              "nf4_matmul: packed must be n * K / 2 contiguous, 16-byte aligned uint8 on x's device");
  const bool nested = absmax2.has_value();
  TORCH_CHECK(absmax.device() == x.device() && absmax.is_contiguous() && absmax.numel() == n * k / blocksize
                  && absmax.scalar_type() == (nested ? at::kByte : at::kFloat),
              "nf4_matmul: absmax must hold one ", nested ? "uint8 code" : "fp32 scale", " per block");
  if (nested) {
    TORCH_CHECK(code2.has_value() && offset.has_value(), "nf4_matmul: nested absmax needs code2 and offset");
    check_f32(*absmax2, x, "absmax2");
    check_f32(*code2, x, "code2");
    check_f32(*offset, x, "offset");
    TORCH_CHECK(absmax2->numel() == (absmax.numel() + 255) / 256 && code2->numel() == 256 && offset->numel() == 1,
                "nf4_matmul: absmax2 / code2 / offset sizes");
  }
  check_f32(code, x, "code");
  TORCH_CHECK(code.numel() == 16, "nf4_matmul: code must hold 16 values");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->is_contiguous()
                    && bias->numel() == n,
                "nf4_matmul: bias must be [N] contiguous in x's dtype");
  }
  int dtype;
  switch (x.scalar_type()) {
    case at::kFloat: dtype = 0; break;
    case at::kHalf: dtype = 1; break;
    case at::kBFloat16: dtype = 2; break;
    default: TORCH_CHECK(false, "nf4_matmul: x must be fp32, fp16 or bf16");
  }
  // 16-byte loads of x rows: unit column stride, aligned base and row stride.
  const int64_t per16 = 16 / x.element_size();
  at::Tensor xc = x;
  if (x.stride(1) != 1 || x.stride(0) % per16 != 0 || !aligned16(x)) xc = x.clone(at::MemoryFormat::Contiguous);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const cudaError_t err = entry(
      dtype, xc.data_ptr(), xc.stride(0), packed.data_ptr<uint8_t>(), absmax.data_ptr(),
      nested ? absmax2->data_ptr<float>() : nullptr, nested ? code2->data_ptr<float>() : nullptr,
      nested ? offset->data_ptr<float>() : nullptr, code.data_ptr<float>(),
      bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(), static_cast<int>(m), static_cast<int>(n),
      static_cast<int>(k), static_cast<int>(blocksize), c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "nf4_matmul: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor nf4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                      const std::optional<at::Tensor>& offset, const at::Tensor& code,
                      const std::optional<at::Tensor>& bias, int64_t n, int64_t blocksize) {
  return run(onelayer_nf4_matmul, x, packed, absmax, absmax2, code2, offset, code, bias, n, blocksize);
}

// The major compute capability of a device, asked once per device: the first call comes before
// any CUDA graph capture (onelayer.nf4_dispatch.measure_routes), later ones ask nothing.
int capability_major(int device) {
  static int known[256] = {};
  if (device < 0 || device >= 256) return 0;
  if (known[device] == 0 && cudaDeviceGetAttribute(&known[device], cudaDevAttrComputeCapabilityMajor, device)
                                != cudaSuccess) {
    known[device] = 0;
  }
  return known[device];
}

// The tensor-core kernel: bf16 / fp16 x of 1..64 rows on a device of compute capability >= 8.0;
// `registers`: its variant that looks weights up from a table in registers.
at::Tensor nf4_matmul_mma(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                          const std::optional<at::Tensor>& offset, const at::Tensor& code,
                          const std::optional<at::Tensor>& bias, int64_t n, int64_t blocksize, bool registers) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(0) <= 64
                  && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "nf4_matmul_mma: x must be bf16 or fp16 [M, K] on CUDA with M <= 64");
  TORCH_CHECK(capability_major(x.device().index()) >= 8,
              "nf4_matmul_mma: needs compute capability 8.0 or more (mma.sync with bf16)");
  return run(registers ? onelayer_nf4_matmul_mma_registers : onelayer_nf4_matmul_mma, x, packed, absmax, absmax2,
             code2, offset, code, bias, n, blocksize);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("nf4_matmul", &nf4_matmul, "x @ W^T for an NF4 weight (bitsandbytes layout), small M",
          pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("absmax"), pybind11::arg("absmax2"),
          pybind11::arg("code2"), pybind11::arg("offset"), pybind11::arg("code"), pybind11::arg("bias"),
          pybind11::arg("n"), pybind11::arg("blocksize"));
  mod.def("nf4_matmul_mma", &nf4_matmul_mma, "the same by tensor cores: bf16 / fp16, M <= 64, sm_80+",
          pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("absmax"), pybind11::arg("absmax2"),
          pybind11::arg("code2"), pybind11::arg("offset"), pybind11::arg("code"), pybind11::arg("bias"),
          pybind11::arg("n"), pybind11::arg("blocksize"), pybind11::arg("registers") = false);
}
