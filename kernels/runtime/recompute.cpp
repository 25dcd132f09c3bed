// Activation recomputation (gradient checkpointing; Chen et al. 2016, "Training Deep Nets with
// Sublinear Memory Cost") as a torch::autograd::Function around a Rust closure, in the style of
// torch.utils.checkpoint(use_reentrant=True):
//
//   forward:  run the block under no-grad, so none of its activations are kept; save its input,
//             the RNG states and the autocast state it ran with.
//   backward: run the block again with grad on a detached copy of the input, under the saved
//             RNG and autocast states (so dropout masks and autocast casts repeat exactly), then
//             torch::autograd::grad of its output w.r.t. that input and the listed parameters.
//
// Unlike torch's reentrant checkpoint, the parameters are inputs of the Function, so their
// gradients are returned to the outer engine (hooks, autograd::grad(loss, params) and .grad
// accumulation all see them) and the output requires grad even when the input does not.
//
// The closure lives in the autograd node (an intrusive_ptr in ctx->saved_data) and is freed
// when the node is, not when course_recompute returns: backward may run much later.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>

#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

#include "ops.h"

namespace course {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

at::Tensor generator_state(at::Device device) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_generator_state(at::Device device, const at::Tensor& state) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// The default generators a block may draw from: the CPU one always, and the input's CUDA
// device's one (what torch.utils.checkpoint's preserve_rng_state saves).
struct RngState {
  at::Tensor cpu;
  std::optional<at::Device> cuda_device;
  at::Tensor cuda;

  static RngState capture(const at::Tensor& input) {
    RngState s;
    s.cpu = generator_state(at::Device(at::kCPU));
    if (input.is_cuda()) {
      s.cuda_device = input.device();
      s.cuda = generator_state(input.device());
    }
    return s;
  }

  void apply() const {
    set_generator_state(at::Device(at::kCPU), cpu);
    if (cuda_device) set_generator_state(*cuda_device, cuda);
  }
};

// Sets the forward-time RNG states for the recompute and puts back the states that were
// current before it, so the recompute consumes no randomness from the rest of the program
// (torch.random.fork_rng).
class RngFork {
 public:
  RngFork(const RngState& forward) : before_(forward) {
    before_.cpu = generator_state(at::Device(at::kCPU));
    if (forward.cuda_device) before_.cuda = generator_state(*forward.cuda_device);
    forward.apply();
  }
  ~RngFork() {
    try {
      before_.apply();
    } catch (...) {
      // A destructor must not throw; set_state only rejects a malformed state, and this one
      // came from get_state.
    }
  }
  RngFork(const RngFork&) = delete;
  RngFork& operator=(const RngFork&) = delete;

 private:
  RngState before_;
};

// CPU and CUDA autocast, enabled flag and dtype, as torch.utils.checkpoint records them.
struct AutocastState {
  bool cpu_enabled = false;
  c10::ScalarType cpu_dtype = at::kBFloat16;
  bool cuda_enabled = false;
  c10::ScalarType cuda_dtype = at::kHalf;

  static AutocastState capture() {
    AutocastState s;
    s.cpu_enabled = at::autocast::is_autocast_enabled(c10::DeviceType::CPU);
    s.cpu_dtype = at::autocast::get_autocast_dtype(c10::DeviceType::CPU);
    s.cuda_enabled = at::autocast::is_autocast_enabled(c10::DeviceType::CUDA);
    s.cuda_dtype = at::autocast::get_autocast_dtype(c10::DeviceType::CUDA);
    return s;
  }

  void apply() const {
    at::autocast::set_autocast_dtype(c10::DeviceType::CPU, cpu_dtype);
    at::autocast::set_autocast_enabled(c10::DeviceType::CPU, cpu_enabled);
    at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, cuda_dtype);
    at::autocast::set_autocast_enabled(c10::DeviceType::CUDA, cuda_enabled);
  }
};

