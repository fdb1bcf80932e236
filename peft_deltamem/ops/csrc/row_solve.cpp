// The per-row triangular systems of the chunked scan's factored form (peft_deltamem/ops/chunked.py), solved without
// forming them.
//
// With rank-wise gates every state row i of a chunk has its own C×C system
//     (diag(P'_i) + diag(erase_i ⊙ P_i) T) x_i = rhs_i,      T = tril₋₁(K Kᵀ) shared by the rows,
// and the backward solves its transpose. The eager path forms all N·r systems (N·r·C² floats, megabytes per chunk)
// and hands them to a batched triangular solve, which costs far more than the N·r·C²/2 multiply-adds the solve
// needs. Here the rows of a chunk are substituted together, token by token, reading the shared Gram matrix K Kᵀ
// (T's column t is the Gram matrix's row t below the diagonal, by symmetry) with the innermost loop over the rows,
// which the compiler vectorises. peft_deltamem/ops/fused.py builds this file on demand; tests/ops/test_fused_scan.py
// checks it against the systems written out and the token loop.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

namespace {

// All R rows of one chunk at once, token-major ([C][R], the chunked scan's own layout, so that the innermost loop
// runs over the rows: R contiguous floats, a few vector registers). Forward: x solves (diag(p) + diag(e) tril₋₁(G)) x
// = b for each row; with transpose, (diag(p) + tril₋₁(G)ᵀ diag(e)) x = b. acc[s] collects the substituted sum for
// token s: with tril₋₁(G)[s, t] = G[t, s] (G = K Kᵀ is symmetric) both read row t of G.
void solve_rows(const float* g, const float* p, const float* e, const float* b, float* x, float* acc, int64_t c,
                int64_t rows, bool transpose) {
  for (int64_t i = 0; i < c * rows; ++i) acc[i] = 0.0f;
  for (int64_t step = 0; step < c; ++step) {
    const int64_t t = transpose ? c - 1 - step : step;
    const float *p_t = p + t * rows, *e_t = e + t * rows, *b_t = b + t * rows, *acc_t = acc + t * rows;
    float* x_t = x + t * rows;
    if (!transpose) {
      for (int64_t i = 0; i < rows; ++i) x_t[i] = (b_t[i] - e_t[i] * acc_t[i]) / p_t[i];
      for (int64_t s = t + 1; s < c; ++s) {  // acc[s] += G[s, t] x[t] for the tokens after t
        const float g_ts = g[t * c + s];
        float* acc_s = acc + s * rows;
        for (int64_t i = 0; i < rows; ++i) acc_s[i] += g_ts * x_t[i];
      }
    } else {
      for (int64_t i = 0; i < rows; ++i) x_t[i] = (b_t[i] - acc_t[i]) / p_t[i];
      for (int64_t s = 0; s < t; ++s) {  // acc[s] += G[t, s] e[t] x[t] for the tokens before t
        const float g_ts = g[t * c + s];
        float* acc_s = acc + s * rows;
        for (int64_t i = 0; i < rows; ++i) acc_s[i] += g_ts * e_t[i] * x_t[i];
      }
    }
  }
}

// [C, R] (any strides, e.g. an expanded row-shared gate or a chunk of a longer segment) -> [C, R] contiguous.
void gather(const torch::TensorAccessor<float, 2>& in, float* out) {
  const int64_t c = in.size(0), rows = in.size(1);
  for (int64_t t = 0; t < c; ++t)
    for (int64_t i = 0; i < rows; ++i) out[t * rows + i] = in[t][i];
}

}  // namespace

// gram [N, C, C] (K Kᵀ of each of N chunks, or of N sequences' current chunk); p_out, erase_p, rhs token-major
// [N, C, R] (a column per state row) or broadcastable to it (a row-shared gate [N, C, 1]); returns x [N, C, R] with,
// for every n and row i, (diag(p_out) + diag(erase_p) tril₋₁(gram)) x = rhs, or the transposed system with
// ``transpose``. Returns an undefined tensor (None in Python) if some input is not float32 on the CPU: the caller
// then solves eagerly.
torch::Tensor row_solve(torch::Tensor gram, torch::Tensor p_out, torch::Tensor erase_p, torch::Tensor rhs,
                        bool transpose) {
  for (const auto& t : {gram, p_out, erase_p, rhs})
    if (!t.device().is_cpu() || t.scalar_type() != torch::kFloat32) return torch::Tensor();
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2), "row_solve: gram must be [N, C, C]");
  TORCH_CHECK(rhs.dim() == 3 && rhs.size(0) == gram.size(0) && rhs.size(1) == gram.size(1),
              "row_solve: rhs must be [N, C, R] with gram's N and C");
  const int64_t n = rhs.size(0), c = rhs.size(1), rows = rhs.size(2);
  // Each chunk's C×C block contiguous; the chunks may be strided (one chunk of every sequence of a segment).
  const bool blocks = gram.stride(2) == 1 && gram.stride(1) == c;
  const torch::Tensor g = blocks ? gram : gram.contiguous();
  const int64_t g_stride = g.stride(0);
  const torch::Tensor p_rows = p_out.expand({n, c, rows}), e_rows = erase_p.expand({n, c, rows});
  const auto p = p_rows.accessor<float, 3>();
  const auto e = e_rows.accessor<float, 3>();
  const auto b = rhs.accessor<float, 3>();
  torch::Tensor x = torch::empty({n, c, rows}, rhs.options());
  float* x_data = x.data_ptr<float>();
  const float* g_data = g.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffers(4 * c * rows);  // p, e, b, acc
    float *p_t = buffers.data(), *e_t = p_t + c * rows, *b_t = e_t + c * rows, *acc = b_t + c * rows;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      gather(p[chunk], p_t);
      gather(e[chunk], e_t);
      gather(b[chunk], b_t);
      solve_rows(g_data + chunk * g_stride, p_t, e_t, b_t, x_data + chunk * c * rows, acc, c, rows, transpose);
    }
  });
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_solve", &row_solve, "the chunked scan's per-row triangular solves (peft_deltamem/ops/chunked.py)");
}
