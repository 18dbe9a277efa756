// resjax's CPU convolution: oneDNN's direct convolution as three XLA FFI custom calls.
//
//   resjax_onednn_conv_fwd           (x, w)          -> y    y = conv(x, w)
//   resjax_onednn_conv_bwd_weights   (x, dy)         -> dw   the gradient with respect to w
//   resjax_onednn_conv_bwd_data      (dy, w, after)  -> dx   the gradient with respect to x
//
// `after` is the weight gradient, unread: it makes the data gradient wait for it, so that XLA never
// runs the two at once (each with a full OpenMP team, twice the threads the machine has), while a
// data gradient nobody uses (the first layer's, whose input is the images) is still removed as
// dead code.
//
// Activations are NHWC and kernels HWIO, float32, with attributes `stride` and `pad` (zero padding
// `pad` on the top and left; on the bottom and right whatever the output size leaves, as XLA's
// convolution with symmetric padding computes). oneDNN reads and writes the activations in place;
// the kernel goes to (or comes from) the layout the chosen implementation wants through a reorder.
//
// Creating a oneDNN primitive costs far more than running one on CIFAR-sized tensors, so each is
// made once per (direction, shapes, stride, pad) and kept. Execution uses a scratchpad owned by
// the calling thread, so XLA may run several of these calls at once.
//
// Build: python -m resjax.kernels build (see resjax/kernels/__init__.py).

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Direction : int { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// One convolution's geometry, in oneDNN's logical (N, C, H, W) / (O, I, KH, KW) order.
struct Geometry {
  int64_t n, c, h, w, o, kh, kw, oh, ow, stride, pad;

  memory::dims src() const { return {n, c, h, w}; }
  memory::dims wei() const { return {o, c, kh, kw}; }
  memory::dims dst() const { return {n, o, oh, ow}; }
  memory::dims strides() const { return {stride, stride}; }
  memory::dims pad_l() const { return {pad, pad}; }
  // What the output size leaves of the padding at the bottom and right (oneDNN wants it exact).
  memory::dims pad_r() const {
    return {(oh - 1) * stride + kh - h - pad, (ow - 1) * stride + kw - w - pad};
  }
  std::string key(Direction d) const {
    std::string k = std::to_string(d);
    for (int64_t v : {n, c, h, w, o, kh, kw, oh, ow, stride, pad}) k += "," + std::to_string(v);
    return k;
  }
};

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc plain(const memory::dims& dims, tag t) {
  return memory::desc(dims, memory::data_type::f32, t);
}

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc forward_desc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      plain(g.src(), tag::nhwc), plain(g.wei(), tag::any), plain(g.dst(), tag::nhwc),
      g.strides(), g.pad_l(), g.pad_r(), user_scratchpad());
}

// A primitive with what it needs around it: the kernel's layout inside the primitive, and the
// reorder between it and HWIO where the two differ.
struct Entry {
  dnnl::primitive prim;
  memory::desc kernel;  // the primitive's weights (or diff_weights) layout
  memory::desc scratchpad;
  bool reorder = false;
  // Where each HWIO element of the kernel sits in `kernel` (a blocked layout), and whether the
  // layout pads the channels (the padding must then be zeros). Empty: oneDNN's reorder instead.
  std::vector<int64_t> offsets;
  bool padded = false;
  dnnl::reorder to_or_from_hwio;
};

