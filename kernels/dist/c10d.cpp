// PyTorch's own distributed engine (c10d) behind a C ABI: TCPStore and PrefixStore for the
// rendezvous, ProcessGroupGloo on CPU and (with --features cuda) ProcessGroupNCCL, and the
// collectives DDP needs — allreduce (sum, average), broadcast, allgather, barrier — each with
// a timeout. Every c10d error comes back as the message of the returned string.
//
// The wheel links gloo into libtorch_cpu but ships no gloo headers; kernels/gloo_stub/ holds
// the declarations ProcessGroupGloo.hpp needs (build.rs compiles this file with
// -DUSE_C10D_GLOO and that folder on the include path).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <ATen/ATen.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "c10d.h"
#include "ops.h"

namespace course {
namespace {

using ms = std::chrono::milliseconds;

// c10d's process-wide FlightRecorder (torch 2.11, FlightRecorderDetail.hpp) inserts each
// group's status into a std::map before taking its own mutex, on the first collective of every
// group. Ranks that are threads of one process (the tests, a notebook) race there and corrupt
// the map (a SIGSEGV in _Rb_tree_insert_and_rebalance, about one run in ten). Every collective
// of this shim is therefore *started* under one lock; the waiting happens outside it, so ranks
// still overlap their communication.
std::mutex& enqueue_mutex() {
  static std::mutex m;
  return m;
}

StoreHandle* store_of(void* s) {
  TORCH_CHECK(s != nullptr, "c10d: null store handle");
  return static_cast<StoreHandle*>(s);
}

GroupHandle* group_of(void* g) {
  TORCH_CHECK(g != nullptr, "c10d: null process-group handle");
  return static_cast<GroupHandle*>(g);
}

at::Tensor& tensor_of(course_tensor t) {
  TORCH_CHECK(t != nullptr, "c10d: null tensor");
  return *static_cast<at::Tensor*>(t);
}

ms timeout_or(GroupHandle* g, int64_t timeout_ms) { return timeout_ms > 0 ? ms(timeout_ms) : g->timeout; }

// Starts one collective under the enqueue lock (see enqueue_mutex).
template <typename F>
c10::intrusive_ptr<c10d::Work> started(F&& start) {
  std::lock_guard<std::mutex> lock(enqueue_mutex());
  return start();
}

void wait_for(const c10::intrusive_ptr<c10d::Work>& work, ms timeout, const char* what) {
  if (!work->wait(timeout)) {
    TORCH_CHECK(false, "c10d ", what, " did not finish within ", timeout.count(), " ms");
  }
}

// One allreduce in flight: the tensor, and whether it still needs dividing (Gloo's average).
struct WorkHandle {
  c10::intrusive_ptr<c10d::Work> work;
  at::Tensor tensor;
  double divide_by = 1.0;
  ms timeout{0};
};

c10::intrusive_ptr<c10d::Work> start_allreduce(GroupHandle& g, at::Tensor& t, bool average, ms timeout) {
  c10d::AllreduceOptions opts;
  opts.reduceOp = (average && g.native_avg) ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
  opts.timeout = timeout;
  std::vector<at::Tensor> ts{t};
  std::lock_guard<std::mutex> lock(enqueue_mutex());
  return g.backend->allreduce(ts, opts);
}

}  // namespace

void allreduce_blocking(GroupHandle& g, at::Tensor& t, bool average) {
  auto work = start_allreduce(g, t, average, g.timeout);
  wait_for(work, g.timeout, "allreduce");
  if (average && !g.native_avg && g.size > 1) t.div_(g.size);
}

}  // namespace course

using course::GroupHandle;
using course::StoreHandle;
using course::WorkHandle;

extern "C" {

char* course_store_tcp(const char* host, int port, int world_size, int is_server, int wait_workers, int64_t timeout_ms,
                       void** out) {
  COURSE_TRY({
    TORCH_CHECK(port >= 0 && port < 65536, "TCPStore: port ", port, " is out of range 0-65535");
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = is_server != 0;
    if (world_size > 0) opts.numWorkers = static_cast<size_t>(world_size);
    opts.waitWorkers = wait_workers != 0;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    // Several stores may share host:port in one process (torch.distributed's multi_tenant).
    opts.multiTenant = true;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new StoreHandle{store};
  })
}

int course_store_port(void* s) {
  auto* h = static_cast<StoreHandle*>(s);
  auto* tcp = dynamic_cast<c10d::TCPStore*>(h->store.get());
  return tcp ? static_cast<int>(tcp->getPort()) : -1;
}

char* course_store_prefix(const char* prefix, void* base, void** out) {
  COURSE_TRY({
    auto* b = course::store_of(base);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), b->store);
    *out = new StoreHandle{store};
  })
}

char* course_store_set(void* s, const char* key, const uint8_t* data, size_t len) {
  COURSE_TRY({
    std::vector<uint8_t> v(data, data + len);
    course::store_of(s)->store->set(std::string(key), v);
  })
}

