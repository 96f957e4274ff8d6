// x [M, K] @ W^T for a frozen NF4 weight W [N, K] at small M (decode), dequantising W in
// registers. Same semantics as onelayer.nf4.nf4_linear_reference: W = code[nibble] * scale in
// fp32, rounded to x's dtype; products and sums in fp32; + bias; one rounding at the end.
// Layout of the packed weight and the double-quantised scales: onelayer/nf4.py.
//
// Needs only the CUDA runtime headers: the torch binding is csrc/nf4_matmul.cpp, so CI can
// compile this file with a pip-installed nvcc and no CUDA build of torch.
//
// Two kernels: the one described next (FMA on CUDA cores, any dtype and M) and, further down, a
// tensor-core one for bf16 / fp16 and M <= 64 (mma.sync; not yet timed on a GPU).
//
// A block of THREADS threads owns NC adjacent output columns (NC weight rows of K/2 bytes
// each) and the MT rows of x of its row tile. Thread t reads, from each of its NC weight rows,
// 16 bytes = 32 weights at k = 32 (t + THREADS i): contiguous rows, every weight byte read
// once per launch. 32 consecutive weights lie in one quantisation block (blocksize a power of
// two >= 32, K % blocksize == 0), so the double-quantised absmax is undone once per 32 weights. The
// 32 x NC weights are kept rounded to x's dtype in packed pairs; then for each row of x the
// thread loads the same 32 columns of x (x is small: L1/L2) and accumulates NC fp32 sums:
// each x load serves NC weight rows. Splitting K over the block (not one warp a column)
// gives N / NC blocks, 256 for the k/v projections (N = 1024). Sums: warp shuffles, then
// shared memory across the warps. Rows of x beyond MT are grid.y: another pass over W.
//
// Measured on an H100 (2026-11-27, benchmarks/bench_nf4_matmul.py --tune, one Qwen3-8B
// layer's 7 projections, bf16): NC = 4 with 64 threads a block was the fastest of
// (NC, threads) in {(4, 128), (4, 64), (8, 128), (2, 128), (8, 64)} at M = 2..4 (229 us at
// M = 4 against bitsandbytes' 273); FMA on CUDA cores loses to the tensor cores of the Triton
// kernel from M = 8 (406 vs 271 us) and to bitsandbytes' GEMV at M = 1 (158 vs 114 us).
// (Timed before the blocksize division became a shift: 2-13% fewer instructions a pass.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "nf4_lookup.cuh"

namespace {

// Per dtype: weights rounded to the dtype and kept as packed pairs (Pair), the block shape
// (kCols columns, kThreads threads; fp32 pairs take twice the registers), 32 values of x from
// 16-byte loads.
template <typename T> struct Io;
template <> struct Io<float> {
  using Pair = float2;
  static constexpr int kCols = 2, kThreads = 128;
  static __device__ Pair pack(float a, float b) { return make_float2(a, b); }
  static __device__ float2 unpack(Pair p) { return p; }
  static __device__ float load(float v) { return v; }
  static __device__ float store(float v) { return v; }
  static __device__ void load32(const float* p, float* out) {
    const float4* v = reinterpret_cast<const float4*>(p);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float4 f = __ldg(v + i);
      out[4 * i] = f.x; out[4 * i + 1] = f.y; out[4 * i + 2] = f.z; out[4 * i + 3] = f.w;
    }
  }
};
// 32 values of a 16-bit dtype from four 16-byte loads, unpacked pair by pair (bf16 and fp16).
template <typename IoT, typename T>
__device__ void load32_halves(const T* p, float* out) {
  const uint4* v = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 u = __ldg(v + i);
    const typename IoT::Pair* h = reinterpret_cast<const typename IoT::Pair*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = IoT::unpack(h[j]);
      out[8 * i + 2 * j] = f.x; out[8 * i + 2 * j + 1] = f.y;
    }
  }
}

