//! Build script. With default features there is nothing to build: the CPU backend
//! is plain Rust. The CUDA kernels in `kernels/` are compiled here once the `cuda`
//! feature exists (see the README's feature table for its status).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
