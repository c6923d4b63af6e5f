//! The digits CNN of `examples/digits.rs` trained with burn (0.22, `Flex` CPU backend
//! with `Autodiff`) instead of candle: same data file, same split, same architecture,
//! same batch size, AdamW learning rate, epochs and AIEC settings, and the same table.
//! Each activation is the crate's burn module (`activation_kernels::burn::nn`), a
//! one-line swap of the ReLU.
//!
//! ```sh
//! cargo run --release --features burn --example burn_digits [-- --epochs N --only NAME]
//! ```
//!
//! Differences from the candle example: the weights come from burn's initialisers
//! seeded with `Device::seed` (not the candle example's per-name draws, so the numbers
//! differ run-to-run between the two stacks but not between runs of this one), IIEU-B is
//! burn's `Conv2d` (no bias) followed by the crate's IIEU-B op (the candle example fuses
//! the two in `IieuConv2d`), and there is no PNG.
//!
//! Architecture (8×8×1 input): stem conv3×3 1→16 + act; block (16 ch): conv3×3 + act,
//! conv3×3, residual merge, act; down conv3×3 16→32 stride 2 + act; block (32 ch, 4×4);
//! global average pool; linear 32→10. Per variant, as in the candle example:
//! * ReLU / ACON-C / meta-ACON-C (r = 4, with biases): every act is that module.
//! * IIEU-B: every conv is followed by IIEU-B (convs without bias); the block's second
//!   conv gets IIEU-B before the residual sum and nothing follows the sum.
//! * IIEU-DC: ReLU acts, and the residual sum is replaced by the coupler (r = 4).
//! * AIEC: every act is AIEC (τ = 0, λ_aux = 1, λ_gate = 1); the layers' losses are
//!   averaged and added to the cross-entropy; counters reset at every epoch.

use std::time::Instant;

use activation_kernels::burn::nn::{
    AconC, AconConfig, Aiec, AiecModuleConfig, IieuB, IieuBConfig, IieuDc, IieuDcConfig, MetaAconC,
    MetaAconCConfig,
};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

#[path = "common/digits.rs"]
mod common;
use common::{Kind, RawSplit as Split, Res, Run, AIEC_LAMBDA_GATE, BATCH, LR, SEED};

// ---------------------------------------------------------------------------
// data

fn images(split: &Split, idx: &[usize], device: &Device) -> Tensor<4> {
    let mut v = Vec::with_capacity(idx.len() * 64);
    for &i in idx {
        v.extend_from_slice(&split.x[i * 64..(i + 1) * 64]);
    }
    Tensor::from_data(TensorData::new(v, [idx.len(), 1, 8, 8]), device)
}

// ---------------------------------------------------------------------------
// model

/// Per-step context: training flag, labels (AIEC) and the AIEC losses collected.
struct Ctx<'a> {
    train: bool,
    labels: &'a [usize],
    aux: Vec<Tensor<1>>,
}

// A handful of these exist per model, built once: the variants' size difference costs
// nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
enum Act {
    Relu(Relu),
    AconC(AconC),
    Meta(MetaAconC),
    Aiec(Aiec),
}

impl Act {
    fn new(kind: Kind, c: usize, device: &Device) -> Res<Self> {
        Ok(match kind {
            Kind::AconC => Act::AconC(AconConfig::new(c).init_acon_c(device)?),
            Kind::MetaAconC => Act::Meta(MetaAconCConfig::new(c).with_r(4).init(device)?),
            Kind::Aiec => Act::Aiec(
                AiecModuleConfig::new(c, 10)
                    .with_lambda_gate(AIEC_LAMBDA_GATE)
                    .with_seed(SEED ^ c as u64)
                    .init(device)?,
            ),
            Kind::Relu | Kind::IieuB | Kind::IieuDc => Act::Relu(Relu::new()),
        })
    }

    fn forward(&self, x: Tensor<4>, ctx: &mut Ctx) -> Res<Tensor<4>> {
        Ok(match self {
            Act::Relu(m) => m.forward(x),
            Act::AconC(m) => m.forward(x)?,
            Act::Meta(m) => m.forward(x)?,
            Act::Aiec(m) if ctx.train => {
                let out = m.forward_train(x, ctx.labels)?;
                ctx.aux.push(out.loss);
                out.out
            }
            Act::Aiec(m) => m.forward(x)?,
        })
    }

