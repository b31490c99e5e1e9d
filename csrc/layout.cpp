#include "layout.h"

#include <algorithm>
#include <limits>

namespace fastppo {

std::string unpad_layout(const int64_t* mask, int64_t rows, int64_t cols, UnpadLayout& out) {
  // First pass: validate and count, so the outputs are allocated once.
  int64_t total = 0;
  out.seqlens.assign(static_cast<size_t>(rows), 0);
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t* row = mask + b * cols;
    int64_t n = 0;
    for (int64_t t = 0; t < cols; ++t) {
      const int64_t v = row[t];
      if (v != 0 && v != 1) {
        return "mask must hold only 0 and 1, found " + std::to_string(v) + " at (" +
               std::to_string(b) + ", " + std::to_string(t) + ")";
      }
      n += v;
    }
    out.seqlens[b] = static_cast<int32_t>(n);
    out.max_seqlen = std::max(out.max_seqlen, n);
    total += n;
  }
  if (total > std::numeric_limits<int32_t>::max()) {
    return "mask keeps " + std::to_string(total) + " tokens; cu_seqlens is int32 (at most 2^31 - 1)";
  }

  out.indices.resize(static_cast<size_t>(total));
  out.position_ids.resize(static_cast<size_t>(total));
  out.cu_seqlens.assign(static_cast<size_t>(rows) + 1, 0);
  int64_t k = 0;
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t* row = mask + b * cols;
    int64_t pos = 0;
    for (int64_t t = 0; t < cols; ++t) {
      if (row[t]) {
        out.indices[k] = b * cols + t;
        out.position_ids[k] = pos++;
        ++k;
      }
    }
    out.cu_seqlens[b + 1] = static_cast<int32_t>(k);
  }
  return {};
}

}  // namespace fastppo
