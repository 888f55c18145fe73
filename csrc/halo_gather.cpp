// halo_gather on the CPU: one parallel pass over the output rows of all windows.
//
// Each output row is one canvas row (or a zero row) cut into a few column segments, planned once per
// tile: contiguous copies (memcpy when both W strides are 1), replicated edge cells or zeros. A torus
// row is at most two copies when the window is no wider than the canvas.
#include "ops.h"

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace supergen {
namespace {

// Output columns [dst, dst + len): canvas columns src.. (copy), else `len` repeats of column src, or
// zeros when src < 0.
struct Segment {
  int64_t dst, src, len;
  bool copy;
};

// Column plan of a window of `len` cells whose first cell is canvas column x0.
std::vector<Segment> column_segments(int64_t x0, int64_t len, int64_t W, int64_t mode) {
  std::vector<Segment> segs;
  if (mode == kTorus) {
    for (int64_t dst = 0, x = detail::wrap_index(x0, W); dst < len; x = 0) {
      const int64_t run = std::min(W - x, len - dst);
      segs.push_back({dst, x, run, true});
      dst += run;
    }
    return segs;
  }
  const int64_t left = std::min(len, std::max<int64_t>(0, -x0));
  const int64_t mid = std::max<int64_t>(0, std::min(x0 + len, W) - std::max<int64_t>(x0, 0));
  const int64_t right = len - left - mid;
  const bool zero = mode == kZero;
  if (left > 0) segs.push_back({0, zero ? -1 : 0, left, false});
  if (mid > 0) segs.push_back({left, std::max<int64_t>(x0, 0), mid, true});
  if (right > 0) segs.push_back({left + mid, zero ? -1 : W - 1, right, false});
  return segs;
}

// Canvas row read for window row y (canvas coordinates), or -1 for a zero row.
int64_t source_row(int64_t y, int64_t H, int64_t mode) {
  if (mode == kTorus) return detail::wrap_index(y, H);
  if (y >= 0 && y < H) return y;
  return mode == kZero ? -1 : std::clamp<int64_t>(y, 0, H - 1);
}

template <typename scalar_t>
void fill(scalar_t* dst, int64_t len, int64_t stride, scalar_t value) {
  for (int64_t k = 0; k < len; ++k) dst[k * stride] = value;
}

template <typename scalar_t>
void gather_rows(const at::Tensor& canvas, const std::vector<int64_t>& rows,
                 const std::vector<std::vector<Segment>>& segs, at::Tensor& out) {
  const scalar_t* src = canvas.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const auto cs = canvas.strides();
  const auto os = out.strides();
  const int64_t B = canvas.size(0), C = out.size(1), T = out.size(2), hh = out.size(3), ww = out.size(4);
  const bool unit = cs[4] == 1 && os[4] == 1;
  // Rows are short (a window width): hand each thread at least a grain of elements.
  const int64_t grain = std::max<int64_t>(1, detail::kGrainElements / ww);
  at::parallel_for(0, out.size(0) * C * T * hh, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t r = row % hh, t = row / hh % T, c = row / (hh * T) % C, nb = row / (hh * T * C);
      const int64_t n = nb / B, b = nb % B;
      scalar_t* o = dst + nb * os[0] + c * os[1] + t * os[2] + r * os[3];
      const int64_t y = rows[n * hh + r];
      if (y < 0) {
        fill(o, ww, os[4], scalar_t(0));
        continue;
      }
      const scalar_t* s = src + b * cs[0] + c * cs[1] + t * cs[2] + y * cs[3];
      for (const Segment& g : segs[n]) {
        scalar_t* d = o + g.dst * os[4];
        if (!g.copy) {
          fill(d, g.len, os[4], g.src < 0 ? scalar_t(0) : s[g.src * cs[4]]);
        } else if (unit) {
          std::memcpy(d, s + g.src, g.len * sizeof(scalar_t));
        } else {
          for (int64_t k = 0; k < g.len; ++k) d[k * os[4]] = s[(g.src + k) * cs[4]];
        }
      }
    }
  });
}

}  // namespace

void halo_gather(const at::Tensor& canvas, const at::Tensor& origins, int64_t tile_h, int64_t tile_w,
                 int64_t halo, int64_t mode, at::Tensor& out) {
  detail::check_float5d("halo_gather", "canvas", canvas);
  const auto tiles = detail::read_origins("halo_gather", origins);
  const int64_t B = canvas.size(0), H = canvas.size(3), W = canvas.size(4);
  TORCH_CHECK(H >= 1 && W >= 1, "halo_gather: `canvas` must have H, W >= 1 but has shape ", canvas.sizes());
  TORCH_CHECK(tile_h >= 1 && tile_w >= 1, "halo_gather: tile size must be >= 1 but is ", tile_h, "x", tile_w);
  TORCH_CHECK(halo >= 0, "halo_gather: `halo` must be >= 0 but is ", halo);
  TORCH_CHECK(mode == kTorus || mode == kZero || mode == kReplicate,
              "halo_gather: `mode` must be 0 (torus), 1 (zero) or 2 (replicate) but is ", mode);
  const int64_t N = static_cast<int64_t>(tiles.size()), hh = tile_h + 2 * halo, ww = tile_w + 2 * halo;
  const std::vector<int64_t> want = {N * B, canvas.size(1), canvas.size(2), hh, ww};
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == canvas.scalar_type() && out.sizes() == want,
              "halo_gather: `out` must be a CPU ", canvas.scalar_type(), " tensor of shape ",
              c10::IntArrayRef(want), " but is a ", out.device(), " ", out.scalar_type(),
              " tensor of shape ", out.sizes());

  std::vector<int64_t> rows(N * hh);  // [N, hh]: canvas row of each window row, -1 = zeros
  std::vector<std::vector<Segment>> segs(N);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t r = 0; r < hh; ++r) rows[n * hh + r] = source_row(tiles[n][0] - halo + r, H, mode);
    segs[n] = column_segments(tiles[n][1] - halo, ww, W, mode);
  }
  AT_DISPATCH_V2(canvas.scalar_type(), "halo_gather", AT_WRAP([&] {
    gather_rows<scalar_t>(canvas, rows, segs, out);
  }), at::kFloat, at::kHalf, at::kBFloat16);
}

}  // namespace supergen