// Re-enters the forward's autocast state like `with torch.autocast(...)`: nesting counted, the
// cast cache cleared when the outermost region ends, the previous state restored.
class AutocastScope {
 public:
  explicit AutocastScope(const AutocastState& want) : prev_(AutocastState::capture()) {
    want.apply();
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    try {
      if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
      prev_.apply();
    } catch (...) {
    }
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  AutocastState prev_;
};

// One checkpointed call: the Rust closure (freed with this object, i.e. with the autograd
// node that holds it) and the states its forward ran under.
struct Block : torch::CustomClassHolder {
  course_fn fn = nullptr;
  void* ctx = nullptr;
  void (*drop_ctx)(void*) = nullptr;
  RngState rng;
  AutocastState autocast;

  Block(course_fn f, void* c, void (*d)(void*)) : fn(f), ctx(c), drop_ctx(d) {}
  ~Block() override {
    if (drop_ctx) drop_ctx(ctx);
  }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  // Runs the closure. Its errors (including caught Rust panics) come back as a message and are
  // rethrown as std::runtime_error, whose what() is exactly that message wherever the autograd
  // engine or tch catches it.
  at::Tensor call(const at::Tensor& x) const {
    course_tensor out = nullptr;
    char* err = fn(ctx, new at::Tensor(x), &out);
    if (err != nullptr) {
      std::string msg(err);
      course_free_error(err);
      if (out != nullptr) delete static_cast<at::Tensor*>(out);
      throw std::runtime_error("recompute: the block failed: " + msg);
    }
    TORCH_CHECK(out != nullptr, "recompute: the block returned no tensor");
    at::Tensor y = *static_cast<at::Tensor*>(out);
    delete static_cast<at::Tensor*>(out);
    TORCH_CHECK(y.defined(), "recompute: the block returned an undefined tensor");
    return y;
  }
};

// The recompute differentiates only w.r.t. the input and `params`, so a tensor that requires
// grad but is captured by the closure without being listed would silently get no gradient (the
// classic checkpoint pitfall). Walk the recomputed graph and refuse that.
void check_all_leaves_listed(const at::Tensor& out, const std::vector<at::Tensor>& listed) {
  std::unordered_set<const c10::TensorImpl*> ok;
  for (const auto& t : listed) ok.insert(t.unsafeGetTensorImpl());
  auto fail = [](const at::Tensor& t) {
    TORCH_CHECK(false, "recompute: the block reads a tensor that requires grad (shape ", t.sizes(), ", ",
                t.scalar_type(),
                ") but is neither its input nor in `params`, so its gradient would be lost; pass every "
                "parameter the block uses in `params`");
  };
  auto root = out.grad_fn();
  if (!root) {
    if (out.requires_grad() && !ok.count(out.unsafeGetTensorImpl())) fail(out);
    return;
  }
  std::vector<torch::autograd::Node*> stack{root.get()};
  std::unordered_set<torch::autograd::Node*> seen{root.get()};
  while (!stack.empty()) {
    auto* node = stack.back();
    stack.pop_back();
    for (const auto& edge : node->next_edges()) {
      auto* next = edge.function.get();
      if (next == nullptr || !seen.insert(next).second) continue;
      if (auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(next)) {
        if (!ok.count(acc->variable.unsafeGetTensorImpl())) fail(acc->variable);
      } else {
        stack.push_back(next);
      }
    }
  }
}

struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  static at::Tensor forward(AutogradContext* ctx, c10::intrusive_ptr<Block> block, const at::Tensor& x,
                            at::TensorList params) {
    // Function::apply runs this with grad off: the block keeps no activations.
    block->rng = RngState::capture(x);
    block->autocast = AutocastState::capture();
    auto y = block->call(x);
    // Saved variables (not saved_data) so that autograd's version check refuses a backward
    // after x or a parameter was changed in place (an optimizer step before backward): the
    // recompute would silently differ from the forward.
    std::vector<at::Tensor> saved{x};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    // A capsule is the one IValue that holds an arbitrary C++ object; it keeps the closure
    // alive as long as the node.
    ctx->saved_data["block"] = at::IValue::make_capsule(block);
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "recompute: double backward (create_graph=true) is not supported");
    auto block = c10::static_intrusive_pointer_cast<Block>(ctx->saved_data.at("block").toCapsule());
    auto saved = ctx->get_saved_variables();
    auto x = saved[0];
    std::vector<at::Tensor> params(saved.begin() + 1, saved.end());