template <> struct Io<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr int kCols = 4, kThreads = 64;
  static __device__ Pair pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ float2 unpack(Pair p) { return __bfloat1622float2(p); }
  static __device__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  static __device__ void load32(const __nv_bfloat16* p, float* out) { load32_halves<Io>(p, out); }
};
template <> struct Io<__half> {
  using Pair = __half2;
  static constexpr int kCols = 4, kThreads = 64;
  static __device__ Pair pack(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ float2 unpack(Pair p) { return __half22float2(p); }
  static __device__ float load(__half v) { return __half2float(v); }
  static __device__ __half store(float v) { return __float2half_rn(v); }
  static __device__ void load32(const __half* p, float* out) { load32_halves<Io>(p, out); }
};

struct Scales {
  const void* absmax;     // nested: uint8 [blocks] codes into code2; else fp32 [blocks]
  const float* absmax2;   // nested: fp32 [ceil(blocks / 256)]; nullptr when not nested
  const float* code2;     // nested: fp32 [256]
  const float* offset;    // nested: fp32 [1]
};

template <typename T, int MT, int NC, int THREADS>
__global__ void __launch_bounds__(THREADS)
nf4_matmul_kernel(const T* __restrict__ x, int64_t stride_xm, const uint8_t* __restrict__ packed,
                  Scales sc, const float* __restrict__ code, const T* __restrict__ bias,
                  T* __restrict__ out, int M, int N, int K, int blocksize) {
  static_assert(NC * MT <= 32, "one lane per output of the block");
  // pair[b] = the two weights of byte b before scaling: (code[b >> 4], code[b & 15]).
  __shared__ float2 pair[256];
  __shared__ float partial[THREADS / 32][NC * MT];
  for (int b = threadIdx.x; b < 256; b += THREADS) pair[b] = make_float2(code[b >> 4], code[b & 15]);
  __syncthreads();

  const int n0 = blockIdx.x * NC;
  const int m0 = blockIdx.y * MT;
  const int cols = min(NC, N - n0);
  const int rows = min(MT, M - m0);
  const bool nested = sc.absmax2 != nullptr;
  const float offset = nested ? __ldg(sc.offset) : 0.f;
  const int blocks_per_row = K / blocksize;
  const int block_shift = __ffs(blocksize) - 1;  // a power of two (the binding checks): no division

  float acc[NC][MT];
#pragma unroll
  for (int c = 0; c < NC; ++c)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[c][m] = 0.f;

  for (int k = threadIdx.x * 32; k < K; k += THREADS * 32) {
    typename Io<T>::Pair w[NC][16];  // W[n0 + c, k .. k + 31], rounded to T
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      if (c < cols) {
        const int64_t n = n0 + c;
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(packed + n * (K / 2) + k / 2));
        const int64_t blk = n * blocks_per_row + (k >> block_shift);
        // Rounded after the product and after the sum, as bitsandbytes computes it (no FMA).
        const float scale = nested
            ? __fadd_rn(__fmul_rn(__ldg(sc.code2 + __ldg(static_cast<const uint8_t*>(sc.absmax) + blk)),
                                  __ldg(sc.absmax2 + blk / 256)), offset)
            : __ldg(static_cast<const float*>(sc.absmax) + blk);
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 16; ++j) {  // byte j of the 16: weights k + 2j (high nibble), k + 2j + 1
          const float2 p = pair[(words[j / 4] >> (8 * (j % 4))) & 0xFF];
          w[c][j] = Io<T>::pack(p.x * scale, p.y * scale);
        }
      } else {
#pragma unroll
        for (int j = 0; j < 16; ++j) w[c][j] = Io<T>::pack(0.f, 0.f);
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < rows) {
        float xv[32];
        Io<T>::load32(x + (m0 + m) * stride_xm + k, xv);
#pragma unroll
        for (int c = 0; c < NC; ++c) {
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            const float2 f = Io<T>::unpack(w[c][j]);
            acc[c][m] = fmaf(xv[2 * j + 1], f.y, fmaf(xv[2 * j], f.x, acc[c][m]));
          }
        }
      }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < NC; ++c)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[c][m];
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
      if (lane == c * MT + m) partial[warp][lane] = v;
    }
  __syncthreads();
  const int c = threadIdx.x / MT, m = threadIdx.x % MT;  // thread c * MT + m writes out[m0 + m, n0 + c]
  if (threadIdx.x < NC * MT && c < cols && m < rows) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) v += partial[w][threadIdx.x];
    if (bias != nullptr) v += Io<T>::load(bias[n0 + c]);
    out[static_cast<int64_t>(m0 + m) * N + n0 + c] = Io<T>::store(v);
  }
}

