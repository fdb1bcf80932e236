// One decode step of a δ-mem layer (docs/design.md §1, one token, read before a token write, or a read only), fused:
// the memory step and the corrections of the heads.
//
// The same arithmetic as the layer's eager path for T = 1 (project, tanh + L2-normalise q and k, sigmoid gates,
// read S q, then S <- diag(keep) S - diag(erase) (S k) kᵀ + diag(write) v kᵀ), in one call: the eager path spends
// about forty operator calls per layer and token on vectors of r floats, each costing more than its arithmetic.
// peft_deltamem/ops/fused.py builds this file on demand and checks it against the eager path in the tests.
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

// State-update coefficients (keep, erase, write) from β and λ; the modes of docs/design.md §1.
enum Mode : int64_t { kStandard = 0, kLambdaOutside = 1, kNoLambda = 2 };

void unit_tanh(const float* in, float* out, int64_t r, bool normalize) {
  if (!normalize) {
    for (int64_t i = 0; i < r; ++i) out[i] = in[i];
    return;
  }
  double squares = 0.0;
  for (int64_t i = 0; i < r; ++i) {
    out[i] = std::tanh(in[i]);
    squares += static_cast<double>(out[i]) * out[i];
  }
  // F.normalize: divide by max(norm, 1e-12).
  const float norm = std::max(static_cast<float>(std::sqrt(squares)), 1e-12f);
  for (int64_t i = 0; i < r; ++i) out[i] /= norm;
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// y[o] = Σ_h w[o, h] x[h] for a row-major [rows, cols] weight: the projections of one token (a few thousand
// multiply-adds each), in a loop the compiler vectorises, instead of an operator call and a copy to stack them.
void matvec(const float* w, const float* x, float* y, int64_t rows, int64_t cols, float scale) {
  for (int64_t o = 0; o < rows; ++o) {
    const float* w_row = w + o * cols;
    float partial[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // eight lanes: a vector register
    int64_t h = 0;
    for (; h + 8 <= cols; h += 8)
      for (int lane = 0; lane < 8; ++lane) partial[lane] += w_row[h + lane] * x[h + lane];
    float sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                ((partial[4] + partial[5]) + (partial[6] + partial[7]));
    for (; h < cols; ++h) sum += w_row[h] * x[h];
    y[o] = sum * scale;
  }
}

// Every row of x [B, in] (contiguous) through each weight [out, in] in turn, times scale, into out: row b of the
// k-th weight's output starts at out + b·stride + (the widths of the weights before it).
void project(const torch::Tensor& x, const std::vector<torch::Tensor>& weights, float scale, float* out,
             int64_t stride) {
  const int64_t batch = x.size(0), in = x.numel() / batch;
  for (const auto& weight : weights) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in, "decode_step: every weight must be [out, ", in, "]");
    const torch::Tensor w = weight.contiguous();
    for (int64_t row = 0; row < batch; ++row)
      matvec(w.data_ptr<float>(), x.data_ptr<float>() + row * in, out + row * stride, w.size(0), in, scale);
    out += w.size(0);
  }
}

int64_t total_rows(const std::vector<torch::Tensor>& weights) {
  int64_t rows = 0;
  for (const auto& w : weights) rows += w.size(0);
  return rows;
}

}  // namespace

