//! A small residual CNN on the 8×8 handwritten digits (1,797 real samples, UCI via
//! scikit-learn, `data/digits.csv.gz`), trained with candle on the CPU once per
//! activation: ReLU, ACON-C, meta-ACON-C, IIEU-B, IIEU-DC and AIEC, each a one-line
//! swap of the crate's candle modules.
//!
//! ```sh
//! cargo run --release --features candle --example digits [-- --epochs N --png PATH]
//! ```
//!
//! Fixed split (every 5th sample is test: 360 test, 1,437 train), fixed seeds (weights
//! are drawn from a seeded generator per variable name, batches shuffled by a seeded
//! generator), AdamW. Prints one line per epoch, then a table, and writes a PNG of the
//! test-accuracy curves (default `target/digits_curves.png`). The PNG has no text (no
//! font dependency): the colours are listed in the table's last column.
//!
//! Architecture (8×8×1 input): stem conv3×3 1→16 + act; block (16 ch): conv3×3 + act,
//! conv3×3, residual merge, act; down conv3×3 16→32 stride 2 + act; block (32 ch, 4×4);
//! global average pool; linear 32→10. Per variant:
//! * ReLU / ACON-C / meta-ACON-C (r = 4, with biases): every act is that module.
//! * IIEU-B: every conv is followed by IIEU-B, conv and IIEU-B fused into one op
//!   (`IieuConv2d`, ψ = none); since IIEU-B needs the conv's input, the block's second conv gets IIEU-B *before* the residual
//!   sum and nothing follows the sum.
//! * IIEU-DC: ReLU acts, and the residual sum is replaced by the coupler (r = 4).
//! * AIEC: every act is AIEC (TAU τ = 0, so its output is ReLU's); the six layers' aux
//!   losses (λ_aux = 1, λ_gate = 1 — see [`AIEC_LAMBDA_GATE`]) are averaged and added
//!   to the cross-entropy; counters reset at the start of every epoch.
//!
//! IIEU-B's convs have no bias (see `ConvAct::new`).

use std::time::Instant;

use activation_kernels::candle::nn::{AconC, Aiec, IieuConv2d, IieuDc, MetaAconC, PsiKind};
use activation_kernels::cpu::aiec::AiecConfig;
use activation_kernels::cpu::iieu::PatchNorm;
use candle_core::{DType, Device, Module, Result, Shape, Tensor, Var, D};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Conv2d, Conv2dConfig, Init, Linear, Optimizer, VarBuilder, VarMap};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[path = "common/digits.rs"]
mod common;
use common::{Kind, Run, AIEC_LAMBDA_GATE, BATCH, LR, SEED};

// ---------------------------------------------------------------------------
// data

struct Split {
    x: Tensor,
    y: Vec<usize>,
}

fn load() -> std::result::Result<(Split, Split), Box<dyn std::error::Error>> {
    let (tr, te) = common::load()?;
    let mk = |r: common::RawSplit| -> Result<Split> {
        let n = r.y.len();
        Ok(Split {
            x: Tensor::from_vec(r.x, (n, 1, 8, 8), &Device::Cpu)?,
            y: r.y,
        })
    };
    Ok((mk(tr)?, mk(te)?))
}

// ---------------------------------------------------------------------------
// seeded parameter initialisation

/// A `VarMap`-backed VarBuilder backend whose random inits come from a generator
/// seeded by (global seed, variable name), so every run and every variant that shares
/// a variable name starts from the same values (candle's CPU RNG cannot be seeded).
struct SeededVars {
    map: VarMap,
    seed: u64,
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SimpleBackend for SeededVars {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.map.data().lock().expect("var map lock");
        if let Some(v) = data.get(name) {
            return Ok(v.as_tensor().clone());
        }
        let n = s.elem_count();
        let mut rng = SmallRng::seed_from_u64(self.seed ^ fnv1a(name));
        let mut normal = || {
            // Box–Muller.
            let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
            let u2: f64 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let vals: Vec<f64> = match h {
            Init::Const(c) => vec![c; n],
            Init::Randn { mean, stdev } => (0..n).map(|_| mean + stdev * normal()).collect(),
            Init::Uniform { lo, up } => {
                let mut r = SmallRng::seed_from_u64(self.seed ^ fnv1a(name));
                (0..n).map(|_| r.gen_range(lo..up)).collect()
            }
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&s) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => (0..n).map(|_| std * normal()).collect(),
                    NormalOrUniform::Uniform => {
                        let b = 3f64.sqrt() * std;
                        let mut r = SmallRng::seed_from_u64(self.seed ^ fnv1a(name));
                        (0..n).map(|_| r.gen_range(-b..b)).collect()
                    }
                }
            }
        };
        let t = Tensor::from_vec(vals, s, dev)?.to_dtype(dtype)?;
        let v = Var::from_tensor(&t)?;
        data.insert(name.to_string(), v.clone());
        Ok(v.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("no variable {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .expect("var map lock")
            .contains_key(name)
    }
}

