//! What `examples/digits.rs` (candle) and `examples/burn_digits.rs` (burn) share: the
//! data file and split, the training settings, the variants and the results table, so
//! the two stacks train the same problem the same way. Included by each with
//! `#[path = "common/digits.rs"] mod common;`.

// Each example uses all of it except the other's extras (the table's colour column).
#![allow(dead_code)]

use std::io::Read;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The 1,797 UCI digits (scikit-learn's copy): 64 pixel values 0–16 and the label per line.
pub const DATA: &[u8] = include_bytes!("../../data/digits.csv.gz");
pub const SEED: u64 = 2024;
pub const BATCH: usize = 64;
pub const LR: f64 = 3e-3;
/// AIEC's gate-loss weight. SPEC's default 200 drove this small BN-free network to
/// chance level (10 % test accuracy after 2 epochs in a trial run: the gate term,
/// live on about half the channels while the counters are empty, switches them off);
/// 1 is used here. λ_aux keeps its default 1.
pub const AIEC_LAMBDA_GATE: f64 = 1.0;

/// One split: images `(n, 64)` scaled to `[0, 1]`, row-major, and labels.
pub struct RawSplit {
    pub x: Vec<f32>,
    pub y: Vec<usize>,
}

/// The fixed split: every 5th sample is test (360 test, 1,437 train).
pub fn load() -> Res<(RawSplit, RawSplit)> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DATA).read_to_string(&mut text)?;
    let empty = || RawSplit {
        x: vec![],
        y: vec![],
    };
    let (mut tr, mut te) = (empty(), empty());
    for (i, line) in text.lines().enumerate() {
        let v: Vec<f32> = line
            .split(',')
            .map(|s| s.trim().parse::<f32>())
            .collect::<Result<_, _>>()?;
        if v.len() != 65 {
            return Err(format!("line {i}: {} fields, expected 65", v.len()).into());
        }
        let dst = if i % 5 == 0 { &mut te } else { &mut tr };
        dst.x.extend(v[..64].iter().map(|p| p / 16.0));
        dst.y.push(v[64] as usize);
    }
    Ok((tr, te))
}

/// The activation variants, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Relu,
    AconC,
    MetaAconC,
    IieuB,
    IieuDc,
    Aiec,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Relu,
        Kind::AconC,
        Kind::MetaAconC,
        Kind::IieuB,
        Kind::IieuDc,
        Kind::Aiec,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Relu => "ReLU",
            Kind::AconC => "ACON-C",
            Kind::MetaAconC => "meta-ACON-C",
            Kind::IieuB => "IIEU-B",
            Kind::IieuDc => "IIEU-DC",
            Kind::Aiec => "AIEC",
        }
    }
}

/// One variant's training run.
pub struct Run {
    pub kind: Kind,
    pub test_acc: Vec<f64>,
    pub train_loss: Vec<f64>,
    pub secs_per_epoch: f64,
    pub params: usize,
}

/// An extra table column: its header and each variant's cell.
pub type Column<'a> = (&'a str, fn(Kind) -> &'static str);

/// The results table (markdown), with an extra last column when `extra` names one.
pub fn print_table(runs: &[Run], extra: Option<Column<'_>>) {
    let (head, rule) = match extra {
        Some((name, _)) => (format!(" {name} |"), "---|"),
        None => (String::new(), ""),
    };
    println!(
        "| activation | test accuracy (last epoch) | best test accuracy | epochs | s / epoch | params |{head}"
    );
    println!("|---|---|---|---|---|---|{rule}");
    for r in runs {
        let last = r.test_acc.last().copied().unwrap_or(0.0);
        let best = r.test_acc.iter().copied().fold(0.0, f64::max);
        let cell = extra
            .map(|(_, f)| format!(" {} |", f(r.kind)))
            .unwrap_or_default();
        println!(
            "| {} | {:.1} % | {:.1} % | {} | {:.2} | {} |{cell}",
            r.kind.name(),
            100.0 * last,
            100.0 * best,
            r.test_acc.len(),
            r.secs_per_epoch,
            r.params,
        );
    }
}

/// The closing line: total time and each variant's final training cross-entropy.
pub fn print_totals(runs: &[Run], secs: f64) {
    println!(
        "total {secs:.1} s; final train CE per variant: {}",
        runs.iter()
            .map(|r| format!(
                "{} {:.3}",
                r.kind.name(),
                r.train_loss.last().copied().unwrap_or(0.0)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