// What a launch needs besides the kernel and its tile: the C entry points' arguments.
struct Launch {
  const void* x;
  int64_t stride_xm;
  const uint8_t* packed;
  Scales sc;
  const float* code;
  const void* bias;
  void* out;
  int M, N, K, blocksize;
  cudaStream_t stream;
};

template <typename T, int MT, int NC, int THREADS>
cudaError_t launch_tile(const Launch& a) {
  dim3 grid((a.N + NC - 1) / NC, (a.M + MT - 1) / MT);
  nf4_matmul_kernel<T, MT, NC, THREADS><<<grid, THREADS, 0, a.stream>>>(
      static_cast<const T*>(a.x), a.stride_xm, a.packed, a.sc, a.code, static_cast<const T*>(a.bias),
      static_cast<T*>(a.out), a.M, a.N, a.K, a.blocksize);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const Launch& a) {
  // The smallest row tile that holds M (one pass over W), up to 8 rows a pass.
  constexpr int NC = Io<T>::kCols, TH = Io<T>::kThreads;
  if (a.M <= 1) return launch_tile<T, 1, NC, TH>(a);
  if (a.M <= 2) return launch_tile<T, 2, NC, TH>(a);
  if (a.M <= 4) return launch_tile<T, 4, NC, TH>(a);
  return launch_tile<T, 8, NC, TH>(a);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core variant for bf16 / fp16 x and M <= 64 (sm_80+): out^T = W x^T with mma.sync
// m16n8k16, the weights as the 16-row operand A and x^T as the 8-column operand B (MB of them,
// 8 rows of x each: 1, 2, 4 or 8). A warp owns NT tiles of 16 output columns and
// walks K in chunks of 128; the WARPS warps of a block split K and add their sums in shared
// memory at the end, in a fixed order.
//
// K is permuted inside each chunk so that every lane dequantises only the bytes it loaded: lane
// (g = lane / 4, t = lane % 4) loads 16 bytes (32 weights) of rows g and g + 8 of its tile, at
// k = kc + 32 t .. kc + 32 t + 31, and the same columns of x rows g, g + 8, ... In step s (0..7) the
// fragment columns 2t, 2t + 1 (registers a0 / a1, b0) stand for k = kc + 32 t + 4 s + {0, 1}
// (byte 2s: high, low nibble) and the columns 8 + 2t, 9 + 2t (a2 / a3, b1) for
// k = kc + 32 t + 4 s + {2, 3} (byte 2s + 1). A and B read the same permutation, and over s
// and t it covers the chunk's 128 k once, so the sum is the dot product. 32 aligned k lie in
// one quantisation block (blocksize a multiple of 32), so each row takes one scale a chunk.
// The NF4 values come from a 16-entry table in shared memory (16 banks: no conflicts). Up to
// 32 rows a warp issues the next chunk's loads (ChunkLoads) before this chunk's lookups and
// MMAs, so that DRAM latency overlaps them.
//
// REGISTERS (up to 16 rows): each row's 16 possible weights of the chunk are made once and
// held in registers, and the weights picked from them by byte permutes (csrc/nf4_lookup.cuh):
// no shared-memory loads, half the conversions, and, a weight byte, 7-21% fewer instructions
// on sm_90 and from 1% more to 13% fewer on sm_80-89 than the shared table (nvcc 13.0 and
// 13.5; benchmarks/RESULTS.md), for more registers (64-101 a thread against 51-64) and one
// tile a warp (two spill at 16 rows).
//
// Not yet run on a GPU. Rollouts use it only at the row counts where, timed on the card at
// start, it matches the torch reference and is the fastest (onelayer/nf4_dispatch.py,
// measure_routes); benchmarks/bench_nf4_matmul.py checks and times it as "cuda mma" and
// "cuda mma register table".

// d += a b: mma.sync m16n8k16 with T (bf16 or fp16) operands and fp32 accumulators.
#define ONELAYER_MMA_16816(TYPE)                                                                      \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0, %1, %2, %3}, "       \
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                                        \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
__device__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    ONELAYER_MMA_16816("f16");
  } else {
    ONELAYER_MMA_16816("bf16");
  }
