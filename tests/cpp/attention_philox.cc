// Host replay of the CUDA attention kernels' dropout draw (philox_uniform in
// csrc/attention/attention_kernel.h) with the kernels' offset formula. Prints the keep mask as one
// '0'/'1' character per score, row-major [B, H, Lq, Lk], for the Python test to compare with the
// Triton kernels' mask (both backends must drop the same weights for one seed and offset).
// Usage: attention_philox B H Lq Lk p seed offset
#include <cstdio>
#include <cstdlib>

#include "attention/attention_kernel.h"

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s B H Lq Lk p seed offset\n", argv[0]);
    return 2;
  }
  const uint32_t B = std::strtoul(argv[1], nullptr, 10), H = std::strtoul(argv[2], nullptr, 10);
  const uint32_t Lq = std::strtoul(argv[3], nullptr, 10), Lk = std::strtoul(argv[4], nullptr, 10);
  const float p = std::strtof(argv[5], nullptr);
  const uint64_t seed = std::strtoull(argv[6], nullptr, 10);
  const uint32_t offset = std::strtoul(argv[7], nullptr, 10);
  for (uint32_t bh = 0; bh < B * H; ++bh) {
    for (uint32_t i = 0; i < Lq; ++i) {
      for (uint32_t j = 0; j < Lk; ++j) {
        const uint32_t off = offset + (bh * Lq + i) * Lk + j;  // the kernels' formula, mod 2^32
        std::putchar(r2d2::attention::philox_uniform(seed, off) >= p ? '1' : '0');
      }
    }
  }
  std::putchar('\n');
  return 0;
}
