// 2-D convolution and max pooling on the CPU through oneDNN, the library behind PyTorch's CPU
// convolutions, as XLA FFI handlers: the convolution's forward pass, input gradient (backward
// data) and kernel gradient (backward weights), and max pooling's forward and backward pass.
// `cnnlab/kernels/__init__.py` compiles this file, loads it and registers the handlers with JAX;
// `cnnlab/models/conv.py` and `cnnlab/models/pool.py` call them.
//
// Layouts are cnnlab's, unchanged: activations NHWC ([B, H, W, C]) and kernels HWIO
// ([kh, kw, C, F]), float32. oneDNN keeps the activations in that layout (its AVX2/AVX-512
// kernels take channels-last directly) and picks its own blocked layout for the kernel, which
// is small: the kernel (or its gradient) is reordered on each call.
//
// A primitive is built once per shape and kept; the scratchpad is the caller's (oneDNN's "user"
// mode), so that two XLA threads may run the same primitive at once.

#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

enum class Kind { kForward, kBackwardData, kBackwardWeights };

// A cache key: what the primitive is, then its dimensions.
std::string Key(const std::string& what, std::initializer_list<const memory::dims*> parts) {
  std::string key = what;
  for (const memory::dims* dims : parts) {
    key += ";";
    for (int64_t v : *dims) key += "," + std::to_string(v);
  }
  return key;
}

// The geometry of one convolution, in oneDNN's logical order (N, C, H, W and O, I, H, W).
struct Geometry {
  memory::dims src, weights, dst, strides, pad_l, pad_r;

  std::string Key(Kind kind) const {
    return ::Key("conv" + std::to_string(static_cast<int>(kind)),
                 {&src, &weights, &dst, &strides, &pad_l, &pad_r});
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A ready primitive and what a call needs around it: the kernel layout it wants (a reorder
// from or to HWIO when that differs) and the scratchpad's size.
struct Entry {
  dnnl::primitive primitive;
  memory::desc user_weights;  // HWIO
  memory::desc weights;       // the primitive's
  bool reorder;               // weights != user_weights
  dnnl::reorder reorder_primitive;
  size_t scratchpad_bytes, reorder_scratchpad_bytes = 0;
};

std::shared_ptr<Entry> Build(Kind kind, const Geometry& g) {
  auto& engine = Engine();
  const auto f32 = memory::data_type::f32;
  memory::desc src(g.src, f32, Tag::nhwc), dst(g.dst, f32, Tag::nhwc);
  memory::desc any_weights(g.weights, f32, Tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc forward(
      engine, dnnl::prop_kind::forward_training, algo, src, any_weights, dst, g.strides, g.pad_l,
      g.pad_r, attr);

  auto entry = std::make_shared<Entry>();
  entry->user_weights = memory::desc(g.weights, f32, Tag::hwio);
  if (kind == Kind::kForward) {
    entry->primitive = dnnl::convolution_forward(forward);
    entry->weights = forward.weights_desc();
    entry->scratchpad_bytes = forward.scratchpad_desc().get_size();
  } else if (kind == Kind::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        engine, algo, src, any_weights, dst, g.strides, g.pad_l, g.pad_r, forward, attr);
    entry->primitive = dnnl::convolution_backward_data(pd);
    entry->weights = pd.weights_desc();
    entry->scratchpad_bytes = pd.scratchpad_desc().get_size();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        engine, algo, src, any_weights, dst, g.strides, g.pad_l, g.pad_r, forward, attr);
    entry->primitive = dnnl::convolution_backward_weights(pd);
    entry->weights = pd.diff_weights_desc();
    entry->scratchpad_bytes = pd.scratchpad_desc().get_size();
  }
  entry->reorder = entry->weights != entry->user_weights;
  if (entry->reorder) {  // to the primitive's layout, or back to HWIO for a kernel gradient
    const bool back = kind == Kind::kBackwardWeights;
    dnnl::reorder::primitive_desc pd(engine, back ? entry->weights : entry->user_weights, engine,
                                     back ? entry->user_weights : entry->weights, attr);
    entry->reorder_primitive = dnnl::reorder(pd);
    entry->reorder_scratchpad_bytes = pd.scratchpad_desc().get_size();
  }
  return entry;
}

// The entry for `key`, built by `build` the first time.
template <typename T, typename Build>
std::shared_ptr<T> Cached(const std::string& key, Build build) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<T>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto entry = build();
  cache.emplace(key, entry);
  return entry;
}

// Per-thread buffers: the scratchpad and the kernel in the primitive's layout.
struct Buffers {
  std::vector<uint8_t> scratchpad, weights;
  uint8_t* Scratchpad(size_t n) {
    if (scratchpad.size() < n) scratchpad.resize(n);
    return scratchpad.data();
  }
  uint8_t* Weights(size_t n) {
    if (weights.size() < n) weights.resize(n);
    return weights.data();
  }
};

// Each XLA thread that calls in has its own stream and buffers.
dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

Buffers& ThreadBuffers() {
  thread_local Buffers buffers;
  return buffers;
}

memory Scratchpad(size_t bytes, Buffers& buffers) {
  return memory(memory::desc({static_cast<int64_t>(bytes)}, memory::data_type::u8, Tag::a),
                Engine(), buffers.Scratchpad(bytes));
}

// x [B, H, W, C], w [kh, kw, C, F], y [B, H', W', F] (cnnlab's order) -> oneDNN's order.
Geometry Describe(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                  ffi::Span<const int64_t> y, int64_t stride_h, int64_t stride_w,
                  int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Geometry{{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]},
                  {y[0], y[3], y[1], y[2]}, {stride_h, stride_w},
                  {pad_top, pad_left},      {pad_bottom, pad_right}};
}