#else
  __trap();
#endif
}
#undef ONELAYER_MMA_16816

constexpr int kChunk = 128;  // k per warp step: 4 lanes x 32

// What one lane reads from DRAM for a chunk: 16 bytes of weight rows g and g + 8 of each of
// its NT tiles at column k, and each row's absmax as stored.
template <int NT>
struct ChunkLoads {
  uint32_t w[NT][2][4];
  int code[NT][2];      // nested: the row's absmax code into code2; -1: a row or k past the weight
  float second[NT][2];  // nested: the second-level absmax of that code; plain: the fp32 absmax
};

template <int NT>
__device__ __forceinline__ void load_chunk(ChunkLoads<NT>& c, const uint8_t* __restrict__ packed, const Scales& sc,
                                           int n0, int N, int K, int k, int g, int blocks_per_row, int block_shift) {
  const int64_t row_bytes = K / 2;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + 16 * nt + g + 8 * h;
      uint4 q = make_uint4(0, 0, 0, 0);
      c.code[nt][h] = -1;
      c.second[nt][h] = 0.f;
      if (n < N && k < K) {  // past K (K % 128 != 0) the columns count as zeros
        q = __ldg(reinterpret_cast<const uint4*>(packed + n * row_bytes + k / 2));
        const int64_t blk = n * blocks_per_row + (k >> block_shift);
        if (sc.absmax2 == nullptr) {
          c.second[nt][h] = __ldg(static_cast<const float*>(sc.absmax) + blk);
        } else {
          c.code[nt][h] = __ldg(static_cast<const uint8_t*>(sc.absmax) + blk);
          c.second[nt][h] = __ldg(sc.absmax2 + blk / 256);
        }
      }
      c.w[nt][h][0] = q.x; c.w[nt][h][1] = q.y; c.w[nt][h][2] = q.z; c.w[nt][h][3] = q.w;
    }
}

// A row's scale from its loads: the double-quantised absmax undone (no FMA, as bitsandbytes
// rounds it), the plain fp32 absmax, or 0 past the weight.
__device__ __forceinline__ float chunk_scale(const Scales& sc, float offset, int code, float second) {
  if (sc.absmax2 == nullptr) return second;
  if (code < 0) return 0.f;
  return __fadd_rn(__fmul_rn(__ldg(sc.code2 + code), second), offset);
}