    // Output 0 is the Block argument (not a tensor): always undefined. Then x, then params.
    tensor_list result(2 + params.size());
    if (!grads[0].defined()) return result;

    // A leaf copy of the input: the recompute's graph stops here instead of reaching into the
    // graph that produced x (whose gradient the outer engine propagates from our result).
    auto x_leaf = x.detach();
    x_leaf.set_requires_grad(x.requires_grad());
    at::Tensor y;
    {
      at::AutoGradMode grad_on(true);
      RngFork rng(block->rng);
      AutocastScope autocast(block->autocast);
      y = block->call(x_leaf);
    }
    TORCH_CHECK(y.sizes() == grads[0].sizes(), "recompute: the recomputed output has shape ", y.sizes(),
                " but the forward's had ", grads[0].sizes(), "; the block must be deterministic in shape");

    std::vector<at::Tensor> listed{x_leaf};
    listed.insert(listed.end(), params.begin(), params.end());
    check_all_leaves_listed(y, listed);
    if (!y.requires_grad()) return result;  // nothing the block computed depends on a gradient

    std::vector<at::Tensor> wrt;
    std::vector<size_t> slot;
    if (x_leaf.requires_grad() && ctx->needs_input_grad(0)) {
      wrt.push_back(x_leaf);
      slot.push_back(1);
    }
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].requires_grad() && ctx->needs_input_grad(1 + i)) {
        wrt.push_back(params[i]);
        slot.push_back(2 + i);
      }
    }
    if (wrt.empty()) return result;
    // allow_unused: a listed parameter the block did not touch gets no gradient, as in eager.
    auto g = torch::autograd::grad({y}, wrt, {grads[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                   /*allow_unused=*/true);
    for (size_t k = 0; k < g.size(); ++k) result[slot[k]] = g[k];
    return result;
  }
};

}  // namespace
}  // namespace course

extern "C" {

char* course_error_new(const char* msg, size_t len) {
  char* out = static_cast<char*>(std::malloc(len + 1));
  if (!out) return course::out_of_memory_error();
  if (len) std::memcpy(out, msg, len);
  out[len] = '\0';
  return out;
}

char* course_recompute(course_fn f, void* ctx, void (*drop_ctx)(void*), course_tensor input, course_tensor* params,
                        int n_params, course_tensor* out) {
  // Own the closure first, so every path below (errors included) frees it exactly once.
  c10::intrusive_ptr<course::Block> block;
  try {
    block = c10::make_intrusive<course::Block>(f, ctx, drop_ctx);
  } catch (...) {
    if (drop_ctx) drop_ctx(ctx);
    return course::dup_error("recompute: out of memory");
  }
  COURSE_TRY({
    TORCH_CHECK(f != nullptr, "recompute: null callback");
    TORCH_CHECK(n_params >= 0, "recompute: negative parameter count ", n_params);
    const auto& x = *static_cast<at::Tensor*>(input);
    TORCH_CHECK(x.defined(), "recompute: the input is an undefined tensor");
    std::vector<at::Tensor> ps;
    std::unordered_set<const c10::TensorImpl*> seen{x.unsafeGetTensorImpl()};
    for (int i = 0; i < n_params; ++i) {
      const auto& p = *static_cast<at::Tensor*>(params[i]);
      TORCH_CHECK(p.defined(), "recompute: params[", i, "] is an undefined tensor");
      // A tensor listed twice would get its gradient twice.
      TORCH_CHECK(seen.insert(p.unsafeGetTensorImpl()).second, "recompute: params[", i, "] (shape ", p.sizes(),
                  ") is listed twice or is the input itself");
      ps.push_back(p);
    }
    bool needs_graph = at::GradMode::is_enabled() && x.requires_grad();
    for (const auto& p : ps) needs_graph = needs_graph || (at::GradMode::is_enabled() && p.requires_grad());
    if (!needs_graph) {
      // Under no_grad / inference mode, or nothing requires grad: nothing to save, just run it
      // (what torch.utils.checkpoint does too).
      *out = new at::Tensor(block->call(x));
    } else {
      *out = new at::Tensor(course::CheckpointFunction::apply(block, x, at::TensorList(ps)));
    }
  })
}

}  // extern "C"
