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