// The offsets of a kernel's elements, in HWIO order, in the blocked layout `desc` (oneDNN's
// blocking: outer strides over the dimensions divided by their blocks, then the inner blocks,
// innermost last). Empty where `desc` is not a plain blocked layout.
std::vector<int64_t> blocked_offsets(const memory::desc& desc, const Geometry& g) {
  if (desc.get_format_kind() != memory::format_kind::blocked) return {};
  for (int64_t p : desc.get_padded_offsets()) {
    if (p != 0) return {};
  }
  memory::dims strides = desc.get_strides(), blks = desc.get_inner_blks(),
               idxs = desc.get_inner_idxs();
  const int nblks = desc.get_inner_nblks();
  int64_t per_dim[4] = {1, 1, 1, 1};  // each logical dimension's product of inner blocks
  for (int k = 0; k < nblks; ++k) per_dim[idxs[k]] *= blks[k];
  std::vector<int64_t> out;
  out.reserve(g.kh * g.kw * g.c * g.o);
  for (int64_t h = 0; h < g.kh; ++h)
    for (int64_t w = 0; w < g.kw; ++w)
      for (int64_t i = 0; i < g.c; ++i)
        for (int64_t o = 0; o < g.o; ++o) {
          const int64_t x[4] = {o, i, h, w};  // oneDNN's logical (O, I, KH, KW)
          int64_t off = 0, inner_stride = 1, below[4] = {1, 1, 1, 1};
          for (int d = 0; d < 4; ++d) off += x[d] / per_dim[d] * strides[d];
          for (int k = nblks - 1; k >= 0; --k) {  // innermost block first
            off += x[idxs[k]] / below[idxs[k]] % blks[k] * inner_stride;
            below[idxs[k]] *= blks[k];
            inner_stride *= blks[k];
          }
          out.push_back(off);
        }
  return out;
}

Entry make(Direction d, const Geometry& g) {
  auto fwd = forward_desc(g);
  memory::desc hwio = plain(g.wei(), tag::hwio);
  Entry e;
  if (d == kForward) {
    e.prim = dnnl::convolution_forward(fwd);
    e.kernel = fwd.weights_desc();
    e.scratchpad = fwd.scratchpad_desc();
  } else if (d == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        cpu_engine(), dnnl::algorithm::convolution_direct, plain(g.src(), tag::nhwc),
        plain(g.wei(), tag::any), plain(g.dst(), tag::nhwc), g.strides(), g.pad_l(), g.pad_r(),
        fwd, user_scratchpad());
    e.prim = dnnl::convolution_backward_data(pd);
    e.kernel = pd.weights_desc();
    e.scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        cpu_engine(), dnnl::algorithm::convolution_direct, plain(g.src(), tag::nhwc),
        plain(g.wei(), tag::any), plain(g.dst(), tag::nhwc), g.strides(), g.pad_l(), g.pad_r(),
        fwd, user_scratchpad());
    e.prim = dnnl::convolution_backward_weights(pd);
    e.kernel = pd.diff_weights_desc();
    e.scratchpad = pd.scratchpad_desc();
  }
  e.reorder = e.kernel != hwio;
  if (e.reorder) {
    e.offsets = blocked_offsets(e.kernel, g);
    e.padded = e.kernel.get_size() != hwio.get_size();
    e.to_or_from_hwio = d == kBackwardWeights
                            ? dnnl::reorder(memory(e.kernel, cpu_engine()), memory(hwio, cpu_engine()))
                            : dnnl::reorder(memory(hwio, cpu_engine()), memory(e.kernel, cpu_engine()));
  }
  return e;
}

const Entry& lookup(Direction d, const Geometry& g) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<Entry>> cache;
  std::string k = g.key(d);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(k);
  if (it == cache.end()) it = cache.emplace(k, std::make_unique<Entry>(make(d, g))).first;
  return *it->second;
}

// A buffer owned by the calling thread that only grows: scratchpads and reordered kernels.
void* thread_buffer(int slot, size_t bytes) {
  thread_local std::vector<char> buffers[2];
  if (buffers[slot].size() < bytes + 64) buffers[slot].resize(bytes + 64);
  auto p = reinterpret_cast<uintptr_t>(buffers[slot].data());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
}

