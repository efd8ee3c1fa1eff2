// RMSNorm forward and backward for CPU tensors, one pass over each row, as torch ops
// (torch.ops.normgpt_cpu.rms_norm_forward / rms_norm_backward). kernels/rmsnorm_cpu.py builds this
// file with torch.utils.cpp_extension on first use; kernels/rmsnorm.py's autograd Function calls the ops.
//
// Why it exists: eager ATen has a fused LayerNorm for CPU but no fused RMSNorm, so RMSNorm written
// from ATen ops reads and writes the tensor several times and ran about 2x slower than LayerNorm there,
// the opposite of the paper, for a reason that has nothing to do with the math.
//
// With y = x * r * g, r = (mean(x[:k]^2) + eps)^-1/2 and k the features the statistics use
// (k < n is pRMSNorm):
//   dx_j = r * g_j * dy_j - [j < k] * x_j * r^3 * s / k,  s = sum_j g_j * dy_j * x_j
//   dg_j = sum over rows of dy_j * x_j * r
// Sums are taken in opmath (fp32 for fp32/bf16/fp16, fp64 for fp64); rows are split across
// ATen's intra-op threads, and dg is summed per thread chunk, then once across chunks.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

namespace {

using at::Tensor;

// rows of at least this many elements in total go to one thread (smaller work is not worth a thread)
constexpr int64_t kGrainElements = 1 << 15;

// sum of term(j) for j in [0, len), in 16 independent lanes: one running sum would make every add
// wait for the previous one (its latency, not memory, then bounds the loop)
template <typename A, typename Term>
inline A row_sum(int64_t len, const Term& term) {
  constexpr int64_t kLanes = 16;
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
#pragma omp simd
    for (int64_t u = 0; u < kLanes; ++u) lanes[u] += term(j + u);
  }
  A total = 0;
  for (; j < len; ++j) total += term(j);
  for (int64_t u = 0; u < kLanes; ++u) total += lanes[u];
  return total;
}

// y = x * r * g for rows [begin, end); g is all ones for a norm without gain
template <typename T, typename A>
void forward_rows(const T* x, const A* g, T* y, A* rstd, int64_t rows, int64_t n, int64_t k, A eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * n;
      T* yr = y + row * n;
      const A sum_sq = row_sum<A>(k, [&](int64_t j) { return A(xr[j]) * A(xr[j]); });
      const A r = A(1) / std::sqrt(sum_sq / A(k) + eps);
      rstd[row] = r;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) yr[j] = T(A(xr[j]) * r * g[j]);
    }
  });
}

// dx for rows [begin, end); adds dy * x * r into dg_partial (length n) when it is not null
template <typename T, typename A>
void backward_rows(const T* dy, const T* x, const A* g, const A* rstd, T* dx, A* dg_partial,
                   int64_t begin, int64_t end, int64_t n, int64_t k) {
  for (int64_t row = begin; row < end; ++row) {
    const T* dyr = dy + row * n;
    const T* xr = x + row * n;
    T* dxr = dx + row * n;
    const A r = rstd[row];
    const A s = row_sum<A>(n, [&](int64_t j) { return g[j] * A(dyr[j]) * A(xr[j]); });
    const A c = r * r * r * s / A(k);
    // dx (and dg's partial sum, in the same pass over dy and x) for features [from, to); only the k
    // features in the statistics get the second term (k < n is pRMSNorm), so the rest pass 0
    auto pass = [&](int64_t from, int64_t to, A second) {
      if (dg_partial) {
#pragma omp simd
        for (int64_t j = from; j < to; ++j) {
          const A dyj = A(dyr[j]), xj = A(xr[j]);
          dxr[j] = T(r * g[j] * dyj - xj * second);
          dg_partial[j] += dyj * xj * r;
        }
      } else {
#pragma omp simd
        for (int64_t j = from; j < to; ++j) dxr[j] = T(r * g[j] * A(dyr[j]) - A(xr[j]) * second);
      }
    };
    pass(0, k, c);
    pass(k, n, A(0));
  }
}

// x viewed as rows of n features, contiguous
Tensor as_rows(const Tensor& t) {
  const int64_t n = t.dim() == 0 ? 1 : t.size(-1);
  return t.contiguous().view({-1, n});
}

// the gain in opmath dtype, contiguous; ones for a norm without gain (one multiply per element
// is cheaper than a second copy of every loop)
Tensor gain_or_ones(const std::optional<Tensor>& weight, int64_t n, const Tensor& x) {
  const auto opmath = at::toOpMathType(x.scalar_type());
  if (!weight.has_value()) return at::ones({n}, x.options().dtype(opmath));
  TORCH_CHECK(weight->numel() == n, "rms_norm: weight has ", weight->numel(), " elements, x has ", n, " features");
  return weight->to(opmath).contiguous();
}

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x, const std::optional<Tensor>& weight,
                                            double eps, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1, "rms_norm_forward: expects a CPU tensor of rank >= 1");
  const Tensor x2 = as_rows(x);
  const int64_t rows = x2.size(0), n = x2.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "rms_norm_forward: k must be in [1, ", n, "], got ", k);
  const Tensor g = gain_or_ones(weight, n, x);
  Tensor y = at::empty_like(x2);
  Tensor rstd = at::empty({rows}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    forward_rows<scalar_t, A>(x2.const_data_ptr<scalar_t>(), g.const_data_ptr<A>(), y.mutable_data_ptr<scalar_t>(),
                              rstd.mutable_data_ptr<A>(), rows, n, k, A(eps));
  });
  return {y.view(x.sizes()), rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                             const Tensor& rstd, int64_t k, bool weight_grad) {
  const Tensor x2 = as_rows(x), dy2 = as_rows(dy);
  const int64_t rows = x2.size(0), n = x2.size(1);
  TORCH_CHECK(dy2.sizes() == x2.sizes() && dy.scalar_type() == x.scalar_type(),
              "rms_norm_backward: dy must match x in shape and dtype");
  const Tensor g = gain_or_ones(weight, n, x);
  Tensor dx = at::empty_like(x2);
  Tensor dg;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* g_ptr = g.const_data_ptr<A>();
    const A* r_ptr = rstd.const_data_ptr<A>();
    const scalar_t *dy_ptr = dy2.const_data_ptr<scalar_t>(), *x_ptr = x2.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = dx.mutable_data_ptr<scalar_t>();
    if (!(weight_grad && weight.has_value())) {
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / n), [&](int64_t begin, int64_t end) {
        backward_rows<scalar_t, A>(dy_ptr, x_ptr, g_ptr, r_ptr, dx_ptr, nullptr, begin, end, n, k);
      });
      return;
    }
    // one fp32 (fp64) partial dg per chunk of rows, summed once at the end
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    Tensor partial = at::zeros({chunks, n}, rstd.options());
    A* partial_ptr = partial.mutable_data_ptr<A>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        backward_rows<scalar_t, A>(dy_ptr, x_ptr, g_ptr, r_ptr, dx_ptr, partial_ptr + c * n,
                                   rows * c / chunks, rows * (c + 1) / chunks, n, k);
      }
    });
    dg = partial.sum(0).to(weight->scalar_type());
  });
  return {dx.view(x.sizes()), dg};
}

}  // namespace

TORCH_LIBRARY(normgpt_cpu, m) {
  m.def("rms_norm_forward(Tensor x, Tensor? weight, float eps, int k) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, int k, bool weight_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normgpt_cpu, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}
