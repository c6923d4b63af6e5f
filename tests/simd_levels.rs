//! `AK_SIMD` forces the runtime-dispatched CPU loops to a lower SIMD level, and every
//! level gives the same bits (src/fastmath.rs `simd_fn!`). The level is read once per
//! process, so the test runs this test binary again as a child with `AK_SIMD` set and
//! compares a digest of the outputs of dispatched ops (ACON-C, IIEU-B, the ReLU floor,
//! forward and backward) with its own.
use activation_kernels::cpu::{acon, iieu, relu};
use activation_kernels::fastmath::{detected_simd_level, simd_level, SimdLevel};
use activation_kernels::{ActShape, Conv2dGeometry};
use std::process::Command;

const CHILD: &str = "AK_SIMD_LEVELS_CHILD";

/// FNV-1a over the bits of every output value, in order.
fn digest(parts: &[&[f32]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for v in p.iter() {
            for b in v.to_bits().to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    h
}

fn vals(n: usize, seed: u32) -> Vec<f32> {
    // A deterministic spread over [-3, 3) (no RNG crate state shared with the child).
    (0..n as u32)
        .map(|i| {
            let k = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (k >> 8) as f32 / (1u32 << 24) as f32 * 6.0 - 3.0
        })
        .collect()
}

/// Outputs of dispatched ops on ragged shapes (not multiples of 8, 16 or 64).
fn outputs_digest() -> u64 {
    let shape = ActShape::nchw(3, 5, 13, 11);
    let x = vals(shape.n * shape.c * shape.s, 1);
    let dy = vals(x.len(), 2);
    let p = acon::AconCParams::<f32>::init_reference(shape.c, 7).expect("params");
    let beta = acon::Beta::PerChannel(&p.beta);
    let y = acon::acon_c_forward(&shape, &x, &p.p1, &p.p2, beta).expect("acon fwd");
    let g = acon::acon_c_backward(&shape, &dy, &x, &p.p1, &p.p2, beta).expect("acon bwd");

    let geo = Conv2dGeometry::new(2, 3, 9, 7, 5, 3, 3).with_padding(1, 1);
    let (oh, ow) = geo.validate().expect("geometry");
    let cfg = iieu::IieuConfig::new(geo);
    let x_pre = vals(geo.input_len(), 3);
    let w = vals(geo.weight_len(), 4);
    let xi = vals(geo.n * geo.c_out * oh * ow, 5);
    let dyi = vals(xi.len(), 6);
    let params = iieu::IieuParams::<f32>::init(geo.c_out);
    let (yi, saved) = iieu::forward(&cfg, &xi, &x_pre, &w, &params).expect("iieu fwd");
    let gi = iieu::backward(&cfg, &dyi, &xi, &x_pre, &w, &params, &saved).expect("iieu bwd");

    let big = vals(2 * relu::GRAIN + 37, 7);
    let dbig = vals(big.len(), 8);
    let yr = relu::forward(&big).expect("relu fwd");
    let dr = relu::backward(&dbig, &big).expect("relu bwd");
    digest(&[
        &y, &g.dx, &g.dp1, &g.dp2, &g.dbeta, &yi, &gi.dx, &gi.dx_pre, &gi.dw, &gi.d_eta, &yr, &dr,
    ])
}

#[test]
fn every_forced_level_gives_the_same_bits() {
    if std::env::var_os(CHILD).is_some() {
        // Child: report the level in force and the digest.
        println!("LEVEL={} DIGEST={:016x}", simd_level(), outputs_digest());
        return;
    }
    let mine = outputs_digest();
    let exe = std::env::current_exe().expect("test binary path");
    let mut levels = vec![SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512];
    levels.retain(|&l| l <= detected_simd_level());
    for level in levels {
        let out = Command::new(&exe)
            .args([
                "--exact",
                "every_forced_level_gives_the_same_bits",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("AK_SIMD", level.name())
            .output()
            .expect("run the child test");
        assert!(out.status.success(), "child at {level} failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("LEVEL="))
            .unwrap_or_else(|| panic!("child printed no result: {text}"));
        assert_eq!(
            line,
            format!("LEVEL={level} DIGEST={mine:016x}"),
            "forced {level}: level not honoured or bits differ from the default level {}",
            simd_level()
        );
    }
}

#[test]
fn a_level_the_cpu_lacks_is_capped_and_garbage_is_ignored() {
    if std::env::var_os(CHILD).is_some() {
        println!("LEVEL={}", simd_level());
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    for req in ["avx512", "sse9"] {
        let out = Command::new(&exe)
            .args([
                "--exact",
                "a_level_the_cpu_lacks_is_capped_and_garbage_is_ignored",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("AK_SIMD", req)
            .output()
            .expect("run the child test");
        assert!(out.status.success(), "child with AK_SIMD={req} failed");
        let text = String::from_utf8_lossy(&out.stdout);
        // avx512: capped at the CPU's level (never a copy it cannot run; the same
        // level on an AVX-512 CPU); sse9: not understood, so the CPU's own level.
        let want = detected_simd_level();
        assert!(
            text.lines().any(|l| l == format!("LEVEL={want}")),
            "AK_SIMD={req}: {text}"
        );
    }
}