    fn aiec(&self) -> Option<&Aiec> {
        match self {
            Act::Aiec(a) => Some(a),
            _ => None,
        }
    }
}

/// conv + activation (for IIEU-B: conv without bias, then IIEU-B on its output).
#[derive(Module, Debug)]
struct ConvAct {
    conv: Conv2d,
    act: Act,
    iieu: Option<IieuB>,
}

impl ConvAct {
    fn new(kind: Kind, cin: usize, cout: usize, stride: usize, device: &Device) -> Res<Self> {
        let iieu = kind == Kind::IieuB;
        let conv = Conv2dConfig::new([cin, cout], [3, 3])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(!iieu)
            .init(device);
        let iieu = if iieu {
            Some(
                IieuBConfig::new(cout)
                    .with_stride((stride, stride))
                    .with_padding((1, 1))
                    .init(device)?,
            )
        } else {
            None
        };
        Ok(Self {
            conv,
            act: Act::new(kind, cout, device)?,
            iieu,
        })
    }

    fn forward(&self, x: Tensor<4>, ctx: &mut Ctx) -> Res<Tensor<4>> {
        let h = self.conv.forward(x.clone());
        match &self.iieu {
            Some(m) => Ok(m.forward(h, x, self.conv.weight.val())?),
            None => self.act.forward(h, ctx),
        }
    }
}

/// Residual block: conv-act, conv, merge with the input, act.
#[derive(Module, Debug)]
struct Block {
    c1: ConvAct,
    c2: ConvAct,
    out: Act,
    dc: Option<IieuDc>,
}

