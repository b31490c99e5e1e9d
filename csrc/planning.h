// Token-budget micro-batch planning and balanced k-way partitioning (no Python, no torch).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastppo {

using Groups = std::vector<std::vector<int64_t>>;  // lists of indices into the input lengths

// Split sequences into as few micro-batches of at most `max_tokens` tokens as first-fit-
// decreasing finds, balanced in tokens where the same count allows it; with k > 1 the number
// of micro-batches is a multiple of k (some may then be empty). Indices ascend in each group.
// Returns an error message (empty on success).
std::string plan_microbatches(const std::vector<int64_t>& lengths, int64_t max_tokens, int64_t k,
                              Groups& out);

// Partition into k groups with balanced token sums: Karmarkar–Karp largest differencing, or the
// greedy (longest first, to the lightest group) assignment when that is better balanced. With
// equal_size every group gets len/k sequences (len must be a multiple of k).
std::string balanced_partition(const std::vector<int64_t>& lengths, int64_t k, bool equal_size,
                               Groups& out);

// max − min of the groups' token sums.
int64_t imbalance(const std::vector<int64_t>& lengths, const Groups& groups);

}  // namespace fastppo