template <typename T, int NT, int MB, int WARPS, bool REGISTERS>
__global__ void __launch_bounds__(WARPS * 32)
nf4_mma_kernel(const T* __restrict__ x, int64_t stride_xm, const uint8_t* __restrict__ packed, Scales sc,
               const float* __restrict__ code, const T* __restrict__ bias, T* __restrict__ out,
               int M, int N, int K, int blocksize) {
  __shared__ float table[16];
  __shared__ float partial[WARPS][NT * MB * 4][32];  // each warp's accumulators, lane-minor
  if constexpr (!REGISTERS) {  // REGISTERS makes each row's table from onelayer::nf4_code
    if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16 * NT;
  const float offset = sc.absmax2 != nullptr ? __ldg(sc.offset) : 0.f;
  const int blocks_per_row = K / blocksize;
  const int block_shift = __ffs(blocksize) - 1;  // a power of two (the binding checks): no division

  float acc[NT][MB][4];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int j = 0; j < MB; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  // The next chunk's loads are issued before this chunk's work, except with 8 row blocks
  // (33-64 rows), where holding two chunks' loads spills registers (benchmarks/compile_kernels.py).
  constexpr bool kAhead = MB <= 4;
  ChunkLoads<NT> chunk;  // this lane's 32 columns k = kc + 32 t .. + 31 of the chunk kc
  if (kAhead) load_chunk(chunk, packed, sc, n0, N, K, warp * kChunk + 32 * t, g, blocks_per_row, block_shift);
  for (int kc = warp * kChunk; kc < K; kc += WARPS * kChunk) {
    const int k = kc + 32 * t;
    const bool k_ok = k < K;
    if (!kAhead) load_chunk(chunk, packed, sc, n0, N, K, k, g, blocks_per_row, block_shift);
    uint32_t w[NT][2][4];
    float scale[NT][2];
    onelayer::Table tables[REGISTERS ? NT : 1][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        scale[nt][h] = chunk_scale(sc, offset, chunk.code[nt][h], chunk.second[nt][h]);
        if constexpr (REGISTERS) tables[nt][h] = onelayer::make_table<T>(scale[nt][h]);
#pragma unroll
        for (int i = 0; i < 4; ++i) w[nt][h][i] = chunk.w[nt][h][i];
      }
    if (kAhead) load_chunk(chunk, packed, sc, n0, N, K, k + WARPS * kChunk, g, blocks_per_row, block_shift);
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      uint2 b[MB];  // x[g + 8 mb, k + 4s .. k + 4s + 3]: b0 and b1 of step s
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const int m = g + 8 * mb;
        b[mb] = (m < M && k_ok) ? __ldg(reinterpret_cast<const uint2*>(x + m * stride_xm + k + 4 * s))
                                : make_uint2(0, 0);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t a[4];  // a0: row g, byte 2s; a1: row g + 8, byte 2s; a2, a3: byte 2s + 1
        if constexpr (REGISTERS) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint2 pairs = onelayer::lookup_pairs(tables[nt][h], w[nt][h][s / 2], s % 2);
            a[h] = pairs.x;
            a[2 + h] = pairs.y;
          }
        } else {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int h = r & 1, byte = 2 * s + (r >> 1);
            const uint32_t v = (w[nt][h][byte / 4] >> (8 * (byte % 4))) & 0xFF;
            a[r] = onelayer::pack_rounded<T>(table[v >> 4] * scale[nt][h], table[v & 15] * scale[nt][h]);
          }
        }
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) mma_16816<T>(acc[nt][mb], a, b[mb].x, b[mb].y);
      }
    }
  }

#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int c = 0; c < 4; ++c) partial[warp][(nt * MB + mb) * 4 + c][lane] = acc[nt][mb][c];
  __syncthreads();
  // Accumulator c of lane (g, t): output column n = tile + g + 8 (c / 2), row m = 8 mb + 2t + c % 2.
  for (int i = threadIdx.x; i < NT * MB * 4 * 32; i += WARPS * 32) {
    const int slot = i / 32, l = i % 32, c = slot % 4, mb = (slot / 4) % MB, nt = slot / (4 * MB);
    const int n = n0 + 16 * nt + (l >> 2) + 8 * (c / 2), m = 8 * mb + 2 * (l & 3) + (c & 1);
    if (n >= N || m >= M) continue;
    float v = 0.f;
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) v += partial[wi][slot][l];
    if (bias != nullptr) v += Io<T>::load(bias[n]);
    out[static_cast<int64_t>(m) * N + n] = Io<T>::store(v);
  }
}

template <typename T, int NT, int MB, int WARPS, bool REGISTERS>
cudaError_t launch_mma_tile(const Launch& a) {
  const dim3 grid((a.N + 16 * NT - 1) / (16 * NT));
  nf4_mma_kernel<T, NT, MB, WARPS, REGISTERS><<<grid, WARPS * 32, 0, a.stream>>>(
      static_cast<const T*>(a.x), a.stride_xm, a.packed, a.sc, a.code, static_cast<const T*>(a.bias),
      static_cast<T*>(a.out), a.M, a.N, a.K, a.blocksize);
  return cudaGetLastError();
}

