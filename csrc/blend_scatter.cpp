// blend_scatter on the CPU: deterministic, race-free fusion of tiles into a canvas.
//
// The geometry is planned once per call: which tile rows cover each canvas row (in tile order) and the
// at most two column runs of each tile (one without wrap). The fp32 weight sum per canvas cell depends
// only on (y, x), so it is accumulated once. The data pass is parallel over output rows (b, c, t, y):
// each thread owns its rows and loops over the tiles covering them in order n = 0..N-1, so the fp32
// sums are formed in the reference's order and the result is bit-reproducible. With no overlap and no
// cell covered twice the weights are all one and the pass is a plain copy.
#include "ops.h"

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <c10/util/MathConstants.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace supergen {
namespace {

// reference.blend_ramp: the same double arithmetic rounded once to fp32, so the weights are the
// reference's bit for bit.
std::vector<float> blend_ramp(int64_t length, int64_t overlap, int64_t ramp) {
  std::vector<float> weights(length, 1.0f);
  if (overlap == 0) return weights;
  for (int64_t j = 0; j < length; ++j) {
    double t = std::min({(j + 0.5) / overlap, (length - j - 0.5) / overlap, 1.0});
    if (ramp == kCosine) {
      const double s = std::sin(t * (c10::pi<double> / 2));
      t = s * s;
    }
    weights[j] = static_cast<float>(t);
  }
  return weights;
}

// Tile row i of tile n lies on the canvas row this entry is listed under.
struct Cover {
  int64_t n, i;
};

// Canvas columns [x, x + len) take tile columns [j, j + len).
struct Run {
  int64_t x, j, len;
};

// Everything that depends only on the geometry, shared read-only by all threads.
struct Plan {
  std::vector<std::vector<Cover>> rows;  // [H]: tiles covering each canvas row, in tile order
  std::vector<std::vector<Run>> runs;    // [N]: column runs of each tile
  std::vector<float> wy, wx;             // [h], [w]: 1-D ramps
  std::vector<float> wsum;               // [H, W]: fp32 weight sum in tile order; 1 where uncovered
  std::vector<char> full;                // [H]: every cell of the row is covered
  bool copy;                             // unit weights and single cover: the output is a copy
};

Plan make_plan(const std::vector<std::array<int64_t, 2>>& origins, int64_t h, int64_t w, int64_t H,
               int64_t W, int64_t overlap_h, int64_t overlap_w, int64_t ramp, bool wrap) {
  Plan p;
  p.rows.resize(H);
  p.runs.resize(origins.size());
  for (size_t n = 0; n < origins.size(); ++n) {
    const auto [oy, ox] = origins[n];
    for (int64_t i = 0; i < h; ++i) {
      const int64_t y = wrap ? detail::wrap_index(oy + i, H) : oy + i;
      if (y >= 0 && y < H) p.rows[y].push_back({static_cast<int64_t>(n), i});
    }
    if (wrap) {  // w <= W, so a wrapped tile row is at most two runs
      const int64_t x = detail::wrap_index(ox, W), first = std::min(w, W - x);
      p.runs[n].push_back({x, 0, first});
      if (first < w) p.runs[n].push_back({0, first, w - first});
    } else {
      const int64_t j0 = std::max<int64_t>(0, -ox), j1 = std::min(w, W - ox);
      if (j1 > j0) p.runs[n].push_back({ox + j0, j0, j1 - j0});
    }
  }
  p.wy = blend_ramp(h, overlap_h, ramp);
  p.wx = blend_ramp(w, overlap_w, ramp);
  p.wsum.assign(H * W, 0.0f);
  p.full.assign(H, 0);
  float max_sum = 0.0f;
  for (int64_t y = 0; y < H; ++y) {
    float* ws = p.wsum.data() + y * W;
    for (const Cover& cv : p.rows[y]) {
      for (const Run& run : p.runs[cv.n]) {
        for (int64_t k = 0; k < run.len; ++k) ws[run.x + k] += p.wy[cv.i] * p.wx[run.j + k];
      }
    }
    p.full[y] = std::all_of(ws, ws + W, [](float s) { return s > 0.0f; });
    max_sum = std::max(max_sum, *std::max_element(ws, ws + W));
    // Uncovered cells accumulate 0, and 0 / 1 keeps them 0 without a branch in the hot loop (a
    // guarded division does not vectorise).
    std::replace(ws, ws + W, 0.0f, 1.0f);
  }
  p.copy = overlap_h == 0 && overlap_w == 0 && max_sum <= 1.0f;
  return p;
}

template <typename scalar_t>
void blend_rows(const at::Tensor& tiles, const Plan& p, at::Tensor& out) {
  const scalar_t* src = tiles.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const auto ts = tiles.strides();
  const auto os = out.strides();
  const int64_t B = out.size(0), C = out.size(1), T = out.size(2), H = out.size(3), W = out.size(4);
  const bool unit = ts[4] == 1 && os[4] == 1;
  // Rows are one canvas width: hand each thread at least a grain of elements.
  const int64_t grain = std::max<int64_t>(1, detail::kGrainElements / W);
  at::parallel_for(0, B * C * T * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(p.copy ? 0 : W);  // this thread's fp32 row accumulator
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % H, t = row / H % T, c = row / (H * T) % C, b = row / (H * T * C);
      scalar_t* o = dst + b * os[0] + c * os[1] + t * os[2] + y * os[3];
      auto tile_row = [&](const Cover& cv) {
        return src + (cv.n * B + b) * ts[0] + c * ts[1] + t * ts[2] + cv.i * ts[3];
      };
      if (p.copy) {
        if (!p.full[y]) {
          for (int64_t x = 0; x < W; ++x) o[x * os[4]] = scalar_t(0);
        }
        for (const Cover& cv : p.rows[y]) {
          const scalar_t* s = tile_row(cv);
          for (const Run& run : p.runs[cv.n]) {
            if (unit) {
              std::memcpy(o + run.x, s + run.j, run.len * sizeof(scalar_t));
            } else {
              for (int64_t k = 0; k < run.len; ++k) o[(run.x + k) * os[4]] = s[(run.j + k) * ts[4]];
            }
          }
        }
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (const Cover& cv : p.rows[y]) {
        const scalar_t* s = tile_row(cv);
        const float wyi = p.wy[cv.i];
        for (const Run& run : p.runs[cv.n]) {
          float* a = acc.data() + run.x;
          const float* wx = p.wx.data() + run.j;
          // Separate product and sum, as the reference computes them (built with -ffp-contract=off).
          if (ts[4] == 1) {
            const scalar_t* sr = s + run.j;
            for (int64_t k = 0; k < run.len; ++k) a[k] += static_cast<float>(sr[k]) * (wyi * wx[k]);
          } else {
            for (int64_t k = 0; k < run.len; ++k)
              a[k] += static_cast<float>(s[(run.j + k) * ts[4]]) * (wyi * wx[k]);
          }
        }
      }
      const float* ws = p.wsum.data() + y * W;
      for (int64_t x = 0; x < W; ++x) acc[x] /= ws[x];
      if (os[4] == 1) {
        for (int64_t x = 0; x < W; ++x) o[x] = static_cast<scalar_t>(acc[x]);
      } else {
        for (int64_t x = 0; x < W; ++x) o[x * os[4]] = static_cast<scalar_t>(acc[x]);
      }
    }
  });
}

}  // namespace