// HWIO `hwio` into (or, for the weight gradient, out of) the primitive's kernel layout. A plain
// loop over the offsets where the layout is blocked: oneDNN's reorder took 60-75 us a call
// whatever the kernel's size, 22 ms of a ResNet-110 step (README, Speed).
void reorder(const Entry& e, dnnl::stream& stream, memory& hwio, memory& kernel, bool to_hwio) {
  if (e.offsets.empty()) {
    if (to_hwio) {
      e.to_or_from_hwio.execute(stream, kernel, hwio);
    } else {
      e.to_or_from_hwio.execute(stream, hwio, kernel);
    }
    return;
  }
  float* plain = static_cast<float*>(hwio.get_data_handle());
  float* blocked = static_cast<float*>(kernel.get_data_handle());
  const int64_t n = static_cast<int64_t>(e.offsets.size());
  if (to_hwio) {
    for (int64_t j = 0; j < n; ++j) plain[j] = blocked[e.offsets[j]];
  } else {
    if (e.padded) std::fill_n(blocked, e.kernel.get_size() / sizeof(float), 0.0f);
    for (int64_t j = 0; j < n; ++j) blocked[e.offsets[j]] = plain[j];
  }
}

ffi::Error run(Direction d, const Geometry& g, void* act, void* other, void* out) {
  try {
    const Entry& e = lookup(d, g);
    dnnl::engine& eng = cpu_engine();
    dnnl::stream stream(eng);
    memory hwio(plain(g.wei(), tag::hwio), eng, d == kBackwardWeights ? out : other);
    memory kernel = hwio;
    if (e.reorder) kernel = memory(e.kernel, eng, thread_buffer(0, e.kernel.get_size()));
    memory scratch(e.scratchpad, eng, thread_buffer(1, e.scratchpad.get_size()));
    memory src(plain(g.src(), tag::nhwc), eng);
    memory dst(plain(g.dst(), tag::nhwc), eng);
    if (d == kForward) {
      src.set_data_handle(act);
      dst.set_data_handle(out);
      if (e.reorder) reorder(e, stream, hwio, kernel, false);
      e.prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, kernel},
                              {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (d == kBackwardData) {
      dst.set_data_handle(act);  // dy
      src.set_data_handle(out);  // dx
      if (e.reorder) reorder(e, stream, hwio, kernel, false);
      e.prim.execute(stream, {{DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_WEIGHTS, kernel},
                              {DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      src.set_data_handle(act);    // x
      dst.set_data_handle(other);  // dy
      e.prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, dst},
                              {DNNL_ARG_DIFF_WEIGHTS, kernel}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (e.reorder) reorder(e, stream, hwio, kernel, true);
    }
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + err.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;
using Dims = F32::Dimensions;

// The last four of a buffer's dimensions are its convolution's; any before them are replicas
// (resjax's seeds under vmap, which hands every operand the output's leading dimensions, or 1s
// where the operand is shared). Each replica is one convolution.
int64_t rows(Dims d) { return d.size() - 4; }
const int64_t* conv_dims(Dims d) { return d.begin() + rows(d); }
int64_t elements(const int64_t* d) { return d[0] * d[1] * d[2] * d[3]; }

ffi::Error each_replica(Direction dir, Dims a, Dims b, Dims out, const Geometry& g, float* pa,
                        float* pb, float* pout) {
  if (a.size() < 4 || a.size() != b.size() || a.size() != out.size()) {
    return ffi::Error::InvalidArgument("the oneDNN convolution takes NHWC/HWIO operands with the "
                                       "same number of leading (vmapped) dimensions");
  }
  int64_t lead = rows(out), count = 1;
  for (int64_t i = 0; i < lead; ++i) {
    if ((a[i] != out[i] && a[i] != 1) || (b[i] != out[i] && b[i] != 1)) {
      return ffi::Error::InvalidArgument("vmapped operands of the oneDNN convolution do not "
                                         "broadcast to its output");
    }
    count *= out[i];
  }
  int64_t sa = elements(conv_dims(a)), sb = elements(conv_dims(b)), so = elements(conv_dims(out));
  for (int64_t r = 0; r < count; ++r) {
    // The replica's index in each operand: its multi-index, with shared dimensions held at 0.
    int64_t ia = 0, ib = 0, rest = r, stride_a = 1, stride_b = 1;
    for (int64_t i = lead - 1; i >= 0; --i) {
      int64_t idx = rest % out[i];
      rest /= out[i];
      if (a[i] != 1) ia += idx * stride_a;
      if (b[i] != 1) ib += idx * stride_b;
      stride_a *= a[i];
      stride_b *= b[i];
    }
    ffi::Error e = run(dir, g, pa + ia * sa, pb + ib * sb, pout + r * so);
    if (!e.success()) return e;
  }
  return ffi::Error::Success();
}

// Geometry from an NHWC input, an HWIO kernel and an NHWC output (their last four dimensions).
Geometry geometry(const int64_t* x, const int64_t* w, const int64_t* y, int64_t stride,
                  int64_t pad) {
  return {x[0], x[3], x[1], x[2], w[3], w[0], w[1], y[1], y[2], stride, pad};
}

ffi::Error Forward(F32 x, F32 w, F32Out y, int64_t stride, int64_t pad) {
  Dims dx = x.dimensions(), dw = w.dimensions(), dy = y->dimensions();
  Geometry g = geometry(conv_dims(dx), conv_dims(dw), conv_dims(dy), stride, pad);
  return each_replica(kForward, dx, dw, dy, g, x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error BackwardWeights(F32 x, F32 dy, F32Out dw, int64_t stride, int64_t pad) {
  Dims sx = x.dimensions(), sdy = dy.dimensions(), sw = dw->dimensions();
  Geometry g = geometry(conv_dims(sx), conv_dims(sw), conv_dims(sdy), stride, pad);
  return each_replica(kBackwardWeights, sx, sdy, sw, g, x.typed_data(), dy.typed_data(),
                      dw->typed_data());
}

// The same weight gradient with x read in place as row i of a stack of them (a scan's saved
// inputs, see stacks.py): i clamped to the stack, as a dynamic slice would.
ffi::Error BackwardWeightsRow(F32 stack, ffi::Buffer<ffi::S32> index, F32 dy, F32Out dw,
                              int64_t stride, int64_t pad) {
  Dims s = stack.dimensions();
  if (s.size() < 5) {
    return ffi::Error::InvalidArgument("the row weight gradient takes a stack of NHWC inputs");
  }
  Dims sx = s.last(s.size() - 1), sdy = dy.dimensions(), sw = dw->dimensions();
  int64_t row = 1;
  for (int64_t d : sx) row *= d;
  int64_t i = std::clamp<int64_t>(index.typed_data()[0], 0, std::max<int64_t>(s[0] - 1, 0));
  Geometry g = geometry(conv_dims(sx), conv_dims(sw), conv_dims(sdy), stride, pad);
  return each_replica(kBackwardWeights, sx, sdy, sw, g, stack.typed_data() + i * row,
                      dy.typed_data(), dw->typed_data());
}

ffi::Error BackwardData(F32 dy, F32 w, F32 after, F32Out dx, int64_t stride, int64_t pad) {
  (void)after;
  Dims sdy = dy.dimensions(), sw = w.dimensions(), sx = dx->dimensions();
  Geometry g = geometry(conv_dims(sx), conv_dims(sw), conv_dims(sdy), stride, pad);
  return each_replica(kBackwardData, sdy, sw, sx, g, dy.typed_data(), w.typed_data(),
                      dx->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxOnednnConvFwd, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("pad"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxOnednnConvBwdWeights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("pad"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxOnednnConvBwdWeightsRow, BackwardWeightsRow,
                              ffi::Ffi::Bind().Arg<F32>().Arg<ffi::Buffer<ffi::S32>>().Arg<F32>()
                                  .Ret<F32>().Attr<int64_t>("stride").Attr<int64_t>("pad"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxOnednnConvBwdData, BackwardData,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("pad"));

// The linked oneDNN's version, for the build's provenance: major * 10000 + minor * 100 + patch.
extern "C" int resjax_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