// x [B, 1, H] (or [B, H]); in_weights: the memory's input projections in stacking order (q, k, v, write gate[, keep
// gate]), each [out, H]; gate_bias: the gates' biases concatenated ([n·g] or [2·n·g]); state [B, n, r, r] (any
// shape of B·n·r·r floats) float32; valid [B] or [B, 1] bool, or None (every row valid); write: whether the token is
// written (else the call only reads, and only the q projection is computed); delta_weights: the correction heads'
// W_Δ [out, n·r], applied with ``scale``. Returns (reads [B, n·r], next state shaped as state (the state itself if
// not writing), β [B·n, 1, g] (empty if not writing), then per correction head scale · W_Δ o_t [B, 1, out]), or
// nothing if some tensor is not float32 on the CPU.
std::vector<torch::Tensor> decode_step(torch::Tensor x, std::vector<torch::Tensor> in_weights, torch::Tensor gate_bias,
                                       torch::Tensor state, c10::optional<torch::Tensor> valid, bool write,
                                       std::vector<torch::Tensor> delta_weights, double scale, int64_t heads,
                                       int64_t r, bool normalize_qk, bool couple_lambda, int64_t mode,
                                       int64_t gate_width) {
  // Float32 CPU tensors only: anything else is the eager path's (an empty result says so, and nothing was changed).
  auto plain = [](const torch::Tensor& t) { return t.scalar_type() == torch::kFloat32 && t.device().is_cpu(); };
  if (!plain(x) || !plain(state) || !plain(gate_bias)) return {};
  for (const auto* list : {&in_weights, &delta_weights})
    for (const auto& w : *list)
      if (!plain(w)) return {};
  x = x.contiguous();
  state = state.contiguous();
  const int64_t batch = x.size(0), d = heads * r, g = gate_width;
  const int64_t gates = couple_lambda ? 1 : 2;
  const int64_t all_inputs = 3 * d + gates * heads * g;
  TORCH_CHECK(state.numel() == batch * heads * r * r, "decode_step: the state holds ", state.numel(), " floats");
  TORCH_CHECK(total_rows(in_weights) == all_inputs, "decode_step: the input projections have ",
              total_rows(in_weights), " outputs, expected ", all_inputs);
  torch::Tensor bias = gate_bias.contiguous();
  TORCH_CHECK(bias.numel() == gates * heads * g, "decode_step: gate bias has ", bias.numel(), " entries");
  // The input projections side by side, [B, width]: q, then (writing) k, v and the gates' pre-activations.
  const int64_t width = write ? all_inputs : d;
  auto projected = torch::empty({batch, width}, x.options());
  project(x, write ? in_weights : std::vector<torch::Tensor>{in_weights[0]}, 1.0f, projected.data_ptr<float>(), width);

  auto reads = torch::empty({batch, d}, x.options());
  auto next = write ? torch::empty_like(state) : state;
  auto beta_out = torch::empty({write ? batch * heads : 0, 1, g}, x.options());
  const bool* valid_ptr = nullptr;
  torch::Tensor valid_c;
  if (valid.has_value() && valid->defined()) {
    valid_c = valid->to(torch::kBool).contiguous();
    valid_ptr = valid_c.data_ptr<bool>();
  }
  const float* y = projected.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const float* s_all = state.data_ptr<float>();
  float* s_next_all = write ? next.data_ptr<float>() : nullptr;
  float* beta_all = write ? beta_out.data_ptr<float>() : nullptr;
  float* read_all = reads.data_ptr<float>();
  std::vector<float> q(r), k(r), keep(g), erase(g), write_coef(g), s_k(r);

  for (int64_t row = 0; row < batch; ++row) {
    const float* y_row = y + row * width;
    const bool is_valid = valid_ptr == nullptr || valid_ptr[row];
    for (int64_t head = 0; head < heads; ++head) {
      const int64_t n = row * heads + head;
      const float* s = s_all + n * r * r;
      float* read = read_all + row * d + head * r;
      unit_tanh(y_row + head * r, q.data(), r, normalize_qk);
      if (write) {
        unit_tanh(y_row + d + head * r, k.data(), r, normalize_qk);
        for (int64_t i = 0; i < g; ++i) {
          const float beta = sigmoid(y_row[3 * d + head * g + i] + b[head * g + i]);
          const int64_t keep_at = heads * g + head * g + i;  // the keep gate follows all write gates
          const float lambda = couple_lambda ? 1.0f - beta : sigmoid(y_row[3 * d + keep_at] + b[keep_at]);
          beta_all[n * g + i] = beta;
          keep[i] = mode == kNoLambda ? 1.0f : lambda;
          erase[i] = mode == kLambdaOutside ? lambda * beta : beta;
          write_coef[i] = beta;
        }
      }
      // Read before write: S q (and S k for the write) from the old state.
      for (int64_t i = 0; i < r; ++i) {
        float sq = 0.0f, sk = 0.0f;
        for (int64_t j = 0; j < r; ++j) {
          sq += s[i * r + j] * q[j];
          if (write) sk += s[i * r + j] * k[j];
        }
        read[i] = is_valid ? sq : 0.0f;
        s_k[i] = sk;
      }
      if (!write) continue;
      float* s_next = s_next_all + n * r * r;
      if (!is_valid) {  // a masked token reads 0 and leaves S unchanged
        std::copy(s, s + r * r, s_next);
        continue;
      }
      const float* v = y_row + 2 * d + head * r;
      for (int64_t i = 0; i < r; ++i) {
        const int64_t gi = g == 1 ? 0 : i;
        const float u = write_coef[gi] * v[i] - erase[gi] * s_k[i];
        for (int64_t j = 0; j < r; ++j) s_next[i * r + j] = keep[gi] * s[i * r + j] + u * k[j];
      }
    }
  }
  // The corrections of the heads: scale · W_Δ o_t, one tensor per head.
  std::vector<torch::Tensor> outputs{reads, next, beta_out};
  for (const auto& w : delta_weights) {
    outputs.push_back(torch::empty({batch, 1, w.size(0)}, x.options()));
    project(reads, {w}, static_cast<float>(scale), outputs.back().data_ptr<float>(), w.size(0));
  }
  return outputs;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "one fused δ-mem decode step (docs/design.md §1)");
}