void blend_scatter(const at::Tensor& tiles, const at::Tensor& origins, int64_t canvas_h, int64_t canvas_w,
                   int64_t overlap_h, int64_t overlap_w, int64_t ramp, bool wrap, at::Tensor& out) {
  detail::check_float5d("blend_scatter", "tiles", tiles);
  const auto tile_origins = detail::read_origins("blend_scatter", origins);
  const int64_t N = static_cast<int64_t>(tile_origins.size()), h = tiles.size(3), w = tiles.size(4);
  TORCH_CHECK(tiles.size(0) % N == 0, "blend_scatter: `tiles` has ", tiles.size(0),
              " rows, which is not a multiple of the ", N, " origins");
  TORCH_CHECK(h >= 1 && w >= 1 && h <= canvas_h && w <= canvas_w, "blend_scatter: tile size ", h, "x", w,
              " must be >= 1 and fit the canvas ", canvas_h, "x", canvas_w);
  TORCH_CHECK(overlap_h >= 0 && overlap_w >= 0 && 2 * overlap_h <= h && 2 * overlap_w <= w,
              "blend_scatter: overlap ", overlap_h, "x", overlap_w, " must be in [0, half the tile ", h,
              "x", w, "]");
  TORCH_CHECK(ramp == kLinear || ramp == kCosine,
              "blend_scatter: `ramp` must be 0 (linear) or 1 (cosine) but is ", ramp);
  const std::vector<int64_t> want = {tiles.size(0) / N, tiles.size(1), tiles.size(2), canvas_h, canvas_w};
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == tiles.scalar_type() && out.sizes() == want,
              "blend_scatter: `out` must be a CPU ", tiles.scalar_type(), " tensor of shape ",
              c10::IntArrayRef(want), " but is a ", out.device(), " ", out.scalar_type(),
              " tensor of shape ", out.sizes());

  const Plan plan = make_plan(tile_origins, h, w, canvas_h, canvas_w, overlap_h, overlap_w, ramp, wrap);
  AT_DISPATCH_V2(tiles.scalar_type(), "blend_scatter", AT_WRAP([&] {
    blend_rows<scalar_t>(tiles, plan, out);
  }), at::kFloat, at::kHalf, at::kBFloat16);
}

}  // namespace supergen
