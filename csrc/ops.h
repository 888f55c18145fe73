// CPU kernels of supergen's memory-bound ops; the meaning of each is `supergen.reference.<op>`.
//
// Plain functions, no schema: the torch.library ops live in supergen/ops.py, which validates the
// arguments, allocates `out` and calls these through supergen/_ext.py. The checks here only guard
// memory safety and name the op, the tensor and the offending value when a caller gets it wrong.
// Inputs may have any strides (no copies); offsets are int64. Dtypes: float32, float16, bfloat16.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <vector>

namespace supergen {

// Integer codes shared with supergen.reference.GATHER_MODES and RAMPS.
enum GatherMode : int64_t { kTorus = 0, kZero = 1, kReplicate = 2 };
enum Ramp : int64_t { kLinear = 0, kCosine = 1 };

// Cuts N windows of (tile_h + 2*halo, tile_w + 2*halo) cells out of the canvas into `out`.
void halo_gather(
    const at::Tensor& canvas,   // [B, C, T, H, W]
    const at::Tensor& origins,  // [N, 2] int64, (row, col) of each tile's top-left core cell
    int64_t tile_h,             // >= 1
    int64_t tile_w,             // >= 1
    int64_t halo,               // >= 0
    int64_t mode,               // GatherMode
    at::Tensor& out);           // [N*B, C, T, tile_h + 2*halo, tile_w + 2*halo], tile-major, canvas dtype

// Fuses tile-major tiles into a canvas: sum_n w_n * tile_n / sum_n w_n, fp32 in tile order.
void blend_scatter(
    const at::Tensor& tiles,    // [N*B, C, T, h, w], tile-major
    const at::Tensor& origins,  // [N, 2] int64, (row, col) of each tile's top-left cell
    int64_t canvas_h,           // H >= h
    int64_t canvas_w,           // W >= w
    int64_t overlap_h,          // ramp length on rows, 0 <= 2*overlap_h <= h
    int64_t overlap_w,          // ramp length on columns, 0 <= 2*overlap_w <= w
    int64_t ramp,               // Ramp
    bool wrap,                  // tile cells beyond the canvas wrap (torus) or are dropped
    at::Tensor& out);           // [B, C, T, H, W], tiles' dtype

namespace detail {

// Elements below which a thread hand-off costs more than it saves (ATen's internal GRAIN_SIZE, which
// lives in the heavy TensorIterator.h).
constexpr int64_t kGrainElements = 32768;

// (row, col) of each origin, after checking that `origins` is an [N, 2] int64 CPU tensor (any strides).
inline std::vector<std::array<int64_t, 2>> read_origins(const char* op, const at::Tensor& origins) {
  TORCH_CHECK(origins.device().is_cpu(), op, ": `origins` must be a CPU tensor but is on ", origins.device());
  TORCH_CHECK(origins.scalar_type() == at::kLong, op, ": `origins` must be int64 but is ",
              origins.scalar_type());
  TORCH_CHECK(origins.dim() == 2 && origins.size(1) == 2 && origins.size(0) >= 1, op,
              ": `origins` must have shape [N, 2] with N >= 1 but has shape ", origins.sizes());
  const auto acc = origins.accessor<int64_t, 2>();
  std::vector<std::array<int64_t, 2>> pairs(origins.size(0));
  for (int64_t n = 0; n < origins.size(0); ++n) pairs[n] = {acc[n][0], acc[n][1]};
  return pairs;
}

// Checks that `t` is a 5-D float32/float16/bfloat16 CPU tensor.
inline void check_float5d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": `", name, "` must be a CPU tensor but is on ", t.device());
  TORCH_CHECK(t.dim() == 5, op, ": `", name, "` must have 5 dims but has shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": `", name,
              "` must be float32, float16 or bfloat16 but is ", dtype);
}

// Python's i % size (never negative), for torus indexing.
inline int64_t wrap_index(int64_t i, int64_t size) {
  const int64_t r = i % size;
  return r < 0 ? r + size : r;
}

}  // namespace detail
}  // namespace supergen
