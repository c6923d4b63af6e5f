//! Helpers of the parity cases that drive a loop past its first trip ("path cases").
//!
//! * [`src_const`]: launch constants read from the launchers' source text
//!   (`include_str!` of src/cuda/*.rs): each path case recomputes the launch geometry
//!   from the constants the launcher actually uses and asserts that its shape needs
//!   more than one trip, so it fails (instead of silently testing less) when a launch
//!   constant changes.
//! * [`two_orders`]: `Gpu::check_schedules` cut to two thread orders, for the few path
//!   cases whose four-order run is too slow on the emulator.
//!
//! Included with `#[path = "common/paths.rs"]` by the parity suites that need it.
#![allow(dead_code)]

use crate::common::device::Gpu;

/// Value of `const NAME: usize = EXPR;` (or `: u32`) in `src`, where EXPR is an integer
/// literal (underscores allowed) or `a << b` / `a * b` of two such literals.
pub fn src_const(src: &str, name: &str) -> usize {
    let key = format!("const {name}:");
    let line = src
        .lines()
        .map(str::trim)
        .find(|l| l.contains(&key))
        .unwrap_or_else(|| panic!("launcher source has no `{key}`"));
    let expr = line
        .split_once('=')
        .and_then(|(_, r)| r.split_once(';'))
        .map(|(e, _)| e.trim())
        .unwrap_or_else(|| panic!("cannot parse `{line}`"));
    let lit = |s: &str| -> usize {
        s.trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("`{s}` in `{line}` is not an integer literal"))
    };
    if let Some((a, b)) = expr.split_once("<<") {
        lit(a) << lit(b)
    } else if let Some((a, b)) = expr.split_once('*') {
        lit(a) * lit(b)
    } else {
        lit(expr)
    }
}

/// `Gpu::check_schedules` cut to two thread orders (reversed, then identity), with the
/// same leak and fault checks: for the path cases whose four-order run costs too much
/// emulator time. Runs `f` once on a real GPU.
pub fn two_orders<R: PartialEq + std::fmt::Debug>(g: &Gpu, f: impl Fn() -> R) -> R {
    #[cfg(feature = "emulate")]
    if g.emulated {
        use activation_kernels::emu::Schedule;
        return g.check_orders(&[Schedule::Reversed, Schedule::Identity], f);
    }
    let _ = g;
    f()
}
