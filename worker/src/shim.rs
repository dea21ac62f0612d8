//! Calling the C++ shim (`worker/shim`): every entry point catches C++ exceptions
//! (`shim/guard.h`), returns a status and writes the exception's message into a buffer the
//! caller passes.
use std::ffi::{c_char, c_int, CStr};

use tch::TchError;

/// Runs one shim entry point with an error buffer; a non-zero status becomes its message.
pub(crate) fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), TchError> {
    let mut err = [0 as c_char; 1024];
    if f(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim wrote a NUL-terminated message (the buffer ends with a NUL anyway).
    let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(TchError::Torch(message))
}
