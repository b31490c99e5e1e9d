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

// Pass 1 of unpad over a row-major (rows, cols) 0/1 mask of element type T (uint8_t, int32_t or
// int64_t): tokens kept per row into `seqlens`, their total and the longest row. Returns an
// empty string on success, otherwise a message naming the first bad value.
template <typename T>
std::string count_rows(const T* mask, int64_t rows, int64_t cols, int32_t* seqlens, int64_t& total,
                       int64_t& max_seqlen);

// Pass 2: the flat index and position of every kept token, and cu_seqlens (rows + 1), written
// straight into the caller's buffers (sized from pass 1).
template <typename T>
void fill_layout(const T* mask, int64_t rows, int64_t cols, const int32_t* seqlens, int64_t* indices,
                 int64_t* position_ids, int32_t* cu_seqlens);

// A read-only run of token ids.
struct TokenSpan {
  const int64_t* data;
  int64_t size;
};

// Row length of a collated batch: the longest sequence (or `max_length` when > 0), rounded up
// to a multiple of `multiple` when > 0. Returns -1 and sets `error` when a sequence is longer
// than max_length.
int64_t collated_length(const std::vector<TokenSpan>& seqs, int64_t max_length, int64_t multiple,
                        std::string& error);

// Writes the (rows, cols) row-major `input_ids` and `attention_mask` of `seqs`, padded with
// `pad_id` on the right (or on the left), and, when `layout` is not null, their packed layout.
void collate(const std::vector<TokenSpan>& seqs, int64_t cols, int64_t pad_id, bool left,
             int64_t* input_ids, int64_t* attention_mask, UnpadLayout* layout);

}  // namespace fastppo