impl Block {
    fn new(kind: Kind, c: usize, device: &Device) -> Res<Self> {
        let c2_kind = if kind == Kind::IieuB {
            kind
        } else {
            Kind::Relu
        };
        Ok(Self {
            c1: ConvAct::new(kind, c, c, 1, device)?,
            c2: ConvAct::new(c2_kind, c, c, 1, device)?,
            out: Act::new(kind, c, device)?,
            dc: if kind == Kind::IieuDc {
                Some(
                    IieuDcConfig::new(c)
                        .with_r(4)
                        .with_seed(SEED)
                        .init(device)?,
                )
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<4>, ctx: &mut Ctx) -> Res<Tensor<4>> {
        let h = self.c1.forward(x.clone(), ctx)?;
        if self.c2.iieu.is_some() {
            // IIEU-B variant: IIEU-B before the sum, nothing after it.
            return Ok(self.c2.forward(h, ctx)? + x);
        }
        let h = self.c2.conv.forward(h);
        let merged = match &self.dc {
            Some(dc) => dc.forward(h, x)?,
            None => h + x,
        };
        self.out.forward(merged, ctx)
    }

    fn aiec_layers(&self) -> Vec<&Aiec> {
        [self.c1.act.aiec(), self.out.aiec()]
            .into_iter()
            .flatten()
            .collect()
    }
}

#[derive(Module, Debug)]
struct Net {
    stem: ConvAct,
    b1: Block,
    down: ConvAct,
    b2: Block,
    head: Linear,
}

impl Net {
    fn new(kind: Kind, device: &Device) -> Res<Self> {
        Ok(Self {
            stem: ConvAct::new(kind, 1, 16, 1, device)?,
            b1: Block::new(kind, 16, device)?,
            down: ConvAct::new(kind, 16, 32, 2, device)?,
            b2: Block::new(kind, 32, device)?,
            head: LinearConfig::new(32, 10).init(device),
        })
    }

    fn forward(&self, x: Tensor<4>, ctx: &mut Ctx) -> Res<Tensor<2>> {
        let h = self.stem.forward(x, ctx)?;
        let h = self.b1.forward(h, ctx)?;
        let h = self.down.forward(h, ctx)?;
        let h = self.b2.forward(h, ctx)?;
        let [n, c, _, _] = h.dims();
        let pooled: Tensor<2> = h.mean_dim(3).mean_dim(2).reshape([n, c]);
        Ok(self.head.forward(pooled))
    }

    fn aiec_layers(&self) -> Vec<&Aiec> {
        let mut v: Vec<&Aiec> = [self.stem.act.aiec(), self.down.act.aiec()]
            .into_iter()
            .flatten()
            .collect();
        v.extend(self.b1.aiec_layers());
        v.extend(self.b2.aiec_layers());
        v
    }
}

// ---------------------------------------------------------------------------
// training

fn accuracy(net: &Net, split: &Split, device: &Device) -> Res<f64> {
    let mut ctx = Ctx {
        train: false,
        labels: &[],
        aux: vec![],
    };
    let idx: Vec<usize> = (0..split.y.len()).collect();
    let logits = net.forward(images(split, &idx, device), &mut ctx)?;
    let pred = logits
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| format!("{e:?}"))?;
    let ok = pred
        .iter()
        .zip(&split.y)
        .filter(|(&p, &y)| p as usize == y)
        .count();
    Ok(ok as f64 / split.y.len() as f64)
}

fn train(kind: Kind, tr: &Split, te: &Split, epochs: usize) -> Res<Run> {
    let device = Device::flex().autodiff();
    device.seed(SEED);
    let mut net = Net::new(kind, &device)?;
    let params = net.num_params();
    let mut opt = AdamWConfig::new().with_weight_decay(0.0).init();
    let ce = CrossEntropyLossConfig::new().init(&device);
    let mut rng = SmallRng::seed_from_u64(SEED);
    let n = tr.y.len();
    let mut order: Vec<usize> = (0..n).collect();
    let (mut test_acc, mut train_loss) = (vec![], vec![]);
    let mut secs = 0.0;
    for epoch in 1..=epochs {
        let t0 = Instant::now();
        for a in net.aiec_layers() {
            a.reset_counters();
        }
        order.shuffle(&mut rng);
        let (mut sum_loss, mut batches) = (0.0, 0);
        for chunk in order.chunks(BATCH) {
            let xb = images(tr, chunk, &device);
            let labels: Vec<usize> = chunk.iter().map(|&i| tr.y[i]).collect();
            let yv: Vec<i64> = labels.iter().map(|&y| y as i64).collect();
            let yb = Tensor::<1, Int>::from_data(TensorData::new(yv, [labels.len()]), &device);
            let mut ctx = Ctx {
                train: true,
                labels: &labels,
                aux: vec![],
            };
            let logits = net.forward(xb, &mut ctx)?;
            let mut loss = ce.forward(logits, yb);
            sum_loss += loss.clone().into_scalar::<f32>() as f64;
            if !ctx.aux.is_empty() {
                let k = ctx.aux.len() as f64;
                loss = loss + Tensor::cat(ctx.aux, 0).sum().div_scalar(k);
            }
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = opt.step(LR, net, grads);
            batches += 1;
        }
        let dt = t0.elapsed().as_secs_f64();
        secs += dt;
        let acc = accuracy(&net.valid(), te, &device.clone().inner())?;
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

fn main() -> Res<()> {
    let mut epochs = 10;
    let mut only: Option<String> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--epochs" => epochs = it.next().ok_or("--epochs N")?.parse()?,
            "--only" => only = Some(it.next().ok_or("--only NAME")?.clone()),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let (tr, te) = common::load()?;
    println!(
        "digits (burn 0.22, Flex + Autodiff): {} train / {} test (every 5th sample is test), batch {BATCH}, AdamW lr {LR}, {epochs} epochs, seed {SEED}",
        tr.y.len(),
        te.y.len()
    );
    let t0 = Instant::now();
    let mut runs = vec![];
    for kind in Kind::ALL {
        if only.as_deref().is_some_and(|o| o != kind.name()) {
            continue;
        }
        runs.push(train(kind, &tr, &te, epochs)?);
    }
    println!();
    common::print_table(&runs, None);
    println!();
    common::print_totals(&runs, t0.elapsed().as_secs_f64());
    Ok(())
}
