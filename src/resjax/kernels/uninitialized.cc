// resjax_uninitialized () -> out: a buffer of XLA's, left as the allocator gave it.
//
// lax.scan's stacked outputs start as a broadcast of zeros that the loop then overwrites row by
// row, so every step of a deep CPU program fills hundreds of MiB it never reads. resjax's scans
// start them from this call instead (resjax/kernels/stacks.py). The call writes nothing.

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error Uninitialized(ffi::Result<ffi::AnyBuffer> out) {
  (void)out;
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxUninitialized, Uninitialized,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