ffi::Error Run(Kind kind, const Geometry& g, float* src, float* weights, float* dst) {
  try {
    auto entry = Cached<Entry>(g.Key(kind), [&] { return Build(kind, g); });
    auto& engine = Engine();
    auto& stream = Stream();
    auto& buffers = ThreadBuffers();
    memory src_m(memory::desc(g.src, memory::data_type::f32, Tag::nhwc), engine, src);
    memory dst_m(memory::desc(g.dst, memory::data_type::f32, Tag::nhwc), engine, dst);
    memory user_w(entry->user_weights, engine, weights);
    memory w = entry->reorder
                   ? memory(entry->weights, engine, buffers.Weights(entry->weights.get_size()))
                   : user_w;
    auto reorder = [&](memory& from, memory& to) {
      entry->reorder_primitive.execute(
          stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                   {DNNL_ARG_SCRATCHPAD, Scratchpad(entry->reorder_scratchpad_bytes, buffers)}});
    };
    if (entry->reorder && kind != Kind::kBackwardWeights) reorder(user_w, w);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SCRATCHPAD, Scratchpad(entry->scratchpad_bytes, buffers)}};
    if (kind == Kind::kForward) {
      args.insert({{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst_m}});
    } else if (kind == Kind::kBackwardData) {
      args.insert({{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_DST, dst_m}});
    } else {
      args.insert({{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, w}, {DNNL_ARG_DIFF_DST, dst_m}});
    }
    entry->primitive.execute(stream, args);
    if (entry->reorder && kind == Kind::kBackwardWeights) reorder(w, user_w);
    stream.wait();
  } catch (const std::exception& e) {  // oneDNN's errors, and running out of memory
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

// Max pooling, square windows, no padding ("VALID"). The forward pass also writes oneDNN's
// workspace, the position of each window's maximum as one byte per output element in the
// output's layout (checked when the primitive is built), which the backward pass reads.
struct Pool {
  memory::dims src, dst, kernel, strides;

  std::string Key(bool backward) const {
    return ::Key(backward ? "pool-backward" : "pool-forward", {&src, &dst, &kernel, &strides});
  }
};

struct PoolEntry {
  dnnl::primitive primitive;
  size_t scratchpad_bytes;
};

std::shared_ptr<PoolEntry> BuildPool(bool backward, const Pool& p) {
  auto& engine = Engine();
  const auto f32 = memory::data_type::f32;
  memory::desc src(p.src, f32, Tag::nhwc), dst(p.dst, f32, Tag::nhwc);
  memory::dims none = {0, 0};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::pooling_forward::primitive_desc forward(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, src, dst,
      p.strides, p.kernel, none, none, none, attr);
  if (forward.workspace_desc() != memory::desc(p.dst, memory::data_type::u8, Tag::nhwc)) {
    throw std::runtime_error("its max-pooling workspace is not one byte per output, NHWC");
  }
  auto entry = std::make_shared<PoolEntry>();
  if (backward) {
    dnnl::pooling_backward::primitive_desc pd(engine, dnnl::algorithm::pooling_max, src, dst,
                                              p.strides, p.kernel, none, none, none, forward,
                                              attr);
    entry->primitive = dnnl::pooling_backward(pd);
    entry->scratchpad_bytes = pd.scratchpad_desc().get_size();
  } else {
    entry->primitive = dnnl::pooling_forward(forward);
    entry->scratchpad_bytes = forward.scratchpad_desc().get_size();
  }
  return entry;
}

// x [B, H, W, C] and y [B, H', W', C] (cnnlab's order) -> oneDNN's order.
Pool DescribePool(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, int64_t window,
                  int64_t stride) {
  return Pool{{x[0], x[3], x[1], x[2]}, {y[0], y[3], y[1], y[2]}, {window, window},
              {stride, stride}};
}

ffi::Error RunPool(bool backward, const Pool& p, float* src, float* dst, uint8_t* workspace) {
  try {
    auto entry = Cached<PoolEntry>(p.Key(backward), [&] { return BuildPool(backward, p); });
    auto& engine = Engine();
    const auto f32 = memory::data_type::f32;
    memory src_m(memory::desc(p.src, f32, Tag::nhwc), engine, src);
    memory dst_m(memory::desc(p.dst, f32, Tag::nhwc), engine, dst);
    memory ws(memory::desc(p.dst, memory::data_type::u8, Tag::nhwc), engine, workspace);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SCRATCHPAD, Scratchpad(entry->scratchpad_bytes, ThreadBuffers())},
        {DNNL_ARG_WORKSPACE, ws}};
    if (backward) {
      args.insert({{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_DIFF_DST, dst_m}});
    } else {
      args.insert({{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DST, dst_m}});
    }
    entry->primitive.execute(Stream(), args);
    Stream().wait();
  } catch (const std::exception& e) {  // oneDNN's errors, its workspace check, out of memory
    return ffi::Error::Internal(std::string("oneDNN max pooling: ") + e.what());
  }
  return ffi::Error::Success();
}

