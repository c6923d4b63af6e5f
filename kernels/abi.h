// abi.h — every struct passed by value to a kernel, declared once. The Rust
// mirror is src/cuda/abi.rs (#[repr(C)], with layout tests). Plain C: fixed-width
// integer fields, no padding surprises (order fields largest first).
#pragma once
#include <stdint.h>

// ---- iieu ----------------------------------------------------------------


// ---- iieu_dc -------------------------------------------------------------


// ---- acon ----------------------------------------------------------------


// ---- aiec ----------------------------------------------------------------


// ---- end ------------------------------------------------------------------
