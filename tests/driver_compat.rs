//! Loading the kernels on a driver older than the image's toolkit, end to end on the
//! emulated device posing as a CUDA 12.4 (R550) driver (`emu::set_driver_version`):
//!
//! * the built image (a CUDA 13 image) is refused, and with no NVRTC to fall back on
//!   `Kernels::get` is an `Err` naming both CUDA versions and the fixes;
//! * with a CUDA 12.x NVRTC (`AK_TEST_NVRTC_LIB`, set by scripts/compat-check.sh; the
//!   test prints why it skips this part otherwise, and fails instead when
//!   `AK_REQUIRE_NVRTC=1`, as in CI) the kernels are compiled at run time for the
//!   device's arch, the emulated driver checks the cubin (ELF, EM_CUDA, SM of the
//!   device) and serves only the kernels it defines: every kernel of the ptxas table
//!   must resolve, an op must give the right bits, and a second context must read
//!   the disk cache instead of compiling;
//! * an NVRTC newer than the driver is refused with its own message.
//!
//! One test function: the driver version and the NVRTC/cache variables are
//! process-wide, so the steps run in order.
#![cfg(feature = "emulate")]

mod common;

use activation_kernels::cuda::{cast, CudaContext, Kernels, Origin};
use activation_kernels::emu;

/// Every kernel name in kernels/emu/ptxas-table.tsv (the nvcc build's kernels).
fn table_kernels() -> Vec<String> {
    let tsv = include_str!("../kernels/emu/ptxas-table.tsv");
    let mut v: Vec<String> = tsv
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split('\t').next())
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

fn set_env(k: &str, v: Option<&str>) {
    match v {
        Some(v) => std::env::set_var(k, v),
        None => std::env::remove_var(k),
    }
}

