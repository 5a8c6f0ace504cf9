// transformers' temperature, top-k, top-p and min-p warpers on one row, without a sort.
// Semantics and ties: specbeam/reference/sampling.py. Plain C++: no torch headers.
//
// Top-k and top-p share one rule: token x is kept iff the measure of the tokens with a strictly larger
// score is < a budget, where the measure counts tokens (top-k: budget k) or sums their probability
// mass (top-p: budget top_p * kept mass). The kept set is then {x : score(x) >= the lowest kept score},
// whole tie groups included, found by a three-way quickselect in expected linear time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "fast_exp.h"
#include "inverse_cdf.h"

namespace specbeam {

template <typename T>
struct SamplingParams {
  T temperature;  // 0: greedy (the first argmax)
  int64_t top_k;  // 0 or >= vocab: off
  T top_p;        // 1: off
  T min_p;        // 0: off
};

template <typename T>
struct Scored {
  T score;
  T weight;  // what the selection measures: 1 (top-k) or exp(score - max) (top-p)
};

// Per-thread buffers, reused across rows.
template <typename T>
struct SamplingWorkspace {
  std::vector<T> scores;              // [vocab] scaled logits
  std::vector<T> weights;             // [vocab] kept weights (sample_row)
  std::vector<Scored<T>> candidates;  // [<= vocab]
  std::vector<T> largest;             // [top_k] a min-heap (kth_largest)
};

// Top-k at most this: the k-th largest score by a heap of k (one comparison for most scores), not a quickselect.
constexpr int64_t kHeapTopK = 256;

// Three-way partition of [first, last) by score around pivot: > pivot | == pivot | < pivot.
// Returns the two boundaries and adds the weights of the first two parts to greater and equal.
template <typename T>
std::pair<Scored<T>*, Scored<T>*> partition3(Scored<T>* first, Scored<T>* last, T pivot, double& greater,
                                              double& equal) {
  Scored<T>* lt = first;  // [first, lt): greater
  Scored<T>* gt = last;   // [gt, last): less
  for (Scored<T>* it = first; it < gt;) {
    if (it->score > pivot) {
      greater += it->weight;
      std::swap(*it++, *lt++);
    } else if (it->score == pivot) {
      equal += it->weight;
      ++it;
    } else {
      std::swap(*it, *--gt);
    }
  }
  return {lt, gt};
}

// The lowest score s among [first, last) with measure(score > s) < budget, measures summed in double;
// `top` (the highest score) when no score qualifies (budget <= 0), so that the top tie group always stays.
template <typename T>
T lowest_kept(Scored<T>* first, Scored<T>* last, double budget, T top) {
  double above = 0;  // measure of what ranks above [first, last)
  T answer = top;
  while (first < last) {
    const T a = first->score, b = first[(last - first) / 2].score, c = last[-1].score;
    const T pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    double greater = 0, equal = 0;
    auto [mid_lo, mid_hi] = partition3(first, last, pivot, greater, equal);
    if (mid_lo == mid_hi) break;  // a NaN pivot: no order to select by
    if (above + greater >= budget) {  // the pivot's group is cut: the lowest kept score is above it
      last = mid_lo;
    } else {  // the pivot's group is kept: look below it
      answer = pivot;
      above += greater + equal;
      first = mid_hi;
    }
  }
  return answer;
}

// The k-th largest score, counting ties (0 < k < vocab; no NaN in the row): the lowest score with fewer than k
// scores above it, which is what lowest_kept finds for a budget of k tokens. A min-heap holds the k largest so
// far; a score that does not beat its least passes with one comparison. -inf where fewer than k beat -inf (then
// top-k keeps every token, as lowest_kept's lowest score does).
template <typename T>
T kth_largest(const T* scores, int64_t vocab, int64_t k, std::vector<T>& heap) {
  heap.assign(k, -std::numeric_limits<T>::infinity());  // a heap already: all equal
  const auto greater = std::greater<T>();
  for (int64_t i = 0; i < vocab; ++i) {
    if (scores[i] > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), greater);
      heap.back() = scores[i];
      std::push_heap(heap.begin(), heap.end(), greater);
    }
  }
  return heap.front();
}

