#include "planning.h"

#include <algorithm>
#include <numeric>
#include <queue>
#include <utility>

namespace fastppo {

namespace {

// Indices sorted by length, longest first; ties keep input order (deterministic).
std::vector<int64_t> longest_first(const std::vector<int64_t>& lengths) {
  std::vector<int64_t> order(lengths.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  return order;
}

// Max segment tree over bin capacities: finds the first bin with room for a length in O(log n).
class FirstFit {
 public:
  FirstFit(size_t bins, int64_t capacity) : size_(1) {
    while (size_ < bins) size_ *= 2;
    tree_.assign(2 * size_, -1);
    for (size_t i = 0; i < bins; ++i) tree_[size_ + i] = capacity;
    for (size_t i = size_ - 1; i >= 1; --i) tree_[i] = std::max(tree_[2 * i], tree_[2 * i + 1]);
  }
  // The first bin whose room is >= need (the caller guarantees one exists).
  size_t find(int64_t need) const {
    size_t i = 1;
    while (i < size_) i = tree_[2 * i] >= need ? 2 * i : 2 * i + 1;
    return i - size_;
  }
  void take(size_t bin, int64_t amount) {
    size_t i = size_ + bin;
    tree_[i] -= amount;
    for (i /= 2; i >= 1; i /= 2) tree_[i] = std::max(tree_[2 * i], tree_[2 * i + 1]);
  }

 private:
  size_t size_;
  std::vector<int64_t> tree_;
};

Groups first_fit_decreasing(const std::vector<int64_t>& lengths, const std::vector<int64_t>& order,
                            int64_t max_tokens) {
  FirstFit bins(lengths.size(), max_tokens);
  Groups groups;
  for (int64_t i : order) {
    size_t bin = bins.find(lengths[i]);
    bins.take(bin, lengths[i]);
    if (bin >= groups.size()) groups.resize(bin + 1);
    groups[bin].push_back(i);
  }
  return groups;
}

// Longest first, each to the lightest group (that still has room for `per_group` sequences when
// per_group > 0). Returns false when some sequence does not fit under max_tokens (if > 0).
bool greedy(const std::vector<int64_t>& lengths, const std::vector<int64_t>& order, size_t n_groups,
            int64_t max_tokens, size_t per_group, Groups& out) {
  using Entry = std::pair<int64_t, size_t>;  // (load, group): lightest first, then lowest index
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (size_t g = 0; g < n_groups; ++g) heap.emplace(0, g);
  out.assign(n_groups, {});
  for (int64_t i : order) {
    auto [load, g] = heap.top();
    heap.pop();
    if (max_tokens > 0 && load + lengths[i] > max_tokens) return false;
    out[g].push_back(i);
    if (per_group == 0 || out[g].size() < per_group) heap.emplace(load + lengths[i], g);
  }
  return true;
}

void sort_groups(Groups& groups) {
  for (auto& g : groups) std::sort(g.begin(), g.end());
}

std::string check_lengths(const std::vector<int64_t>& lengths) {
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] < 0 || lengths[i] > INT32_MAX) {
      return "seqlens must lie in [0, 2^31 - 1], found " + std::to_string(lengths[i]) +
             " at index " + std::to_string(i);
    }
  }
  return {};
}

// One Karmarkar–Karp state: k groups, kept sorted by sum (largest first).
struct State {
  std::vector<int64_t> sums;
  std::vector<std::vector<int64_t>> items;
  int64_t spread() const { return sums.front() - sums.back(); }
  void sort_desc() {
    std::vector<size_t> idx(sums.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return sums[a] > sums[b]; });
    std::vector<int64_t> s;
    std::vector<std::vector<int64_t>> it;
    for (size_t j : idx) {
      s.push_back(sums[j]);
      it.push_back(std::move(items[j]));
    }
    sums = std::move(s);
    items = std::move(it);
  }
};

