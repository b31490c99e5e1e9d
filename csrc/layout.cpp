#include "layout.h"

#include <algorithm>
#include <limits>

namespace fastppo {

template <typename T>
std::string count_rows(const T* mask, int64_t rows, int64_t cols, int32_t* seqlens, int64_t& total,
                       int64_t& max_seqlen) {
  total = 0;
  max_seqlen = 0;
  for (int64_t b = 0; b < rows; ++b) {
    const T* row = mask + b * cols;
    int64_t n = 0;
    bool bad = false;  // n is only trusted when no value is outside {0, 1}
    for (int64_t t = 0; t < cols; ++t) {  // a sum and an unsigned compare: vectorised
      n += row[t];
      bad |= static_cast<uint64_t>(row[t]) > 1;  // negative values wrap to huge
    }
    if (bad) {
      for (int64_t t = 0; t < cols; ++t) {
        if (row[t] != 0 && row[t] != 1) {
          return "mask must hold only 0 and 1, found " + std::to_string(static_cast<int64_t>(row[t])) +
                 " at (" + std::to_string(b) + ", " + std::to_string(t) + ")";
        }
      }
    }
    seqlens[b] = static_cast<int32_t>(n);
    max_seqlen = std::max(max_seqlen, n);
    total += n;
  }
  if (total > std::numeric_limits<int32_t>::max()) {
    return "mask keeps " + std::to_string(total) + " tokens; cu_seqlens is int32 (at most 2^31 - 1)";
  }
  return {};
}

template <typename T>
void fill_layout(const T* mask, int64_t rows, int64_t cols, const int32_t* seqlens, int64_t* indices,
                 int64_t* position_ids, int32_t* cu_seqlens) {
  int64_t k = 0;
  cu_seqlens[0] = 0;
  for (int64_t b = 0; b < rows; ++b) {
    const T* row = mask + b * cols;
    const int64_t row_start = k, row_end = k + seqlens[b], base = b * cols;
    // Run by run: a padded row is one run, and filling a run is a vectorised iota.
    int64_t t = 0;
    while (k < row_end) {
      while (row[t] == 0) ++t;  // a kept token lies ahead: k < row_end
      const int64_t run = t;
      while (t < cols && row[t] != 0) ++t;
      const int64_t offset = base + run, position = k - row_start - run;
      for (int64_t i = run; i < t; ++i) {
        indices[k + i - run] = offset + (i - run);
        position_ids[k + i - run] = position + i;
      }
      k += t - run;
    }
    cu_seqlens[b + 1] = static_cast<int32_t>(k);
  }
}

template std::string count_rows<uint8_t>(const uint8_t*, int64_t, int64_t, int32_t*, int64_t&, int64_t&);
template std::string count_rows<int32_t>(const int32_t*, int64_t, int64_t, int32_t*, int64_t&, int64_t&);
template std::string count_rows<int64_t>(const int64_t*, int64_t, int64_t, int32_t*, int64_t&, int64_t&);
template void fill_layout<uint8_t>(const uint8_t*, int64_t, int64_t, const int32_t*, int64_t*, int64_t*, int32_t*);
template void fill_layout<int32_t>(const int32_t*, int64_t, int64_t, const int32_t*, int64_t*, int64_t*, int32_t*);
template void fill_layout<int64_t>(const int64_t*, int64_t, int64_t, const int32_t*, int64_t*, int64_t*, int32_t*);

int64_t collated_length(const std::vector<TokenSpan>& seqs, int64_t max_length, int64_t multiple,
                        std::string& error) {
  int64_t longest = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    if (max_length > 0 && seqs[b].size > max_length) {
      error = "sequences[" + std::to_string(b) + "] has " + std::to_string(seqs[b].size) +
              " tokens, more than max_length = " + std::to_string(max_length);
      return -1;
    }
    longest = std::max(longest, seqs[b].size);
  }
  int64_t cols = max_length > 0 ? max_length : longest;
  if (multiple > 0) cols = (cols + multiple - 1) / multiple * multiple;
  return cols;
}

void collate(const std::vector<TokenSpan>& seqs, int64_t cols, int64_t pad_id, bool left,
             int64_t* input_ids, int64_t* attention_mask, UnpadLayout* layout) {
  const int64_t rows = static_cast<int64_t>(seqs.size());
  int64_t total = 0;
  for (const auto& s : seqs) total += s.size;
  if (layout) {
    layout->indices.resize(static_cast<size_t>(total));
    layout->position_ids.resize(static_cast<size_t>(total));
    layout->cu_seqlens.assign(static_cast<size_t>(rows) + 1, 0);
    layout->seqlens.resize(static_cast<size_t>(rows));
    layout->max_seqlen = 0;
  }
  int64_t k = 0;
  for (int64_t b = 0; b < rows; ++b) {
    const TokenSpan& s = seqs[b];
    int64_t* ids = input_ids + b * cols;
    int64_t* mask = attention_mask + b * cols;
    const int64_t first = left ? cols - s.size : 0;  // where the tokens start in the row
    std::fill(ids, ids + cols, pad_id);
    std::fill(mask, mask + cols, 0);
    std::copy(s.data, s.data + s.size, ids + first);
    std::fill(mask + first, mask + first + s.size, 1);
    if (layout) {
      for (int64_t t = 0; t < s.size; ++t, ++k) {
        layout->indices[k] = b * cols + first + t;
        layout->position_ids[k] = t;
      }
      layout->cu_seqlens[b + 1] = static_cast<int32_t>(k);
      layout->seqlens[b] = static_cast<int32_t>(s.size);
      layout->max_seqlen = std::max(layout->max_seqlen, s.size);
    }
  }
}

}  // namespace fastppo