// Scale the row by the temperature; returns the max and the min scaled score (NaN ignored; -inf for both when
// nothing else is there) and whether any score is NaN.
template <typename L, typename T>
std::tuple<T, T, bool> scale_row(const L* logits, int64_t vocab, T temperature, T* scores) {
  T top = -std::numeric_limits<T>::infinity(), bottom = std::numeric_limits<T>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : top) reduction(min : bottom) reduction(| : nan)
  for (int64_t i = 0; i < vocab; ++i) {
    scores[i] = static_cast<T>(logits[i]) / temperature;
    top = std::max(top, scores[i]);
    bottom = std::min(bottom, scores[i]);
    nan |= scores[i] != scores[i];
  }
  return {top, bottom, nan != 0};
}

// The first index holding `top` (0 when nothing beats -inf), as a running strict maximum finds it.
template <typename T>
int64_t first_index_of(const T* scores, int64_t vocab, T top) {
  if (top == -std::numeric_limits<T>::infinity()) return 0;
  return std::find(scores, scores + vocab, top) - scores;
}

// The lowest score that top-k and then top-p keep (-inf: everything).
template <typename T>
T keep_floor(const T* scores, int64_t vocab, T top, bool nan, const SamplingParams<T>& params,
             SamplingWorkspace<T>& ws) {
  T floor = -std::numeric_limits<T>::infinity();
  auto& cand = ws.candidates;
  if (params.top_k > 0 && params.top_k < vocab && params.top_k <= kHeapTopK && !nan) {
    floor = kth_largest(scores, vocab, params.top_k, ws.largest);
  } else if (params.top_k > 0 && params.top_k < vocab) {
    cand.resize(vocab);
    for (int64_t i = 0; i < vocab; ++i) cand[i] = {scores[i], T(1)};
    floor = lowest_kept(cand.data(), cand.data() + vocab, static_cast<double>(params.top_k), top);
  }
  if (params.top_p < 1) {
    cand.clear();
    double mass = 0;  // of what top-k kept, in units of p(top)
    for (int64_t i = 0; i < vocab; ++i) {
      if (scores[i] >= floor) {
        cand.push_back({scores[i], fast_exp(scores[i] - top)});
        mass += cand.back().weight;
      }
    }
    floor = lowest_kept(cand.data(), cand.data() + cand.size(), params.top_p * mass, top);
  }
  return floor;
}

// exp(score - max) of every token the warpers keep, 0 elsewhere; returns their sum.
template <typename L, typename T>
double kept_weights(const L* logits,  // [vocab]
               int64_t vocab, const SamplingParams<T>& params, SamplingWorkspace<T>& ws,
               T* weights) {  // [vocab] out
  ws.scores.resize(vocab);
  T* scores = ws.scores.data();
  const bool greedy = params.temperature == 0;
  const auto [top, bottom, nan] = scale_row(logits, vocab, greedy ? T(1) : params.temperature, scores);
  if (greedy) {
    std::fill(weights, weights + vocab, T(0));
    weights[first_index_of(scores, vocab, top)] = 1;
    return 1;
  }
  const T floor = keep_floor(scores, vocab, top, nan, params, ws);
#pragma omp simd
  for (int64_t i = 0; i < vocab; ++i) weights[i] = fast_exp(scores[i] - top);
  if (bottom - top < ExpTraits<T>::kLowest) {  // fast_exp's 0 there: std::exp keeps the subnormal tail
    for (int64_t i = 0; i < vocab; ++i) {
      if (scores[i] - top < ExpTraits<T>::kLowest) weights[i] = std::exp(scores[i] - top);
    }
  }
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < vocab; ++i) {
    // min-p: p(x) >= min_p * p(top)  <=>  exp(score - max) >= min_p
    weights[i] = scores[i] >= floor && weights[i] >= params.min_p ? weights[i] : T(0);
    total += weights[i];
  }
  return total;
}

// The renormalised distribution the warpers leave.
template <typename L, typename T>
void filter_row(const L* logits,  // [vocab]
                int64_t vocab, const SamplingParams<T>& params, SamplingWorkspace<T>& ws,
                T* probs) {  // [vocab] out
  const T total = static_cast<T>(kept_weights(logits, vocab, params, ws, probs));
  for (int64_t i = 0; i < vocab; ++i) probs[i] /= total;
}

// One token drawn from filter_row's distribution by inverse CDF on u in [0, 1).
template <typename L, typename T>
int64_t sample_row(const L* logits,  // [vocab]
                   int64_t vocab, const SamplingParams<T>& params, double u, SamplingWorkspace<T>& ws) {
  ws.weights.resize(vocab);
  kept_weights(logits, vocab, params, ws, ws.weights.data());
  return inverse_cdf(ws.weights.data(), vocab, u);
}

}  // namespace specbeam
