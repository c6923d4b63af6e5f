//! Build script.
//!
//! * default features: nothing to build (the CPU backend is plain Rust).
//! * feature `emulate`: compiles `kernels/*.cu` as host C++ together with the
//!   emulator runtime (`kernels/emu/`) into a shared object with soname
//!   `libcuda.so` — a fake CUDA driver whose kernels run on the host. Its path is
//!   passed to the crate as `AK_EMU_LIB`; it is loaded only by an explicit
//!   `emu::install()`. `AK_EMU_SANITIZE=address` builds it with AddressSanitizer.
//! * features `emulate` + `candle-cuda`: candle-core's `cuda` makes cudarc link the
//!   CUDA libraries (`-lcuda -lcublas -lcublasLt -lcurand -lnvrtc`, and candle-kernels
//!   `-lcudart`). This machine-independent test setup provides them in
//!   `OUT_DIR/emu/lib`: `libcuda.so` is the emulated driver itself (plus weak stubs
//!   for the driver entry points it does not implement) and the others are stub
//!   libraries (kernels/emu/stubs.cpp). The directory is a link search path and the
//!   rpath of this package's test/example/bench binaries, and of nothing else.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(ak_emu_asan)");
    println!("cargo:rerun-if-changed=kernels");
    #[cfg(feature = "emulate")]
    emulate::build();
    #[cfg(feature = "cuda")]
    nvcc::build();
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
        let emu = kdir.join("emu");
        let mut sources = super::kernel_sources(&kdir);
        sources.push(emu.join("selftest.cu"));
        let compiler = cc::Build::new().cpp(true).get_compiler();
        let asan = match std::env::var("AK_EMU_SANITIZE").as_deref() {
            Ok("address") => true,
            Ok("") | Err(_) => false,
            Ok(other) => super::fail(&format!(
                "AK_EMU_SANITIZE={other}: only `address` is supported"
            )),
        };
        if asan {
            println!("cargo:rustc-cfg=ak_emu_asan");
        }
        write_ptxas_table(&emu, &out);
        let base = |cmd: &mut Command| {
            cmd.args(["-std=c++17", "-O2", "-g", "-fPIC", "-pthread"])
                .args(["-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"])
                .arg("-fvisibility=hidden")
                .arg("-I")
                .arg(&kdir)
                .arg("-I")
                .arg(&out);
            if asan {
                cmd.args(["-fsanitize=address", "-fno-omit-frame-pointer"]);
            }
        };
        // The kernels: every load, store and atomic instrumented (GCC's ThreadSanitizer
        // pass, without its runtime: the hooks are the emulator's shadow memory,
        // kernels/emu/shadow.cpp). ASan and TSan instrumentation exclude each other, so
        // the AddressSanitizer build has no access hooks (the detectors are off there).
        let mut jobs = Vec::new();
        let mut objects = Vec::new();
        for src in &sources {
            let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
            let obj = out.join(format!("{stem}.o"));
            let mut cmd = Command::new(compiler.path());
            base(&mut cmd);
            if !asan {
                cmd.args([
                    "-fsanitize=thread",
                    "--param=tsan-instrument-func-entry-exit=0",
                    "-Wno-tsan",
                ]);
            }
            cmd.args(["-x", "c++", "-c"]).arg(src).arg("-o").arg(&obj);
            let child = cmd.spawn().unwrap_or_else(|e| {
                super::fail(&format!(
                    "cannot run the C++ compiler {:?}: {e}",
                    compiler.path()
                ))
            });
            jobs.push((child, format!("{cmd:?}")));
            objects.push(obj);
        }
        for (mut child, what) in jobs {
            match child.wait() {
                Ok(s) if s.success() => {}
                _ => super::fail(&format!(
                    "compiling a kernel for the emulated device failed: {what}"
                )),
            }
        }
        let lib = out.join("libak_cuda_emu.so");
        let mut cmd = Command::new(compiler.path());
        base(&mut cmd);
        cmd.args(["-shared", "-Wl,-soname,libcuda.so", "-Wl,--no-undefined"]);
        if !asan {
            cmd.arg("-DEMU_INSTRUMENTED=1");
        }
        for part in ["sched.cpp", "shadow.cpp", "driver.cpp"] {
            cmd.arg(emu.join(part));
        }
        #[cfg(feature = "candle-cuda")]
        cmd.arg(stubs::weak_file(&kdir, &out, "cuda"));
        cmd.args(&objects);
        cmd.arg("-o").arg(&lib);
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(_) => super::fail(&format!("linking the emulated device failed: {cmd:?}")),
            Err(e) => super::fail(&format!(
                "cannot run the C++ compiler {:?}: {e}",
                compiler.path()
            )),
        }
        println!("cargo:rustc-env=AK_EMU_LIB={}", lib.display());
        #[cfg(feature = "candle-cuda")]
        stubs::link_dir(&kdir, &out, &lib, compiler.path());
    }

    /// `OUT/ptxas_table.inc` from kernels/emu/ptxas-table.tsv (kernel, sm, registers,
    /// static shared bytes per line; written by scripts/kernel-report.sh from an nvcc
    /// build): the registers and static shared memory the emulated driver checks
    /// launches against. A missing file gives an empty table (no register checks).
    fn write_ptxas_table(emu: &std::path::Path, out: &std::path::Path) {
        let tsv = std::fs::read_to_string(emu.join("ptxas-table.tsv")).unwrap_or_default();
        let mut src = String::from(
            "// generated by build.rs from kernels/emu/ptxas-table.tsv\n\
             struct PtxasEntry { const char* kernel; int sm, regs, smem; };\n\
             static const PtxasEntry kPtxasTable[] = {\n",
        );
        for line in tsv.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            if line.starts_with('#') || f.len() != 4 {
                continue;
            }
            let ok = f[0].chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && f[1..].iter().all(|v| v.parse::<u32>().is_ok());
            if !ok {
                super::fail(&format!("kernels/emu/ptxas-table.tsv: bad line `{line}`"));
            }
            src.push_str(&format!(
                "  {{\"{}\", {}, {}, {}}},\n",
                f[0], f[1], f[2], f[3]
            ));
        }
        src.push_str("  {nullptr, 0, 0, 0}};\n");
        let path = out.join("ptxas_table.inc");
        if let Err(e) = std::fs::write(&path, src) {
            super::fail(&format!("cannot write {}: {e}", path.display()));
        }
    }

    /// The CUDA libraries cudarc links under candle-core's `cuda` (see the module doc).
    #[cfg(feature = "candle-cuda")]
    mod stubs {
        use std::path::{Path, PathBuf};
        use std::process::Command;

        /// (library, macro, "not supported" status of that library). Each status is
        /// a valid variant of cudarc's enum for that library's status type.
        const LIBS: &[(&str, &str, i32)] = &[
            ("cublas", "AK_STUB_CUBLAS", 15),     // CUBLAS_STATUS_NOT_SUPPORTED
            ("cublasLt", "AK_STUB_CUBLASLT", 15), // CUBLAS_STATUS_NOT_SUPPORTED
            ("curand", "AK_STUB_CURAND", 999),    // CURAND_STATUS_INTERNAL_ERROR
            ("nvrtc", "AK_STUB_NVRTC", 11),       // NVRTC_ERROR_INTERNAL_ERROR
            ("cudart", "AK_STUB_CUDART", 801),    // cudaErrorNotSupported
        ];
        /// CUDA_ERROR_NOT_SUPPORTED, for driver entry points the emulator lacks.
        const DRIVER_ERR: i32 = 801;

        /// Writes `OUT/stubs_<lib>.cpp`: one weak, exported definition per symbol in
        /// kernels/emu/stubs/lib<lib>.txt (a strong definition elsewhere in the same
        /// shared object wins).
        pub fn weak_file(kdir: &Path, out: &Path, lib: &str) -> PathBuf {
            let err = if lib == "cuda" {
                DRIVER_ERR
            } else {
                LIBS.iter().find(|l| l.0 == lib).map(|l| l.2).unwrap_or(1)
            };
            let list = kdir.join("emu").join("stubs").join(format!("lib{lib}.txt"));
            let text = std::fs::read_to_string(&list).unwrap_or_else(|e| {
                super::super::fail(&format!("cannot read {}: {e}", list.display()))
            });
            let mut src = format!(
                "// generated by build.rs from {}\n#define W extern \"C\" __attribute__((weak, visibility(\"default\")))\n",
                list.display()
            );
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let mut it = line.split_whitespace();
                let (Some(name), kind) = (it.next(), it.next().unwrap_or("status")) else {
                    continue;
                };
                src.push_str(&match kind {
                    "status" => format!("W int {name}() {{ return {err}; }}\n"),
                    "str" => format!(
                        "W const char* {name}() {{ return \"not supported on the emulated CUDA device\"; }}\n"
                    ),
                    "void" => format!("W void {name}() {{}}\n"),
                    _ => format!("W long {name}() {{ return 0; }}\n"),
                });
            }
            let path = out.join(format!("stubs_{lib}.cpp"));
            if let Err(e) = std::fs::write(&path, src) {
                super::super::fail(&format!("cannot write {}: {e}", path.display()));
            }
            path
        }

        /// `OUT/lib`: `libcuda.so` -> the emulator, and the stub libraries; a link
        /// search path and the rpath of this package's binaries.
        pub fn link_dir(kdir: &Path, out: &Path, emu_lib: &Path, cxx: &Path) {
            let dir = out.join("lib");
            if let Err(e) = std::fs::create_dir_all(&dir) {
                super::super::fail(&format!("cannot create {}: {e}", dir.display()));
            }
            let cuda = dir.join("libcuda.so");
            let _ = std::fs::remove_file(&cuda);
            // A symlink, not a copy: the dynamic loader then sees one file, so the
            // library this binary was linked against and `emu::install()`'s dlopen of
            // AK_EMU_LIB are the same loaded object.
            if let Err(e) = std::os::unix::fs::symlink(emu_lib, &cuda) {
                super::super::fail(&format!("cannot link {}: {e}", cuda.display()));
            }
            for (lib, def, _) in LIBS {
                let weak = weak_file(kdir, out, lib);
                let so = dir.join(format!("lib{lib}.so"));
                let mut cmd = Command::new(cxx);
                cmd.args([
                    "-std=c++17",
                    "-O1",
                    "-fPIC",
                    "-shared",
                    "-fvisibility=hidden",
                ])
                .arg(format!("-D{def}"))
                .arg(format!("-Wl,-soname,lib{lib}.so"))
                .arg(kdir.join("emu").join("stubs.cpp"))
                .arg(&weak)
                .arg("-o")
                .arg(&so);
                match cmd.status() {
                    Ok(s) if s.success() => {}
                    _ => super::super::fail(&format!(
                        "building the stub {} failed: {cmd:?}",
                        so.display()
                    )),
                }
            }
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        }
    }
}