// ---------------------------------------------------------------------------
// model

/// Each variant's curve colour in the PNG (and its name for the table).
fn colour(kind: Kind) -> (RGBColor, &'static str) {
    match kind {
        Kind::Relu => (RGBColor(0, 0, 0), "black"),
        Kind::AconC => (RGBColor(31, 119, 180), "blue"),
        Kind::MetaAconC => (RGBColor(44, 160, 44), "green"),
        Kind::IieuB => (RGBColor(214, 39, 40), "red"),
        Kind::IieuDc => (RGBColor(255, 127, 14), "orange"),
        Kind::Aiec => (RGBColor(148, 103, 189), "purple"),
    }
}

/// Per-step context: training flag, labels (AIEC) and the AIEC losses collected.
struct Ctx<'a> {
    train: bool,
    labels: &'a [usize],
    aux: Vec<Tensor>,
}

enum Act {
    Relu,
    AconC(AconC),
    Meta(MetaAconC),
    Aiec(Aiec),
}

impl Act {
    fn new(kind: Kind, vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(match kind {
            Kind::AconC => Act::AconC(AconC::new(vb, c)?),
            Kind::MetaAconC => Act::Meta(MetaAconC::new(vb, c, 4, true)?),
            Kind::Aiec => {
                let cfg = AiecConfig {
                    lambda_gate: AIEC_LAMBDA_GATE,
                    ..Default::default()
                };
                Act::Aiec(Aiec::new(vb, c, 10, cfg)?)
            }
            Kind::Relu | Kind::IieuB | Kind::IieuDc => Act::Relu,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        match self {
            Act::Relu => x.relu(),
            Act::AconC(m) => m.forward(x),
            Act::Meta(m) => m.forward(x),
            Act::Aiec(m) if ctx.train => {
                let (a, loss) = m.forward_train(x, ctx.labels)?;
                ctx.aux.push(loss.total);
                Ok(a)
            }
            Act::Aiec(m) => m.forward(x),
        }
    }
}

/// conv + activation (for IIEU-B: conv → IIEU-B as one fused op, `IieuConv2d`).
enum ConvAct {
    Plain(Conv2d, Act),
    Iieu(IieuConv2d),
}

impl ConvAct {
    fn new(kind: Kind, vb: VarBuilder, cin: usize, cout: usize, stride: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        Ok(match kind {
            // No conv bias before IIEU-B: where a patch is all zeros (the digits'
            // background, zero padding) r_x = 1/eps = 1e8, and with a bias b the
            // similarity s = b·r_w·r_x would be ~1e8·b. Without a bias, x = 0 there.
            // The fused op owns its weight: under `conv`, so it gets the same seeded draw
            // (and candle's conv init) as the unfused `conv2d_no_bias` + `IieuB` had.
            Kind::IieuB => ConvAct::Iieu(IieuConv2d::new(
                vb.pp("conv"),
                cin,
                cout,
                3,
                cfg,
                PsiKind::None,
                PatchNorm::PerGroup,
            )?),
            _ => {
                let conv = candle_nn::conv2d(cin, cout, 3, cfg, vb.pp("conv"))?;
                ConvAct::Plain(conv, Act::new(kind, vb.pp("act"), cout)?)
            }
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        match self {
            ConvAct::Plain(conv, act) => act.forward(&conv.forward(x)?, ctx),
            ConvAct::Iieu(m) => m.forward(x),
        }
    }
}

/// Residual block: conv-act, conv, merge with the input, act.
struct Block {
    c1: ConvAct,
    c2: ConvAct,
    out: Act,
    dc: Option<IieuDc>,
}

impl Block {
    fn new(kind: Kind, vb: VarBuilder, c: usize) -> Result<Self> {
        let c1 = ConvAct::new(kind, vb.pp("c1"), c, c, 1)?;
        let c2 = if kind == Kind::IieuB {
            ConvAct::new(kind, vb.pp("c2"), c, c, 1)?
        } else {
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            ConvAct::Plain(
                candle_nn::conv2d(c, c, 3, cfg, vb.pp("c2.conv"))?,
                Act::Relu,
            )
        };
        let dc = if kind == Kind::IieuDc {
            Some(IieuDc::new(vb.pp("dc"), c, 4)?)
        } else {
            None
        };
        Ok(Self {
            c1,
            c2,
            out: Act::new(kind, vb.pp("out"), c)?,
            dc,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let h = self.c1.forward(x, ctx)?;
        match &self.c2 {
            ConvAct::Iieu(m) => m.forward(&h)? + x, // IIEU-B variant: nothing after the sum
            ConvAct::Plain(conv, _) => {
                let h = conv.forward(&h)?;
                let merged = match &self.dc {
                    Some(dc) => dc.forward(&h, x)?,
                    None => (h + x)?,
                };
                self.out.forward(&merged, ctx)
            }
        }
    }

    fn aiec_layers(&self) -> Vec<&Aiec> {
        let mut v = vec![];
        if let ConvAct::Plain(_, Act::Aiec(a)) = &self.c1 {
            v.push(a);
        }
        if let Act::Aiec(a) = &self.out {
            v.push(a);
        }
        v
    }
}

struct Net {
    stem: ConvAct,
    b1: Block,
    down: ConvAct,
    b2: Block,
    head: Linear,
}

impl Net {
    fn new(kind: Kind, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            stem: ConvAct::new(kind, vb.pp("stem"), 1, 16, 1)?,
            b1: Block::new(kind, vb.pp("b1"), 16)?,
            down: ConvAct::new(kind, vb.pp("down"), 16, 32, 2)?,
            b2: Block::new(kind, vb.pp("b2"), 32)?,
            head: candle_nn::linear(32, 10, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let h = self.stem.forward(x, ctx)?;
        let h = self.b1.forward(&h, ctx)?;
        let h = self.down.forward(&h, ctx)?;
        let h = self.b2.forward(&h, ctx)?;
        self.head.forward(&h.mean((2, 3))?)
    }

    fn aiec_layers(&self) -> Vec<&Aiec> {
        let mut v = vec![];
        for ca in [&self.stem, &self.down] {
            if let ConvAct::Plain(_, Act::Aiec(a)) = ca {
                v.push(a);
            }
        }
        v.extend(self.b1.aiec_layers());
        v.extend(self.b2.aiec_layers());
        v
    }
}

// ---------------------------------------------------------------------------
// training

fn accuracy(net: &Net, split: &Split) -> Result<f64> {
    let mut ctx = Ctx {
        train: false,
        labels: &[],
        aux: vec![],
    };
    let logits = net.forward(&split.x, &mut ctx)?;
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let ok = pred
        .iter()
        .zip(&split.y)
        .filter(|(&p, &y)| p as usize == y)
        .count();
    Ok(ok as f64 / split.y.len() as f64)
}

fn train(kind: Kind, tr: &Split, te: &Split, epochs: usize) -> Result<Run> {
    let map = VarMap::new();
    let backend = SeededVars {
        map: map.clone(),
        seed: SEED,
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let net = Net::new(kind, vb)?;
    let vars = map.all_vars();
    let params = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: LR,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = SmallRng::seed_from_u64(SEED);
    let n = tr.y.len();
    let mut order: Vec<usize> = (0..n).collect();
    let (mut test_acc, mut train_loss) = (vec![], vec![]);
    let mut secs = 0.0;
    for epoch in 1..=epochs {
        let t0 = Instant::now();
        for a in net.aiec_layers() {
            a.reset_counters()?;
        }
        order.shuffle(&mut rng);
        let (mut sum_loss, mut batches) = (0.0, 0);
        for chunk in order.chunks(BATCH) {
            let idx = Tensor::from_vec(
                chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                chunk.len(),
                &Device::Cpu,
            )?;
            let xb = tr.x.index_select(&idx, 0)?;
            let labels: Vec<usize> = chunk.iter().map(|&i| tr.y[i]).collect();
            let yb = Tensor::from_vec(
                labels.iter().map(|&y| y as u32).collect::<Vec<_>>(),
                labels.len(),
                &Device::Cpu,
            )?;
            let mut ctx = Ctx {
                train: true,
                labels: &labels,
                aux: vec![],
            };
            let logits = net.forward(&xb, &mut ctx)?;
            let mut loss = candle_nn::loss::cross_entropy(&logits, &yb)?;
            sum_loss += loss.to_scalar::<f32>()? as f64;
            if !ctx.aux.is_empty() {
                let k = ctx.aux.len() as f64;
                let aux = Tensor::stack(&ctx.aux, 0)?
                    .sum_all()?
                    .affine(1.0 / k, 0.0)?;
                loss = (loss + aux)?;
            }
            opt.backward_step(&loss)?;
            batches += 1;
        }
        let dt = t0.elapsed().as_secs_f64();
        secs += dt;
        let acc = accuracy(&net, te)?;
        let tl = sum_loss / batches as f64;
        println!(
            "{:<12} epoch {epoch:>2}/{epochs}  train CE {tl:.4}  test acc {:>5.1}%  ({dt:.2} s)",
            kind.name(),
            100.0 * acc
        );
        test_acc.push(acc);
        train_loss.push(tl);
    }
    Ok(Run {
        kind,
        test_acc,
        train_loss,
        secs_per_epoch: secs / epochs as f64,
        params,
    })
}

// ---------------------------------------------------------------------------
// plot (no text: plotters is built without a font backend)

use plotters::prelude::*;

fn plot(runs: &[Run], path: &str) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let epochs = runs.iter().map(|r| r.test_acc.len()).max().unwrap_or(1);
    let lo = runs
        .iter()
        .flat_map(|r| r.test_acc.iter().copied())
        .fold(1.0f64, f64::min)
        .min(0.8);
    let y0 = (lo * 10.0).floor() / 10.0;
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let area = root.margin(20, 20, 20, 20);
    let mut chart = ChartBuilder::on(&area).build_cartesian_2d(1f64..epochs as f64, y0..1f64)?;
    // Grid by hand (tick labels would need a font): every 0.05 of accuracy, every epoch.
    let grey = RGBColor(220, 220, 220);
    let mut y = y0;
    while y <= 1.0 + 1e-9 {
        chart.draw_series(LineSeries::new([(1.0, y), (epochs as f64, y)], &grey))?;
        y += 0.05;
    }
    for e in 1..=epochs {
        let e = e as f64;
        chart.draw_series(LineSeries::new([(e, y0), (e, 1.0)], &grey))?;
    }
    for r in runs {
        let (c, _) = colour(r.kind);
        let pts = r
            .test_acc
            .iter()
            .enumerate()
            .map(|(i, &a)| ((i + 1) as f64, a));
        chart.draw_series(LineSeries::new(pts, c.stroke_width(2)))?;
    }
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut epochs = 10;
    let mut png = "target/digits_curves.png".to_string();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--epochs" => epochs = it.next().ok_or("--epochs N")?.parse()?,
            "--png" => png = it.next().ok_or("--png PATH")?.clone(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let (tr, te) = load().map_err(|e| e.to_string())?;
    println!(
        "digits: {} train / {} test (every 5th sample is test), batch {BATCH}, AdamW lr {LR}, {epochs} epochs, seed {SEED}",
        tr.y.len(),
        te.y.len()
    );
    let t0 = Instant::now();
    let mut runs = vec![];
    for kind in Kind::ALL {
        runs.push(train(kind, &tr, &te, epochs)?);
    }
    println!();
    common::print_table(&runs, Some(("curve colour", |k| colour(k).1)));
    if let Some(dir) = std::path::Path::new(&png).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    plot(&runs, &png)?;
    println!(
        "\nlearning curves (test accuracy per epoch, y from the lowest value rounded down to 0.1 up to 1.0, grid every 0.05) -> {png}"
    );
    common::print_totals(&runs, t0.elapsed().as_secs_f64());
    Ok(())
}
