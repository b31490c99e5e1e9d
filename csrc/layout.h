// Padded <-> packed layout arithmetic on plain buffers (no Python, no torch).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastppo {

// The packed (variable-length) layout of a (B, T) 0/1 mask: the flat positions of its ones,
// row by row.
struct UnpadLayout {
  std::vector<int64_t> indices;       // (N,) flat index b*T + t of each kept token
  std::vector<int32_t> cu_seqlens;    // (B+1,) leading 0, running token counts
  std::vector<int64_t> position_ids;  // (N,) 0, 1, ... restarting at each row
  std::vector<int32_t> seqlens;       // (B,) tokens kept per row
  int64_t max_seqlen = 0;
};

// Fills `out` from a row-major (rows, cols) mask. Returns an empty string on success, otherwise
// a message naming the first bad value (the caller raises it as a ValueError).
std::string unpad_layout(const int64_t* mask, int64_t rows, int64_t cols, UnpadLayout& out);

}  // namespace fastppo