#[cfg(feature = "cuda")]
mod nvcc {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Default targets: SASS for Turing..Hopper, plus PTX of the newest for JIT on
    /// later GPUs. Override with AK_CUDA_ARCHS="80,86" or CUDA_COMPUTE_CAP=86.
    const DEFAULT_ARCHS: &[u32] = &[75, 80, 86, 89, 90];

    fn find_nvcc() -> Option<PathBuf> {
        for var in ["NVCC"] {
            if let Some(p) = std::env::var_os(var) {
                return Some(PathBuf::from(p));
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let c = dir.join("nvcc");
                if c.is_file() {
                    return Some(c);
                }
            }
        }
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(p) = std::env::var_os(var) {
                let c = Path::new(&p).join("bin").join("nvcc");
                if c.is_file() {
                    return Some(c);
                }
            }
        }
        let c = PathBuf::from("/usr/local/cuda/bin/nvcc");
        c.is_file().then_some(c)
    }

    fn archs() -> Vec<u32> {
        let parse = |s: String| -> Vec<u32> {
            s.split([',', ' ', ';'])
                .filter(|t| !t.is_empty())
                .map(|t| {
                    t.trim_start_matches("sm_").parse().unwrap_or_else(|_| {
                        super::fail(&format!(
                            "bad CUDA arch `{t}` in AK_CUDA_ARCHS/CUDA_COMPUTE_CAP"
                        ))
                    })
                })
                .collect()
        };
        if let Ok(s) = std::env::var("AK_CUDA_ARCHS") {
            return parse(s);
        }
        if let Ok(s) = std::env::var("CUDA_COMPUTE_CAP") {
            return parse(s);
        }
        DEFAULT_ARCHS.to_vec()
    }

    pub fn build() {
        for v in [
            "NVCC",
            "PATH",
            "CUDA_HOME",
            "CUDA_PATH",
            "AK_CUDA_ARCHS",
            "CUDA_COMPUTE_CAP",
        ] {
            println!("cargo:rerun-if-env-changed={v}");
        }
        let Some(nvcc) = find_nvcc() else {
            super::fail(
                "feature `cuda` needs nvcc, and none was found (NVCC, PATH, CUDA_HOME, CUDA_PATH, \
                 /usr/local/cuda). Install it without a GPU with scripts/install-cuda-toolchain.sh, then \
                 export NVCC=$PWD/.cuda-toolchain/nvidia/cu13/bin/nvcc",
            )
        };
        let env = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| super::fail(&format!("cargo did not set {k}")))
        };
        let root = PathBuf::from(env("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env("OUT_DIR"));
        let kdir = root.join("kernels");
        // One translation unit including every family -> one fatbin.
        let mut unit = String::from("// generated by build.rs\n");
        for src in super::kernel_sources(&kdir) {
            unit.push_str(&format!("#include \"{}\"\n", src.display()));
        }
        let unit_path = out.join("all_kernels.cu");
        if let Err(e) = std::fs::write(&unit_path, unit) {
            super::fail(&format!("cannot write {}: {e}", unit_path.display()));
        }
        let archs = archs();
        let newest = archs.iter().copied().max().unwrap_or(90);
        let mut cmd = Command::new(&nvcc);
        cmd.args([
            "-fatbin",
            "-O3",
            "-std=c++17",
            "-Xptxas",
            "-v",
            "--resource-usage",
        ])
        .arg("-I")
        .arg(&kdir);
        // nvcc from the PyPI wheels keeps libcu++ headers under include/cccl.
        if let Some(inc) = nvcc
            .parent()
            .and_then(|b| b.parent())
            .map(|r| r.join("include").join("cccl"))
        {
            if inc.is_dir() {
                cmd.arg("-I").arg(inc);
            }
        }
        for a in &archs {
            if *a == newest {
                cmd.arg(format!(
                    "-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]"
                ));
            } else {
                cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
            }
        }
        let fatbin = out.join("kernels.fatbin");
        cmd.arg(&unit_path).arg("-o").arg(&fatbin);
        let output = cmd
            .output()
            .unwrap_or_else(|e| super::fail(&format!("cannot run {}: {e}", nvcc.display())));
        // ptxas -v report (registers, spills, shared memory per kernel and arch).
        let report = out.join("ptxas.txt");
        let _ = std::fs::write(&report, &output.stderr);
        if !output.status.success() {
            super::fail(&format!(
                "nvcc failed ({cmd:?}):\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        println!("cargo:rustc-env=AK_PTXAS_REPORT={}", report.display());
    }
}