bool Empty(ffi::Span<const int64_t> dims) {
  for (int64_t d : dims) {
    if (d == 0) return true;
  }
  return false;
}

}  // namespace

// y = conv(x, w)
static ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                          int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                          int64_t pad_right) {
  if (Empty(y->dimensions())) return ffi::Error::Success();
  Geometry g = Describe(x.dimensions(), w.dimensions(), y->dimensions(), stride_h, stride_w,
                        pad_top, pad_bottom, pad_left, pad_right);
  if (Empty(x.dimensions()) || Empty(w.dimensions())) {
    std::memset(y->typed_data(), 0, y->size_bytes());
    return ffi::Error::Success();
  }
  return Run(Kind::kForward, g, x.typed_data(), w.typed_data(), y->typed_data());
}

// dx = the input gradient of conv(x, w) for the output cotangent dy
static ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                               ffi::ResultBuffer<ffi::F32> dx, int64_t stride_h,
                               int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                               int64_t pad_left, int64_t pad_right) {
  if (Empty(dx->dimensions())) return ffi::Error::Success();
  Geometry g = Describe(dx->dimensions(), w.dimensions(), dy.dimensions(), stride_h, stride_w,
                        pad_top, pad_bottom, pad_left, pad_right);
  if (Empty(dy.dimensions()) || Empty(w.dimensions())) {
    std::memset(dx->typed_data(), 0, dx->size_bytes());
    return ffi::Error::Success();
  }
  return Run(Kind::kBackwardData, g, dx->typed_data(), w.typed_data(), dy.typed_data());
}

// dw = the kernel gradient of conv(x, w) for the output cotangent dy
static ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                  ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                                  int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                                  int64_t pad_left, int64_t pad_right) {
  if (Empty(dw->dimensions())) return ffi::Error::Success();
  Geometry g = Describe(x.dimensions(), dw->dimensions(), dy.dimensions(), stride_h, stride_w,
                        pad_top, pad_bottom, pad_left, pad_right);
  if (Empty(x.dimensions()) || Empty(dy.dimensions())) {
    std::memset(dw->typed_data(), 0, dw->size_bytes());
    return ffi::Error::Success();
  }
  return Run(Kind::kBackwardWeights, g, x.typed_data(), dw->typed_data(), dy.typed_data());
}

// y = the maximum of each window of x, and the workspace that records where it was
static ffi::Error MaxPoolForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                                 ffi::ResultBuffer<ffi::U8> workspace, int64_t window,
                                 int64_t stride) {
  if (Empty(y->dimensions())) return ffi::Error::Success();
  return RunPool(false, DescribePool(x.dimensions(), y->dimensions(), window, stride),
                 x.typed_data(), y->typed_data(), workspace->typed_data());
}

// dx = each output cotangent dy sent to its window's maximum, as the workspace records it
static ffi::Error MaxPoolBackward(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::U8> workspace,
                                  ffi::ResultBuffer<ffi::F32> dx, int64_t window,
                                  int64_t stride) {
  if (Empty(dx->dimensions())) return ffi::Error::Success();
  if (Empty(dy.dimensions())) {
    std::memset(dx->typed_data(), 0, dx->size_bytes());
    return ffi::Error::Success();
  }
  return RunPool(true, DescribePool(dx->dimensions(), dy.dimensions(), window, stride),
                 dx->typed_data(), dy.typed_data(), workspace.typed_data());
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnlabMaxPoolForward, MaxPoolForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnlabMaxPoolBackward, MaxPoolBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride"));

// Two float32 arrays in, one out, and the convolution's strides and padding.
static auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnlabConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnlabConvBackwardData, BackwardData, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnlabConvBackwardWeights, BackwardWeights, Binding());