Groups karmarkar_karp(const std::vector<int64_t>& lengths, const std::vector<int64_t>& order, size_t k,
                      bool equal_size) {
  std::vector<State> states;
  auto add_state = [&](const std::vector<int64_t>& members) {
    State s{std::vector<int64_t>(k, 0), std::vector<std::vector<int64_t>>(k)};
    for (size_t j = 0; j < members.size(); ++j) {
      s.sums[j] = lengths[members[j]];
      s.items[j].push_back(members[j]);
    }
    s.sort_desc();
    states.push_back(std::move(s));
  };
  if (equal_size) {  // k consecutive sequences (by length) spread over the k groups
    for (size_t i = 0; i < order.size(); i += k) add_state({order.begin() + i, order.begin() + i + k});
  } else {
    for (int64_t i : order) add_state({i});
  }
  // Largest spread first; ties by creation order, so the result is deterministic.
  using Entry = std::pair<int64_t, int64_t>;  // (spread, -state index)
  std::priority_queue<Entry> heap;
  for (size_t i = 0; i < states.size(); ++i) heap.emplace(states[i].spread(), -static_cast<int64_t>(i));
  while (heap.size() > 1) {
    State a = std::move(states[-heap.top().second]);
    heap.pop();
    State b = std::move(states[-heap.top().second]);
    heap.pop();
    // Heaviest of a with lightest of b: the difference shrinks.
    State merged{std::vector<int64_t>(k), std::vector<std::vector<int64_t>>(k)};
    for (size_t j = 0; j < k; ++j) {
      auto& big = a.items[j];
      auto& small = b.items[k - 1 - j];
      if (big.size() < small.size()) std::swap(big, small);
      big.insert(big.end(), small.begin(), small.end());
      merged.sums[j] = a.sums[j] + b.sums[k - 1 - j];
      merged.items[j] = std::move(big);
    }
    merged.sort_desc();
    states.push_back(std::move(merged));
    heap.emplace(states.back().spread(), -static_cast<int64_t>(states.size() - 1));
  }
  if (heap.empty()) return Groups(k);
  return std::move(states[-heap.top().second].items);
}

}  // namespace

int64_t imbalance(const std::vector<int64_t>& lengths, const Groups& groups) {
  if (groups.empty()) return 0;
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  for (const auto& g : groups) {
    int64_t sum = 0;
    for (int64_t i : g) sum += lengths[i];
    lo = std::min(lo, sum);
    hi = std::max(hi, sum);
  }
  return hi - lo;
}

std::string plan_microbatches(const std::vector<int64_t>& lengths, int64_t max_tokens, int64_t k,
                              Groups& out) {
  if (max_tokens <= 0) return "max_tokens must be > 0, got " + std::to_string(max_tokens);
  if (k <= 0) return "k must be > 0, got " + std::to_string(k);
  if (auto error = check_lengths(lengths); !error.empty()) return error;
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] > max_tokens) {
      return "seqlens[" + std::to_string(i) + "] = " + std::to_string(lengths[i]) +
             " does not fit in max_tokens = " + std::to_string(max_tokens);
    }
  }
  out.clear();
  if (lengths.empty()) return {};
  const auto order = longest_first(lengths);
  Groups ffd = first_fit_decreasing(lengths, order, max_tokens);
  const size_t count = (ffd.size() + k - 1) / k * k;
  // Same count (rounded up to a multiple of k), balanced: lightest-first if everything fits.
  if (!greedy(lengths, order, count, max_tokens, 0, out)) {
    out = std::move(ffd);
    out.resize(count);
  }
  sort_groups(out);
  return {};
}

std::string balanced_partition(const std::vector<int64_t>& lengths, int64_t k, bool equal_size,
                               Groups& out) {
  if (k <= 0) return "k must be > 0, got " + std::to_string(k);
  if (auto error = check_lengths(lengths); !error.empty()) return error;
  if (equal_size && lengths.size() % k != 0) {
    return "with equal_size, len(seqlens) = " + std::to_string(lengths.size()) +
           " must be a multiple of k = " + std::to_string(k);
  }
  const auto order = longest_first(lengths);
  const size_t groups = static_cast<size_t>(k);
  out = karmarkar_karp(lengths, order, groups, equal_size);
  Groups alternative;
  greedy(lengths, order, groups, 0, equal_size ? lengths.size() / groups : 0, alternative);
  if (imbalance(lengths, alternative) < imbalance(lengths, out)) out = std::move(alternative);
  sort_groups(out);
  return {};
}

}  // namespace fastppo
