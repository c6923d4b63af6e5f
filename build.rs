//! Build script.
//!
//! * default features: nothing to build (the CPU backend is plain Rust).
//! * feature `emulate`: compiles `kernels/*.cu` as host C++ together with the
//!   emulator runtime (`kernels/emu/`) into a shared object with soname
//!   `libcuda.so` — a fake CUDA driver whose kernels run on the host. Its path is
//!   passed to the crate as `AK_EMU_LIB`; it is loaded only by an explicit
//!   `emu::install()`. `AK_EMU_SANITIZE=address` builds it with AddressSanitizer.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(ak_emu_asan)");
    println!("cargo:rerun-if-changed=kernels");
    #[cfg(feature = "emulate")]
    emulate::build();
}

/// Stops the build with one clear message (no panic backtrace).
#[allow(dead_code)]
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

/// `kernels/*.cu` in a stable order.
#[allow(dead_code)]
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(feature = "emulate")]
mod emulate {
    use std::path::PathBuf;
    use std::process::Command;

    pub fn build() {
        println!("cargo:rerun-if-env-changed=AK_EMU_SANITIZE");
        let env = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| super::fail(&format!("cargo did not set {k}")))
        };
        let root = PathBuf::from(env("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env("OUT_DIR")).join("emu");
        if let Err(e) = std::fs::create_dir_all(&out) {
            super::fail(&format!("cannot create {}: {e}", out.display()));
        }
        let kdir = root.join("kernels");
        let mut sources = super::kernel_sources(&kdir);
        sources.push(kdir.join("emu").join("selftest.cu"));
        let compiler = cc::Build::new().cpp(true).get_compiler();
        let lib = out.join("libak_cuda_emu.so");
        let mut cmd = Command::new(compiler.path());
        cmd.args(["-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-pthread"])
            .args(["-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"])
            .arg("-Wl,-soname,libcuda.so")
            .arg("-fvisibility=hidden")
            .arg("-I")
            .arg(&kdir);
        match std::env::var("AK_EMU_SANITIZE").as_deref() {
            Ok("address") => {
                cmd.args(["-fsanitize=address", "-fno-omit-frame-pointer"]);
                println!("cargo:rustc-cfg=ak_emu_asan");
            }
            Ok("") | Err(_) => {}
            Ok(other) => super::fail(&format!(
                "AK_EMU_SANITIZE={other}: only `address` is supported"
            )),
        }
        cmd.arg(kdir.join("emu").join("runtime.cpp"));
        // The kernel files are CUDA sources compiled as C++.
        cmd.args(["-x", "c++"]).args(&sources).args(["-x", "none"]);
        cmd.arg("-o").arg(&lib);
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(_) => super::fail(&format!("compiling the emulated device failed: {cmd:?}")),
            Err(e) => super::fail(&format!(
                "cannot run the C++ compiler {:?}: {e}",
                compiler.path()
            )),
        }
        println!("cargo:rustc-env=AK_EMU_LIB={}", lib.display());
    }
}