// *data is malloc'd (free with course_free_error); *len its length.
char* course_store_get(void* s, const char* key, int64_t timeout_ms, uint8_t** data, size_t* len) {
  COURSE_TRY({
    auto& store = course::store_of(s)->store;
    std::string k(key);
    if (timeout_ms > 0) store->wait({k}, std::chrono::milliseconds(timeout_ms));
    auto v = store->get(k);
    auto* buf = static_cast<uint8_t*>(std::malloc(v.size() + 1));
    TORCH_CHECK(buf != nullptr, "TCPStore get: out of memory");
    if (!v.empty()) std::memcpy(buf, v.data(), v.size());
    *data = buf;
    *len = v.size();
  })
}

char* course_store_add(void* s, const char* key, int64_t delta, int64_t* out) {
  COURSE_TRY({ *out = course::store_of(s)->store->add(std::string(key), delta); })
}

void course_store_free(void* s) { delete static_cast<StoreHandle*>(s); }

// backend: "gloo" or "nccl" (the latter needs a --features cuda build).
char* course_pg_new(void* store, int rank, int size, const char* backend, int64_t timeout_ms, void** out) {
  COURSE_TRY({
    auto& st = course::store_of(store)->store;
    TORCH_CHECK(size >= 1, "process group: world size ", size, " must be at least 1");
    TORCH_CHECK(rank >= 0 && rank < size, "process group: rank ", rank, " must be in 0..", size);
    std::string name(backend);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto h = std::make_unique<GroupHandle>();
    h->name = name;
    h->rank = rank;
    h->size = size;
    h->timeout = timeout;
    if (name == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
      h->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(st, rank, size, opts);
      h->native_avg = false;
    } else if (name == "nccl") {
#ifdef COURSE_CUDA
      h->backend = course::make_nccl(st, rank, size, timeout);
      h->native_avg = true;
#else
      TORCH_CHECK(false, "the nccl backend needs a build with --features cuda (this one has only gloo)");
#endif
    } else {
      TORCH_CHECK(false, "unknown c10d backend '", name, "' (gloo or nccl)");
    }
    *out = h.release();
  })
}

void course_pg_free(void* g) {
  auto* h = static_cast<GroupHandle*>(g);
  if (!h) return;
  try {
    h->backend->shutdown();
  } catch (...) {
  }
  delete h;
}

// Starts an in-place allreduce of `t` (average != 0: the mean over ranks); *work is waited on
// with course_work_wait, which also frees it.
char* course_pg_allreduce_start(void* g, course_tensor t, int average, int64_t timeout_ms, void** work) {
  COURSE_TRY({
    auto* h = course::group_of(g);
    auto& x = course::tensor_of(t);
    auto timeout = course::timeout_or(h, timeout_ms);
    auto w = std::make_unique<WorkHandle>();
    w->work = course::start_allreduce(*h, x, average != 0, timeout);
    w->tensor = x;
    w->divide_by = (average != 0 && !h->native_avg) ? static_cast<double>(h->size) : 1.0;
    w->timeout = timeout;
    *work = w.release();
  })
}

char* course_work_wait(void* work) {
  std::unique_ptr<WorkHandle> w(static_cast<WorkHandle*>(work));
  COURSE_TRY({
    TORCH_CHECK(w != nullptr, "c10d: null work handle");
    course::wait_for(w->work, w->timeout, "allreduce");
    if (w->divide_by != 1.0) w->tensor.div_(w->divide_by);
  })
}

void course_work_free(void* work) { delete static_cast<WorkHandle*>(work); }

char* course_pg_allreduce(void* g, course_tensor t, int average, int64_t timeout_ms) {
  void* work = nullptr;
  if (char* err = course_pg_allreduce_start(g, t, average, timeout_ms, &work)) return err;
  return course_work_wait(work);
}

char* course_pg_broadcast(void* g, course_tensor t, int root, int64_t timeout_ms) {
  COURSE_TRY({
    auto* h = course::group_of(g);
    TORCH_CHECK(root >= 0 && root < h->size, "broadcast: root ", root, " must be in 0..", h->size);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = course::timeout_or(h, timeout_ms);
    std::vector<at::Tensor> ts{course::tensor_of(t)};
    auto work = course::started([&] { return h->backend->broadcast(ts, opts); });
    course::wait_for(work, opts.timeout, "broadcast");
  })
}

// outs: an array of world-size tensor pointers, filled with new tensors (rank order).
char* course_pg_allgather(void* g, course_tensor t, int64_t timeout_ms, course_tensor* outs) {
  COURSE_TRY({
    auto* h = course::group_of(g);
    auto& x = course::tensor_of(t);
    c10d::AllgatherOptions opts;
    opts.timeout = course::timeout_or(h, timeout_ms);
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < h->size; ++r) outputs[0].push_back(at::empty_like(x));
    std::vector<at::Tensor> inputs{x};
    auto work = course::started([&] { return h->backend->allgather(outputs, inputs, opts); });
    course::wait_for(work, opts.timeout, "allgather");
    for (int r = 0; r < h->size; ++r) outs[r] = new at::Tensor(outputs[0][r]);
  })
}

char* course_pg_barrier(void* g, int64_t timeout_ms) {
  COURSE_TRY({
    auto* h = course::group_of(g);
    c10d::BarrierOptions opts;
    opts.timeout = course::timeout_or(h, timeout_ms);
    auto work = course::started([&] { return h->backend->barrier(opts); });
    course::wait_for(work, opts.timeout, "barrier");
  })
}

}  // extern "C"
