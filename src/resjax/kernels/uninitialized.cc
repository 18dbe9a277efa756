// resjax_uninitialized () -> out: a buffer of XLA's, left as the allocator gave it.
//
// lax.scan's stacked outputs start as a broadcast of zeros that the loop then overwrites row by
// row, so every step of a deep CPU program fills hundreds of MiB it never reads. resjax's scans
// start them from this call instead (resjax/kernels/stacks.py). The call writes nothing.

#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error Uninitialized(ffi::Result<ffi::AnyBuffer> out) {
  (void)out;
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxUninitialized, Uninitialized,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());

// resjax_materialize (x) -> x, the same buffer (the result aliases the operand). XLA fuses a cheap
// elementwise producer into each of its consumers, so a value that is both a convolution's input
// and a row of a scan stack is computed twice, the second time inside the stack's in-place write,
// which XLA:CPU runs on one thread. Behind this call the value exists once and the stack's write is
// a copy (resjax/kernels/stacks.py).
static ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  if (x.untyped_data() != out->untyped_data()) {  // not aliased after all: copy
    std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxMaterialize, Materialize,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

// resjax_write_row (stack, row, i) -> stack with row i replaced (the result aliases the stack): a
// scan's stack write on CPU where the row is a custom call's value (resjax/kernels/stacks.py),
// split between the OpenMP team that runs the convolutions. Its worker is hot where XLA's
// pool has one thread (kernels.one_pool_thread); with a pool thread per core, each a team's master,
// the split stalled whenever a thread was preempted mid-chunk (README, Speed). The row is read
// again only by the backward pass, long after, so it is written with non-temporal stores: straight
// to memory, without first reading the destination's cache lines or evicting the next
// convolution's operands. i is clamped to the stack, as XLA's dynamic update slices are.

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <omp.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

// memcpy, the 16-byte-aligned middle of dst by non-temporal stores where SSE2 has them.
void StreamCopy(char* dst, const char* src, std::size_t bytes) {
#if defined(__SSE2__)
  const std::size_t head = std::min(bytes, (16 - reinterpret_cast<std::uintptr_t>(dst) % 16) % 16);
  std::memcpy(dst, src, head);
  std::size_t k = head;
  for (; k + 64 <= bytes; k += 64) {
    const __m128i* s = reinterpret_cast<const __m128i*>(src + k);
    __m128i* d = reinterpret_cast<__m128i*>(dst + k);
    __m128i a = _mm_loadu_si128(s), b = _mm_loadu_si128(s + 1), c = _mm_loadu_si128(s + 2),
            e = _mm_loadu_si128(s + 3);
    _mm_stream_si128(d, a);
    _mm_stream_si128(d + 1, b);
    _mm_stream_si128(d + 2, c);
    _mm_stream_si128(d + 3, e);
  }
  _mm_sfence();  // the streamed lines visible before anything after the call reads them
  std::memcpy(dst + k, src + k, bytes - k);
#else
  std::memcpy(dst, src, bytes);
#endif
}

std::size_t RowOffset(const ffi::AnyBuffer& stack, std::size_t row_bytes, std::int32_t i) {
  const std::int64_t rows = stack.dimensions().size() == 0 ? 1 : stack.dimensions()[0];
  const std::int64_t clamped = std::clamp<std::int64_t>(i, 0, std::max<std::int64_t>(rows - 1, 0));
  return static_cast<std::size_t>(clamped) * row_bytes;
}

}  // namespace

static ffi::Error WriteRow(ffi::AnyBuffer stack, ffi::AnyBuffer row,
                           ffi::Buffer<ffi::DataType::S32> index,
                           ffi::Result<ffi::AnyBuffer> out) {
  char* dst = static_cast<char*>(out->untyped_data());
  if (stack.untyped_data() != dst) {  // not aliased after all: start from the stack
    std::memcpy(dst, stack.untyped_data(), stack.size_bytes());
  }
  const std::size_t bytes = row.size_bytes();
  if (bytes == 0) return ffi::Error::Success();
  char* to = dst + RowOffset(stack, bytes, index.typed_data()[0]);
  const char* from = static_cast<const char*>(row.untyped_data());
  // A part per thread of the team, of whole pages and at least 256 KiB.
  const int parts = static_cast<int>(
      std::clamp<std::size_t>(bytes >> 18, 1, static_cast<std::size_t>(omp_get_max_threads())));
  const std::size_t part_bytes = (bytes / parts + 4095) / 4096 * 4096;
#pragma omp parallel for num_threads(parts) if (parts > 1)
  for (int part = 0; part < parts; ++part) {
    const std::size_t lo = std::min(bytes, part * part_bytes);
    const std::size_t hi = std::min(bytes, lo + part_bytes);
    if (hi > lo) StreamCopy(to + lo, from + lo, hi - lo);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxWriteRow, WriteRow,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::DataType::S32>>()
                                  .Ret<ffi::AnyBuffer>());
