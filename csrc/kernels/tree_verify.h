// Verification of one draft tree against the target; semantics, vocabulary (accepted / recovered /
// bonus tokens) and noise conventions: specbeam/reference/tree_verify.py. Plain C++: no torch headers.
//
// One row: node 0 is the root, node i >= 1 has a parent < i, nodes >= num_nodes are padding. Both verifiers
// write path [width] (root first, -1 padded) and return (num_accepted, next_token).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "inverse_cdf.h"

namespace specbeam {

// A node's parent, clamped into [0, node - 1] (padding may hold anything).
inline int64_t parent_of(const int64_t* parents, int64_t node) {
  return std::max<int64_t>(0, std::min(parents[node], node - 1));
}

// path[0..depth] = the nodes from the root down to `last`; -1 after.
inline void write_path(const int64_t* parents, int64_t width, int64_t last, int64_t depth, int64_t* path) {
  std::fill(path, path + width, -1);
  for (int64_t level = depth, node = last; level >= 0; --level, node = parent_of(parents, node)) path[level] = node;
}

// The deepest path whose every drafted token is the target's argmax at its parent (equally deep: the lowest
// last node); the bonus token is the target's argmax at the last accepted node.
inline std::pair<int64_t, int64_t> greedy_verify_row(
    const int64_t* parents,        // [width]
    int64_t num_nodes,
    const int64_t* draft_tokens,   // [width]
    const int64_t* target_tokens,  // [width] the target's argmax after each node
    int64_t width,
    std::vector<int64_t>& depth,   // [width] scratch: -1 off the accepted paths
    int64_t* path) {               // [width] out
  depth.assign(width, -1);
  depth[0] = 0;
  int64_t last = 0;
  for (int64_t node = 1; node < std::min(num_nodes, width); ++node) {
    const int64_t parent = parent_of(parents, node);
    if (depth[parent] >= 0 && draft_tokens[node] == target_tokens[parent]) depth[node] = depth[parent] + 1;
    if (depth[node] > depth[last]) last = node;
  }
  write_path(parents, width, last, depth[last], path);
  return {depth[last], target_tokens[last]};
}

// p <- normalize(max(p - q, 0)) in place; p stays where that is all zero (p <= q everywhere).
template <typename T>
void residual(T* p,        // [vocab]
              const T* q,  // [vocab]
              int64_t vocab) {
  double mass = 0;
  for (int64_t i = 0; i < vocab; ++i) mass += static_cast<double>(std::max(p[i] - q[i], T(0)));
  if (mass <= 0) return;
  const T total = static_cast<T>(mass);
  for (int64_t i = 0; i < vocab; ++i) p[i] = std::max(p[i] - q[i], T(0)) / total;
}

// Tree speculative sampling (SpecInfer). At the current node, with target p and draft q, its children are
// tried in index order: child c with token x is accepted iff uniform[c] * q(x) < p(x) (probability
// min(1, p(x) / q(x))) and the walk moves to c; a rejection sets p <- normalize(max(p - q, 0)) for the next
// child. Where the walk stops, the next token is drawn from p by inverse CDF on `noise`.
template <typename T>
std::pair<int64_t, int64_t> stochastic_verify_row(
    const int64_t* parents,       // [width]
    int64_t num_nodes,
    const int64_t* draft_tokens,  // [width] in [0, vocab) for nodes < num_nodes
    const T* target_probs,        // [width, vocab] p after each node
    const T* draft_probs,         // [width, vocab] q each node's children were drawn from
    const T* uniform,             // [width] entry c decides on node c
    double noise,
    int64_t width, int64_t vocab,
    std::vector<T>& residual_p,   // [vocab] scratch: p after a rejection
    int64_t* path) {              // [width] out
  int64_t current = 0, depth = 0;
  const T* p = target_probs;
  const T* q = draft_probs;
  for (int64_t node = 1; node < std::min(num_nodes, width); ++node) {
    if (parents[node] != current) continue;
    const int64_t x = draft_tokens[node];
    if (uniform[node] * q[x] < p[x]) {  // accepted: move down, p and q are the target's and draft's there
      current = node, ++depth;
      p = target_probs + node * vocab, q = draft_probs + node * vocab;
      continue;
    }
    if (p != residual_p.data()) residual_p.assign(p, p + vocab);  // rejected: p becomes the residual
    residual(residual_p.data(), q, vocab);
    p = residual_p.data();
  }
  write_path(parents, width, current, depth, path);
  return {depth, inverse_cdf(p, vocab, noise)};
}

}  // namespace specbeam