template <typename T, int MB, bool REGISTERS>
cudaError_t launch_mma_rows(const Launch& a) {
  // Up to 16 rows, two tiles a warp halve the reads of x per weight byte, and narrow weights
  // (the k / v projections) take one tile and more warps splitting K, so that ~1,000 warps
  // stream the weight; more rows: one tile and 8 warps (the block's sums fit shared memory).
  // Tables in registers: one tile a warp (two spill at 16 rows on sm_90).
  if constexpr (REGISTERS) {
    static_assert(MB <= 2, "tables in registers up to 16 rows");
    return launch_mma_tile<T, 1, MB, 16, true>(a);
  } else if constexpr (MB <= 2) {
    if (a.N >= 4096) return launch_mma_tile<T, 2, MB, 8, false>(a);
    return launch_mma_tile<T, 1, MB, 16, false>(a);
  } else {
    return launch_mma_tile<T, 1, MB, 8, false>(a);
  }
}

// From 17 rows the tables in registers cost more instructions than they save (more rows a
// weight byte amortise its lookup), and at 33-64 they spill: those rows take the shared table.
template <typename T, bool REGISTERS>
cudaError_t launch_mma(const Launch& a) {
  if (a.M <= 8) return launch_mma_rows<T, 1, REGISTERS>(a);
  if (a.M <= 16) return launch_mma_rows<T, 2, REGISTERS>(a);
  if (a.M <= 32) return launch_mma_rows<T, 4, false>(a);
  return launch_mma_rows<T, 8, false>(a);
}

// The tensor-core kernel's C entry points, with or without REGISTERS.
template <bool REGISTERS>
cudaError_t mma_entry(int dtype, const Launch& a) {
  if (a.M < 1 || a.M > 64) return cudaErrorInvalidValue;
  switch (dtype) {
    case 1: return launch_mma<__half, REGISTERS>(a);
    case 2: return launch_mma<__nv_bfloat16, REGISTERS>(a);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// dtype: 0 fp32, 1 fp16, 2 bf16. Pointers are device pointers; x rows and `packed` must be
// 16-byte aligned, K % 32 == 0, K % blocksize == 0, blocksize a power of two >= 32 (the
// binding checks). absmax2 == nullptr selects plain fp32 absmax. bias may be nullptr. out is
// [M, N] contiguous.
extern "C" cudaError_t onelayer_nf4_matmul(int dtype, const void* x, int64_t stride_xm, const uint8_t* packed,
                                           const void* absmax, const float* absmax2, const float* code2,
                                           const float* offset, const float* code, const void* bias, void* out,
                                           int M, int N, int K, int blocksize, cudaStream_t stream) {
  const Launch a{x, stride_xm, packed, {absmax, absmax2, code2, offset}, code, bias, out, M, N, K, blocksize, stream};
  switch (dtype) {
    case 0: return launch<float>(a);
    case 1: return launch<__half>(a);
    case 2: return launch<__nv_bfloat16>(a);
    default: return cudaErrorInvalidValue;
  }
}

// The tensor-core kernel above: dtype 1 (fp16) or 2 (bf16), 1 <= M <= 64, a device of compute
// capability 8.0 or more (the binding checks); other arguments as onelayer_nf4_matmul.
extern "C" cudaError_t onelayer_nf4_matmul_mma(int dtype, const void* x, int64_t stride_xm, const uint8_t* packed,
                                               const void* absmax, const float* absmax2, const float* code2,
                                               const float* offset, const float* code, const void* bias, void* out,
                                               int M, int N, int K, int blocksize, cudaStream_t stream) {
  return mma_entry<false>(dtype, {x, stride_xm, packed, {absmax, absmax2, code2, offset}, code, bias, out, M, N, K,
                                  blocksize, stream});
}

// The same with each row's weights looked up from a table in registers (REGISTERS).
extern "C" cudaError_t onelayer_nf4_matmul_mma_registers(
    int dtype, const void* x, int64_t stride_xm, const uint8_t* packed, const void* absmax, const float* absmax2,
    const float* code2, const float* offset, const float* code, const void* bias, void* out, int M, int N, int K,
    int blocksize, cudaStream_t stream) {
  return mma_entry<true>(dtype, {x, stride_xm, packed, {absmax, absmax2, code2, offset}, code, bias, out, M, N, K,
                                 blocksize, stream});
}