/// f16 round trip through the cast kernels: the half crate's bits.
fn cast_works(ctx: &std::sync::Arc<CudaContext>) {
    let s = ctx.default_stream();
    let v: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.3) * 0.37).collect();
    let src = s.clone_htod(&v).unwrap();
    let mut t = s.alloc_zeros::<half::f16>(v.len()).unwrap();
    cast::from_f32_into(&s, &src, &mut t.slice_mut(..)).unwrap();
    let got: Vec<half::f16> = s.clone_dtoh(&t).unwrap();
    let want: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn older_driver_gets_a_run_time_compile_or_a_clear_error() {
    let gpu = common::device::gpu().expect("the emulated device");
    assert!(
        gpu.emulated,
        "this test poses the emulated driver as an old one"
    );
    drop(gpu.ctx);
    let cache = std::env::temp_dir().join(format!("ak-compat-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    set_env("AK_CUDA_CACHE_DIR", Some(cache.to_str().unwrap()));

    // 1. The default emulated driver (CUDA 13.5) loads the built image.
    emu::set_driver_version(0);
    let ctx = CudaContext::new(0).unwrap();
    assert_eq!(activation_kernels::cuda::driver_version().unwrap(), 13050);
    assert_eq!(Kernels::get(&ctx).unwrap().origin(), &Origin::Built);
    drop(ctx);

    // 2. An R550 driver (CUDA 12.4) and no NVRTC: a clear error, no panic.
    emu::set_driver_version(12040);
    assert_eq!(activation_kernels::cuda::driver_version().unwrap(), 12040);
    set_env("AK_NVRTC_LIB", Some("/nonexistent/libnvrtc.so.12"));
    let ctx = CudaContext::new(0).unwrap();
    let err = Kernels::get(&ctx).unwrap_err().to_string();
    for needle in [
        "supports CUDA 12.4",
        "from CUDA 13.0",
        "R580",
        "NVCC=",
        "AK_NVRTC_LIB",
        "no NVRTC library found",
    ] {
        assert!(err.contains(needle), "`{needle}` missing from: {err}");
    }
    // Ops report it too, before touching any data.
    let v = ctx.default_stream().clone_htod(&[1.0f32; 8]).unwrap();
    assert!(cast::to_f32(&ctx.default_stream(), &v).is_err());
    drop(v);
    drop(ctx);

    // 3. With a CUDA 12.x NVRTC: compiled for the device, then read from the cache.
    let nvrtc = std::env::var("AK_TEST_NVRTC_LIB")
        .ok()
        .filter(|p| !p.is_empty());
    match nvrtc {
        None => {
            assert!(
                std::env::var("AK_REQUIRE_NVRTC").as_deref() != Ok("1"),
                "AK_REQUIRE_NVRTC=1 but AK_TEST_NVRTC_LIB is not set"
            );
            eprintln!(
                "!!! run-time compile part SKIPPED: set AK_TEST_NVRTC_LIB to a CUDA 12.x \
                 libnvrtc.so.12 (scripts/compat-check.sh does) !!!"
            );
        }
        Some(lib) => {
            set_env("AK_NVRTC_LIB", Some(&lib));
            let ctx = CudaContext::new(0).unwrap();
            let k = Kernels::get(&ctx).unwrap_or_else(|e| panic!("run-time compile: {e}"));
            let Origin::RunTime { nvrtc, from_cache } = k.origin().clone() else {
                panic!("expected a run-time image, got {:?}", k.origin());
            };
            assert_eq!(
                nvrtc.0, 12,
                "the test wants a CUDA 12.x NVRTC, got {nvrtc:?}"
            );
            assert!(!from_cache);
            let names = table_kernels();
            assert!(names.len() > 100, "ptxas table too short: {}", names.len());
            for name in &names {
                k.function(name)
                    .unwrap_or_else(|e| panic!("{name} not in the run-time image: {e}"));
            }
            // The emulator serves only what the cubin defines: a registered self-test
            // kernel the crate never ships is not found there.
            assert!(k.function("emu_selftest_warp_sum").is_err());
            cast_works(&ctx);
            drop(k);
            drop(ctx);
            let files: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().collect();
            assert_eq!(files.len(), 1, "one cached cubin: {files:?}");

            let ctx = CudaContext::new(0).unwrap();
            let k = Kernels::get(&ctx).unwrap();
            assert!(
                matches!(
                    k.origin(),
                    Origin::RunTime {
                        from_cache: true,
                        ..
                    }
                ),
                "second load must come from the cache: {:?}",
                k.origin()
            );
            cast_works(&ctx);
            drop(k);
            drop(ctx);

            // A cached file that is not a whole image (here: garbage of the right
            // name) is never handed to the driver: compiled again, and re-cached.
            std::fs::write(files[0].path(), b"not a cubin").unwrap();
            let ctx = CudaContext::new(0).unwrap();
            let k = Kernels::get(&ctx).unwrap();
            assert!(
                matches!(
                    k.origin(),
                    Origin::RunTime {
                        from_cache: false,
                        ..
                    }
                ),
                "{:?}",
                k.origin()
            );
            cast_works(&ctx);
            assert!(std::fs::metadata(files[0].path()).unwrap().len() > 1000);
            drop(k);
            drop(ctx);

            // 4. A driver older than the NVRTC's major version: refused, clearly.
            emu::set_driver_version(11080);
            let ctx = CudaContext::new(0).unwrap();
            let err = Kernels::get(&ctx).unwrap_err().to_string();
            assert!(
                err.contains("makes images for CUDA 12.x drivers") && err.contains("11.8"),
                "{err}"
            );
        }
    }

    emu::set_driver_version(0);
    set_env("AK_NVRTC_LIB", None);
    set_env("AK_CUDA_CACHE_DIR", None);
    let _ = std::fs::remove_dir_all(&cache);
}

/// The emulated driver's image checks themselves, on hand-made PTX: a PTX ISA newer
/// than the posed driver's is refused, so is a target above the device's arch, and a
/// module serves only the entries its PTX defines.
#[test]
fn emulated_driver_checks_ptx_like_an_old_driver() {
    use cudarc::nvrtc::Ptx;
    let gpu = common::device::gpu().expect("the emulated device");
    let ctx = gpu.ctx.clone();
    let ptx = |isa: &str, sm: u32| {
        Ptx::from_src(format!(
            "//\n.version {isa}\n.target sm_{sm}\n.address_size 64\n\n\
             .visible .entry cast_from_f32_f16(\n)\n{{\n\tret;\n}}\n"
        ))
    };
    emu::set_driver_version(12040);
    let refused = ctx.load_module(ptx("8.5", 75)).unwrap_err().to_string();
    assert!(refused.contains("UNSUPPORTED_PTX_VERSION"), "{refused}");
    let refused = ctx.load_module(ptx("8.4", 100)).unwrap_err().to_string();
    assert!(refused.contains("NO_BINARY_FOR_GPU"), "{refused}");
    let m = ctx.load_module(ptx("8.4", 75)).unwrap();
    assert!(m.load_function("cast_from_f32_f16").is_ok());
    assert!(
        m.load_function("cast_to_f32_f16").is_err(),
        "not defined by this PTX"
    );
    emu::set_driver_version(13050);
    assert!(ctx.load_module(ptx("9.5", 86)).is_ok());
    assert!(ctx.load_module(ptx("9.6", 86)).is_err());
    emu::set_driver_version(0);
}
