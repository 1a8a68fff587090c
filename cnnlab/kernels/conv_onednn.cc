// 2-D convolution on the CPU through oneDNN, the library behind PyTorch's CPU convolutions, as
// three XLA FFI handlers: the forward pass, the input gradient (backward data) and the kernel
// gradient (backward weights). `cnnlab/kernels/__init__.py` compiles this file, loads it and
// registers the handlers with JAX; `cnnlab/models/conv.py` calls them.
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
#include <memory>
#include <mutex>
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

// The geometry of one convolution, in oneDNN's logical order (N, C, H, W and O, I, H, W).
struct Geometry {
  memory::dims src, weights, dst, strides, pad_l, pad_r;

  std::string Key(Kind kind) const {
    std::string key = std::to_string(static_cast<int>(kind));
    for (const memory::dims* d : {&src, &weights, &dst, &strides, &pad_l, &pad_r}) {
      for (int64_t v : *d) key += "," + std::to_string(v);
      key += ";";
    }
    return key;
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
  size_t scratchpad_bytes;
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
  if (entry->reorder) {
    entry->reorder_primitive =
        kind == Kind::kBackwardWeights
            ? dnnl::reorder(dnnl::reorder::primitive_desc(engine, entry->weights, engine,
                                                          entry->user_weights))
            : dnnl::reorder(dnnl::reorder::primitive_desc(engine, entry->user_weights, engine,
                                                          entry->weights));
  }
  return entry;
}

std::shared_ptr<Entry> Lookup(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<Entry>> cache;
  const std::string key = g.Key(kind);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto entry = Build(kind, g);
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
    auto entry = Lookup(kind, g);
    auto& engine = Engine();
    thread_local dnnl::stream stream(engine);
    thread_local Buffers buffers;
    memory src_m(memory::desc(g.src, memory::data_type::f32, Tag::nhwc), engine, src);
    memory dst_m(memory::desc(g.dst, memory::data_type::f32, Tag::nhwc), engine, dst);
    memory user_w(entry->user_weights, engine, weights);
    memory w = entry->reorder
                   ? memory(entry->weights, engine, buffers.Weights(entry->weights.get_size()))
                   : user_w;
    if (entry->reorder && kind != Kind::kBackwardWeights) {
      entry->reorder_primitive.execute(stream, user_w, w);
    }
    memory scratchpad(memory::desc({static_cast<int64_t>(entry->scratchpad_bytes)},
                                   memory::data_type::u8, Tag::a),
                      engine, buffers.Scratchpad(entry->scratchpad_bytes));
    std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, scratchpad}};
    if (kind == Kind::kForward) {
      args.insert({{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst_m}});
    } else if (kind == Kind::kBackwardData) {
      args.insert({{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_DST, dst_m}});
    } else {
      args.insert({{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, w}, {DNNL_ARG_DIFF_DST, dst_m}});
    }
    entry->primitive.execute(stream, args);
    if (entry->reorder && kind == Kind::kBackwardWeights) {
      entry->reorder_primitive.execute(stream, w, user_w);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
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
