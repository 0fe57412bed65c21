// Host replay of the CUDA attention kernels' causal loop structure (csrc/attention/
// attention_kernel.cu: fwd_kernel / dq_kernel stream key tiles up to causal_key_end and test keys
// per element only on tiles past causal_key_full; dkdv_kernel streams query tiles from
// causal_first_query(n0) rounded down to a tile and tests per element only before
// causal_first_query(last key)), with the kernels' own bound helpers from attention_kernel.h.
// Prints, for the Python test to check against the reference causal mask:
//   line 1: the (query, key) pairs the forward / dQ loops let through, '0'/'1' row-major [Lq, Lk]
//   line 2: the same for the dK/dV loops
//   line 3: tiles visited by forward/dQ, tiles visited by dK/dV, and how many of those visits
//           had no visible pair at all (tiles wholly above the diagonal: must be 0)
// Usage: attention_causal_bounds Lq Lk rows_per_block tile
#include <cstdio>
#include <cstdlib>
#include <string>

#include "attention/attention_kernel.h"

using namespace r2d2::attention;

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s Lq Lk rows_per_block tile\n", argv[0]);
    return 2;
  }
  const int Lq = std::atoi(argv[1]), Lk = std::atoi(argv[2]);
  const int R = std::atoi(argv[3]), T = std::atoi(argv[4]);
  std::string fwd(static_cast<size_t>(Lq) * Lk, '0'), kv(fwd);
  long visits_fwd = 0, visits_kv = 0, wasted = 0;
  for (int m0 = 0; m0 < Lq; m0 += R) {  // fwd_kernel / dq_kernel: one block per R queries
    const int n_end = causal_key_end(m0, R, Lq, Lk), n_full = causal_key_full(m0, Lq, Lk);
    for (int n0 = 0; n0 < n_end; n0 += T) {
      ++visits_fwd;
      const bool diag = n0 + T > n_full;
      bool any = false;
      for (int r = 0; r < R && m0 + r < Lq; ++r) {
        for (int j = 0; j < T && n0 + j < Lk; ++j) {
          if (!diag || causal_sees(m0 + r, n0 + j, Lq, Lk)) {
            fwd[static_cast<size_t>(m0 + r) * Lk + n0 + j] = '1';
            any = true;
          }
        }
      }
      wasted += !any;
    }
  }
  for (int n0 = 0; n0 < Lk; n0 += R) {  // dkdv_kernel: one block per R keys
    const int n_last = (n0 + R < Lk ? n0 + R : Lk) - 1;
    const int m_begin = causal_first_query(n0, Lq, Lk) / T * T;
    const int m_full = causal_first_query(n_last, Lq, Lk);
    for (int m0 = m_begin; m0 < Lq; m0 += T) {
      ++visits_kv;
      const bool diag = m0 < m_full;
      bool any = false;
      for (int r = 0; r < R && n0 + r < Lk; ++r) {
        for (int j = 0; j < T && m0 + j < Lq; ++j) {
          if (!diag || causal_sees(m0 + j, n0 + r, Lq, Lk)) {
            kv[static_cast<size_t>(m0 + j) * Lk + n0 + r] = '1';
            any = true;
          }
        }
      }
      wasted += !any;
    }
  }
  std::printf("%s\n%s\n%ld %ld %ld\n", fwd.c_str(), kv.c_str(), visits_fwd, visits_kv, wasted);
  return 0;
}
