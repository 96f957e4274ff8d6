// NF4 weights looked up from a table in registers, for the tensor-core kernel's REGISTERS
// variant (csrc/nf4_matmul.cu). Host code too: tests/test_nf4_matmul.py compiles these
// functions for the CPU, with prmt emulated, and checks every byte against the reference.
//
// The shared-memory lookup costs, a weight, a load from the 16-entry table, its address, a
// multiply by the row's scale and half a conversion. Here the 16 weights a row can take in a
// chunk, round(code[i] * scale) in x's dtype, are made once a row and chunk (16 multiplies, 8
// conversions, 8 permutes) and held as byte planes in 8 registers; a weight is then picked by
// prmt byte permutes, with no memory access: ~23 integer instructions for 8 weights.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#ifdef __CUDACC__
#define ONELAYER_HD __host__ __device__ __forceinline__
#else
#define ONELAYER_HD inline
#endif

namespace onelayer {

// PTX prmt.b32 d, a, b, c (default mode): byte i of d is byte (nibble i of c) & 7 of the 8
// bytes {b, a} (a's bytes 0-3, b's 4-7); bit 3 of the nibble replaces the byte by its sign bit,
// replicated. __byte_perm ignores bit 3, hence the asm.
ONELAYER_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t c) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  const uint64_t source = static_cast<uint64_t>(b) << 32 | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t select = (c >> 4 * i) & 0xF;
    uint32_t byte = (source >> 8 * (select & 7)) & 0xFF;
    if (select & 8) byte = (byte & 0x80) ? 0xFF : 0;
    d |= byte << 8 * i;
  }
  return d;
#endif
}

// Two fp32 rounded to nearest even in T (bf16 or fp16), lo in the low half.
template <typename T>
ONELAYER_HD uint32_t pack_rounded(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// The 16 NF4 values (bitsandbytes' get_4bit_type("nf4"), as fp32), as immediates: every
// quant_state of type nf4 holds this code, and a table made from them needs no registers
// for the code (tests/test_nf4_matmul.py checks them against bitsandbytes').
ONELAYER_HD constexpr float nf4_code(int i) {
  constexpr float code[16] = {-0x1p+0f,          -0x1.647362p-1f,  -0x1.0cd66p-1f,  -0x1.946540p-2f,
                              -0x1.23449ap-2f,   -0x1.7a6a7ep-3f,  -0x1.74f0e2p-4f, 0.0f,
                              0x1.45f5fep-4f,    0x1.4995c6p-3f,   0x1.f809bap-3f,  0x1.5a0674p-2f,
                              0x1.c3497p-2f,     0x1.200f56p-1f,   0x1.722766p-1f,  0x1p+0f};
  return code[i];
}

// A row's 16 possible weights as byte planes: byte i of lo[j] / hi[j] is the low / high byte
// of entry 4 j + i.
struct Table {
  uint32_t lo[4], hi[4];
};

// The row's table: entry i is code[i] * scale in fp32, rounded to T, as the shared-memory
// lookup and the torch reference make it.
template <typename T>
ONELAYER_HD Table make_table(float scale) {
  uint32_t pairs[8];  // entries 2 i (low half) and 2 i + 1
#pragma unroll
  for (int i = 0; i < 8; ++i) pairs[i] = pack_rounded<T>(nf4_code(2 * i) * scale, nf4_code(2 * i + 1) * scale);
  Table t;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    t.lo[j] = prmt(pairs[2 * j], pairs[2 * j + 1], 0x6420);
    t.hi[j] = prmt(pairs[2 * j], pairs[2 * j + 1], 0x7531);
  }
  return t;
}

// The weights of bytes 2 half and 2 half + 1 of the packed word q, as two registers in the
// order mma.sync's A operand reads them: .x for byte 2 half, .y for byte 2 half + 1, each the
// high nibble's weight (the even k) in the low half and the low nibble's in the high half.
ONELAYER_HD uint2 lookup_pairs(const Table& t, uint32_t q, int half) {
  const uint32_t nibbles = half ? q >> 16 : q;  // selectors 0-3: low, high nibble of each byte
  const uint32_t entry = nibbles & 0x7777;      // entry within its half of the table
  const uint32_t lo_a = prmt(t.lo[0], t.lo[1], entry), lo_b = prmt(t.lo[2], t.lo[3], entry);
  const uint32_t hi_a = prmt(t.hi[0], t.hi[1], entry), hi_b = prmt(t.hi[2], t.hi[3], entry);
  // Byte i 0xFF where nibble i is 8 or more: a high nibble's bit 3 is its byte's sign bit in
  // q, a low nibble's in q << 4 (sign mode of prmt, bytes 4-7).
  const uint32_t upper = prmt(q, q << 4, half ? 0xBFAE : 0x9D8C);
  const uint32_t lo = lo_a ^ ((lo_a ^ lo_b) & upper), hi = hi_a ^ ((hi_a ^ hi_b) & upper);
  return make_uint2(prmt(lo, hi, 0x4051), prmt(lo, hi, 0x6273));
}

}  // namespace onelayer

#undef ONELAYER_HD
