// Host-only chunk planner of the multi-tensor optimizer kernels (CPU now, CUDA too).
//
// A list of tensors (given by their element counts) is cut into chunks of `chunk_size`
// elements; chunk k of tensor t covers elements [k*chunk_size, min((k+1)*chunk_size, numel)).
// The chunks are grouped into launches, each with a table of at most `max_tensors` tensor
// slots and at most `max_chunks` chunks (the fixed-size argument tables of one kernel launch).
// A tensor whose chunks do not fit in one launch continues in the next one, where it takes
// a slot again. Zero-size tensors get neither a slot nor a chunk; a list of only empty
// tensors gives no launch.
//
// Layout of a plan (flat arrays, launch l owns the ranges in launches[l]):
//   slot_tensor[s]  global index of the tensor in slot s   (s in [slot_begin, slot_end))
//   chunk_slot[c]   slot of chunk c, relative to its launch's slot_begin
//   chunk_start[c]  first element of chunk c inside its tensor
// Chunks are numbered in tensor order, then element order, over the whole plan, so a
// reduction that keeps one partial per chunk and adds them in chunk order is independent of
// the launch limits and of how the chunks of a launch are spread over threads or blocks.
#pragma once
#include <cstdint>
#include <vector>

#include "fusedopt/params_optim.h"

namespace fusedopt {

constexpr int64_t kDefaultChunkSize = 65536;
constexpr int kDefaultMaxTensors = 110;
constexpr int kDefaultMaxChunks = 320;

struct LaunchRange {
  int64_t slot_begin = 0, slot_end = 0;
  int64_t chunk_begin = 0, chunk_end = 0;
};

struct MultiTensorPlan {
  int64_t chunk_size = 0;
  int64_t total_elements = 0;  // over all tensors
  std::vector<int32_t> slot_tensor;
  std::vector<int32_t> chunk_slot;
  std::vector<int64_t> chunk_start;
  std::vector<LaunchRange> launches;

  int64_t num_chunks() const { return static_cast<int64_t>(chunk_start.size()); }
  // Global tensor index of chunk c of launch l.
  int32_t chunk_tensor(const LaunchRange& l, int64_t c) const {
    return slot_tensor[l.slot_begin + chunk_slot[c]];
  }
  // Number of elements of chunk c, whose tensor has `numel` elements.
  int64_t chunk_length(int64_t c, int64_t numel) const {
    const int64_t rest = numel - chunk_start[c];
    return rest < chunk_size ? rest : chunk_size;
  }
};

// Fills `plan`; returns kOptimOk, or kOptimBadArgument for chunk_size <= 0, limits < 1, a
// negative numel, or more tensors than an int32 index holds.
inline int make_multi_tensor_plan(const int64_t* numel, int64_t num_tensors,
                                  int64_t chunk_size, int max_tensors, int max_chunks,
                                  MultiTensorPlan* plan) {
  if (chunk_size <= 0 || max_tensors < 1 || max_chunks < 1 || num_tensors < 0 ||
      num_tensors > INT32_MAX)
    return kOptimBadArgument;
  int64_t total_chunks = 0, total_elements = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (numel[t] < 0) return kOptimBadArgument;
    total_chunks += (numel[t] + chunk_size - 1) / chunk_size;
    total_elements += numel[t];
  }
  plan->chunk_size = chunk_size;
  plan->total_elements = total_elements;
  plan->slot_tensor.clear();
  plan->chunk_slot.clear();
  plan->chunk_start.clear();
  plan->launches.clear();
  plan->chunk_start.reserve(total_chunks);
  plan->chunk_slot.reserve(total_chunks);

  LaunchRange open;  // the launch being filled; empty while chunk_end == chunk_begin
  auto close = [&] {
    if (open.chunk_end > open.chunk_begin) plan->launches.push_back(open);
    open.slot_begin = open.slot_end = static_cast<int64_t>(plan->slot_tensor.size());
    open.chunk_begin = open.chunk_end = plan->num_chunks();
  };
  for (int64_t t = 0; t < num_tensors; ++t) {
    const int64_t chunks = (numel[t] + chunk_size - 1) / chunk_size;
    for (int64_t k = 0; k < chunks; ++k) {
      bool has_slot = open.slot_end > open.slot_begin &&
                      plan->slot_tensor.back() == static_cast<int32_t>(t);
      if (open.chunk_end - open.chunk_begin == max_chunks ||
          (!has_slot && open.slot_end - open.slot_begin == max_tensors)) {
        close();
        has_slot = false;
      }
      if (!has_slot) {
        plan->slot_tensor.push_back(static_cast<int32_t>(t));
        ++open.slot_end;
      }
      plan->chunk_slot.push_back(static_cast<int32_t>(open.slot_end - 1 - open.slot_begin));
      plan->chunk_start.push_back(k * chunk_size);
      ++open.chunk_end;
    }
  }
  close();
  return kOptimOk;
}

}  // namespace fusedopt
