// abi.h — structs passed by value to kernels. Declared once here; the Rust side
// (src/cuda/abi.rs) mirrors them with #[repr(C)] and layout tests.
#pragma once
#include <stdint.h>
