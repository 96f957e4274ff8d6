// csrc/nf4_lookup.cuh on the CPU, with prmt emulated, for tests/test_nf4_matmul.py. stdin: the
// dtype (1 fp16, 2 bf16), then scales as fp32 bits. stdout: the bits of the 16 nf4_code
// values; then, for each scale and each word w = 0..255 of the bytes (w, w + 1, w + 2, w + 3)
// mod 256, the 4 registers lookup_pairs makes of it (halves 0 and 1), as the tensor-core
// kernel's A operand reads them.
#include <cstdio>
#include <cstring>

#include "nf4_lookup.cuh"

template <typename T>
void print_lookups(float scale) {
  const onelayer::Table table = onelayer::make_table<T>(scale);
  for (uint32_t w = 0; w < 256; ++w) {
    uint32_t q = 0;
    for (uint32_t j = 0; j < 4; ++j) q |= ((w + j) & 0xFF) << 8 * j;
    const uint2 low = onelayer::lookup_pairs(table, q, 0), high = onelayer::lookup_pairs(table, q, 1);
    std::printf("%u %u %u %u\n", low.x, low.y, high.x, high.y);
  }
}

int main() {
  unsigned dtype, bits;
  if (std::scanf("%u", &dtype) != 1 || (dtype != 1 && dtype != 2)) return 2;
  for (int i = 0; i < 16; ++i) {
    const float value = onelayer::nf4_code(i);
    std::memcpy(&bits, &value, sizeof bits);
    std::printf("%u\n", bits);
  }
  while (std::scanf("%u", &bits) == 1) {
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    if (dtype == 1) {
      print_lookups<__half>(scale);
    } else {
      print_lookups<__nv_bfloat16>(scale);
    }
  }
  return 0;
}
