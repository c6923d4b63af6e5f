//! Compiles the kernels with the machine's NVRTC (the run-time compile of
//! `cuda::rtc`), one PTX file per virtual architecture — the CUDA 12.x build path that
//! scripts/compat-check.sh assembles with a 12.x ptxas and checks.
//!
//! ```text
//! AK_NVRTC_LIB=.../libnvrtc.so.12 cargo run --features emulate --example compile_kernels -- OUT_DIR 75 80 86 89 90
//! ```
//! Writes `OUT_DIR/compute_XY.ptx` (without the trailing NUL) and prints NVRTC's version.

#[cfg(any(feature = "cuda", feature = "emulate"))]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use activation_kernels::cuda::rtc;
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(
        args.next()
            .ok_or("usage: compile_kernels OUT_DIR ARCH...")?,
    );
    let archs: Vec<u32> = args
        .map(|a| {
            a.trim_start_matches("sm_")
                .trim_start_matches("compute_")
                .parse()
        })
        .collect::<Result<_, _>>()?;
    if archs.is_empty() {
        return Err("no architectures given".into());
    }
    std::fs::create_dir_all(&out)?;
    let (maj, min) = rtc::nvrtc_version()?;
    println!("NVRTC {maj}.{min}");
    // One thread per architecture: NVRTC compiles independent programs concurrently.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = archs
            .iter()
            .map(|&a| s.spawn(move || (a, rtc::compile(rtc::Target::Ptx(a)))))
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    for r in results {
        let (arch, compiled) = r.map_err(|_| "a compile thread panicked")?;
        let mut ptx = compiled?.image;
        while ptx.last() == Some(&0) {
            ptx.pop();
        }
        let path = out.join(format!("compute_{arch}.ptx"));
        std::fs::write(&path, &ptx)?;
        println!("{} ({} bytes)", path.display(), ptx.len());
    }
    Ok(())
}

#[cfg(not(any(feature = "cuda", feature = "emulate")))]
fn main() {
    eprintln!("compile_kernels needs feature `cuda` or `emulate` (for cuda::rtc)");
    std::process::exit(2);
}
