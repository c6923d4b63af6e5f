//! The shared comparator (`common::assert_close` / `common::check_grad`) fails where
//! it must: NaN vs finite, NaN vs ±∞, ±∞ vs finite (either side), NaN vs NaN and a
//! plain out-of-tolerance value, each with a message naming the index; and it
//! passes on values within tolerance. Without these, a gradient check whose
//! analytic side is NaN would pass (`err > bound` is false for a NaN `err`).
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::{assert_close, check_grad};

/// Runs `f`, requires it to panic, and returns the panic message.
fn panic_message(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("the comparator must fail");
    if let Some(s) = err.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = err.downcast_ref::<&str>() {
        s.to_string()
    } else {
        panic!("panic payload is not a string")
    }
}

const NAN: f64 = f64::NAN;
const INF: f64 = f64::INFINITY;

#[test]
fn non_finite_values_fail_and_name_the_index() {
    // (analytic, numeric) at index 2 of a three-element tensor whose other
    // elements agree exactly.
    let cases = [
        ("NaN vs finite", NAN, 1.0),
        ("finite vs NaN", 1.0, NAN),
        ("NaN vs +Inf", NAN, INF),
        ("-Inf vs NaN", -INF, NAN),
        ("+Inf vs finite", INF, 1.0),
        ("finite vs -Inf", 1.0, -INF),
        ("NaN vs NaN", NAN, NAN),
        ("+Inf vs +Inf", INF, INF),
        ("+Inf vs -Inf", INF, -INF),
    ];
    for (what, a, n) in cases {
        let analytic = [0.5, -0.25, a];
        let numeric = [0.5, -0.25, n];
        let msg = panic_message(|| check_grad(what, &analytic, &numeric));
        assert!(
            msg.contains(&format!("{what}[2]")),
            "{what}: message does not name index 2: {msg}"
        );
        // The loosest tolerances do not let it through either.
        let msg = panic_message(|| assert_close(what, &analytic, &numeric, 1e300, 1e300));
        assert!(msg.contains(&format!("{what}[2]")), "{what}: {msg}");
    }
}

#[test]
fn out_of_tolerance_fails_and_names_the_worst_index() {
    // check_grad: atol 1e-8, rtol 1e-6. Index 1 is off by 1e-5 relative (fails),
    // index 3 by 1e-3 (the worst), index 0 by 5e-7 relative (passes).
    let analytic = [1.0 + 5e-7, 2.0 * (1.0 + 1e-5), 3.0, 4.0 * (1.0 + 1e-3)];
    let numeric = [1.0, 2.0, 3.0, 4.0];
    let msg = panic_message(|| check_grad("g", &analytic, &numeric));
    assert!(msg.contains("mismatch at [3]"), "{msg}");
    // A length mismatch fails too.
    panic_message(|| check_grad("len", &[1.0, 2.0], &[1.0]));
    // Negative or non-finite tolerances are a bug in the caller.
    panic_message(|| assert_close("tol", &[1.0], &[1.0], -1.0, 0.0));
    panic_message(|| assert_close("tol", &[1.0], &[1.0], 0.0, NAN));
}

#[test]
fn within_tolerance_passes() {
    let numeric = [1.0, -2.0, 0.0, 1e-12];
    // 5e-7 relative and 5e-9 absolute: inside atol 1e-8 + rtol 1e-6.
    let analytic = [1.0 + 5e-7, -2.0 * (1.0 + 5e-7), 5e-9, 1e-12];
    check_grad("ok", &analytic, &numeric);
    assert_close("exact", &numeric, &numeric, 0.0, 0.0);
}
