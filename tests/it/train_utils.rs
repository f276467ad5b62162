//! Training utilities: AdamW against candle's, clipping, finiteness guards, schedules,
//! atomic checkpoints, and the bit-identical resume property on a tiny two-layer model.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, Optimizer, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlhf_bot::train::checkpoint::{self, MetricPoint, RngState, TrainState};
use rlhf_bot::train::guard::{self, GuardError};
use rlhf_bot::train::optim::{self, AdamW, AdamWConfig};
use rlhf_bot::train::schedule::{Decay, Schedule};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

struct Tiny {
    l1: Linear,
    l2: Linear,
}

impl Tiny {
    fn new(vm: &VarMap) -> Tiny {
        let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
        Tiny {
            l1: candle_nn::linear(4, 8, vb.pp("l1")).unwrap(),
            l2: candle_nn::linear(8, 1, vb.pp("l2")).unwrap(),
        }
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Tensor {
        let h = self.l1.forward(x).unwrap().tanh().unwrap();
        let out = self.l2.forward(&h).unwrap().squeeze(1).unwrap();
        (out - y).unwrap().sqr().unwrap().mean_all().unwrap()
    }
}

fn batch(rng: &mut ChaCha8Rng) -> (Tensor, Tensor) {
    let x: Vec<f32> = (0..6 * 4).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let y: Vec<f32> = (0..6).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    (
        Tensor::from_vec(x, (6, 4), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, 6, &Device::Cpu).unwrap(),
    )
}

fn schedule() -> Schedule {
    Schedule {
        peak_lr: 0.05,
        min_lr: 0.001,
        warmup_steps: 2,
        total_steps: 8,
        decay: Decay::Cosine,
    }
}

/// One training step as a trainer does it: lr from the schedule, backward, guard, clip, update.
fn train_step(model: &Tiny, opt: &mut AdamW, rng: &mut ChaCha8Rng, state: &mut TrainState) {
    let (x, y) = batch(rng);
    opt.set_learning_rate(schedule().lr_at(state.step));
    let loss = model.loss(&x, &y);
    let value = guard::check_loss(state.step, &loss).unwrap();
    let mut grads = loss.backward().unwrap();
    let params = opt.params();
    guard::check_grads(state.step, &grads, &params).unwrap();
    optim::clip_grad_norm(&mut grads, &params, 0.5).unwrap();
    opt.step(&grads).unwrap();
    state.step += 1;
    state.data_position += 6;
    state.metrics.push(MetricPoint {
        step: state.step,
        name: "loss".into(),
        value,
    });
}

fn fresh(seed: u64) -> (VarMap, Tiny, AdamW) {
    // Seeded init so two "processes" start from the same weights.
    let vm = VarMap::new();
    let model = Tiny::new(&vm);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (_, var) in optim::named_vars(&vm) {
        let n = var.elem_count();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let opt = AdamW::from_varmap(
        &vm,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    (vm, model, opt)
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    const N: u64 = 7;
    const K: u64 = 3;
    let (vm_a, model_a, mut opt_a) = fresh(1);
    let mut rng_a = ChaCha8Rng::seed_from_u64(99);
    let mut state_a = TrainState::new(99);
    for _ in 0..N {
        train_step(&model_a, &mut opt_a, &mut rng_a, &mut state_a);
    }

    let dir = tempfile::tempdir().unwrap();
    let (vm_b, model_b, mut opt_b) = fresh(1);
    let mut rng_b = ChaCha8Rng::seed_from_u64(99);
    let mut state_b = TrainState::new(99);
    for _ in 0..K {
        train_step(&model_b, &mut opt_b, &mut rng_b, &mut state_b);
    }
    state_b.rng = Some(RngState::capture(&rng_b));
    let saved = checkpoint::save(dir.path(), &state_b, &vm_b, &opt_b).unwrap();
    drop((vm_b, model_b, opt_b, rng_b));

    // A new process: different initial weights, then everything comes from the checkpoint.
    let (mut vm_c, model_c, mut opt_c) = fresh(2);
    let latest = checkpoint::latest(dir.path()).unwrap().unwrap();
    assert_eq!(latest, saved);
    let mut state_c = checkpoint::load(&latest, &mut vm_c, &mut opt_c).unwrap();
    assert_eq!(state_c.step, K);
    assert_eq!(opt_c.step_count(), K);
    let mut rng_c = state_c.rng.as_ref().unwrap().restore().unwrap();
    for _ in K..N {
        train_step(&model_c, &mut opt_c, &mut rng_c, &mut state_c);
    }

    let a = optim::named_vars(&vm_a);
    let c = optim::named_vars(&vm_c);
    assert_eq!(a.len(), 4);
    for ((na, va), (nc, vc)) in a.iter().zip(&c) {
        assert_eq!(na, nc);
        assert_eq!(
            bits(va.as_tensor()),
            bits(vc.as_tensor()),
            "{na} differs after resume"
        );
    }
    assert_eq!(state_a.metrics, state_c.metrics);
    assert_eq!(state_a.data_position, state_c.data_position);
    assert_eq!(rng_a.random::<u64>(), rng_c.random::<u64>());
    // And the run did learn something (the comparison is not between two frozen models).
    assert!(state_a.metrics.last().unwrap().value.is_finite());
    assert_ne!(
        bits(a[0].1.as_tensor()),
        bits(fresh(1).0.data().lock().unwrap()["l1.bias"].as_tensor())
    );
}

#[test]
fn adamw_matches_candle_nn_bit_for_bit() {
    let cfg = AdamWConfig {
        lr: 0.01,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.05,
    };
    let init = Tensor::new(&[[0.3f32, -1.2, 2.0], [0.0, 0.7, -0.4]], &Device::Cpu).unwrap();
    let ours = Var::from_tensor(&init).unwrap();
    let theirs = Var::from_tensor(&init).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), ours.clone())], cfg).unwrap();
    let mut reference = candle_nn::AdamW::new(
        vec![theirs.clone()],
        candle_nn::ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )
    .unwrap();
    let target = Tensor::new(&[[1.0f32, 0.0, -1.0], [0.5, 0.5, 0.5]], &Device::Cpu).unwrap();
    for _ in 0..5 {
        let l = ours
            .as_tensor()
            .sub(&target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        opt.backward_step(&l).unwrap();
        let l = theirs
            .as_tensor()
            .sub(&target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        reference.backward_step(&l).unwrap();
    }
    assert_eq!(bits(ours.as_tensor()), bits(theirs.as_tensor()));
    assert_ne!(bits(ours.as_tensor()), bits(&init));
}

#[test]
fn optimiser_state_round_trips_and_rejects_a_different_model() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, model, mut opt) = fresh(3);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut st = TrainState::new(1);
    train_step(&model, &mut opt, &mut rng, &mut st);
    let path = dir.path().join("opt.safetensors");
    opt.save_state(&path).unwrap();
    let (_vm2, _m2, mut opt2) = fresh(4);
    opt2.load_state(&path).unwrap();
    assert_eq!(opt2.step_count(), 1);

    let other = Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut wrong = AdamW::new(vec![("not.there".into(), other)], AdamWConfig::default()).unwrap();
    let err = format!("{:#}", wrong.load_state(&path).unwrap_err());
    assert!(err.contains("not.there") && err.contains("hint:"), "{err}");
    assert!(
        AdamW::new(
            vec![("a".into(), Var::zeros(1, DType::F32, &Device::Cpu).unwrap()); 2],
            AdamWConfig::default()
        )
        .is_err()
    );
}

#[test]
fn clip_grad_norm_scales_to_the_limit_and_reports_the_norm() {
    let a = Var::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
    let b = Var::new(&[0.0f32, 4.0], &Device::Cpu).unwrap();
    // loss = 0.5·|a|² + 0.5·|b|² has gradient (a, b): global norm 5.
    let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap()
        + b.as_tensor().sqr().unwrap().sum_all().unwrap())
    .unwrap()
    .affine(0.5, 0.0)
    .unwrap();
    let mut grads = loss.backward().unwrap();
    let params = [("a", &a), ("b", &b)];
    let norm = optim::clip_grad_norm(&mut grads, &params, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let after = optim::grad_norm(&grads, [&a, &b]).unwrap();
    assert!((after - 1.0).abs() < 1e-5, "{after}");
    // Under the limit nothing changes.
    let before = optim::grad_norm(&grads, [&a, &b]).unwrap();
    optim::clip_grad_norm(&mut grads, &params, 10.0).unwrap();
    assert_eq!(optim::grad_norm(&grads, [&a, &b]).unwrap(), before);
}

#[test]
fn guard_names_the_step_and_the_parameter() {
    let good = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let bad = Var::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
    // d/dx sqrt(x) at x = -1 is NaN; the good parameter's gradient stays finite.
    let loss = (good.as_tensor().sum_all().unwrap()
        + bad.as_tensor().sqrt().unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let params = [("layer.good", &good), ("layer.bad", &bad)];
    let err = guard::check_grads(12, &grads, &params).unwrap_err();
    assert_eq!(
        err,
        GuardError::NonFiniteGradient {
            step: 12,
            param: "layer.bad".into()
        }
    );
    assert!(err.to_string().contains("layer.bad") && err.to_string().contains("step 12"));
    assert!(guard::check_grads(12, &grads, &params[..1]).is_ok());

    let inf = Tensor::new(f32::INFINITY, &Device::Cpu).unwrap();
    assert!(matches!(
        guard::check_loss(3, &inf),
        Err(GuardError::NonFiniteLoss { step: 3, .. })
    ));
    assert!(
        guard::check_loss_value(3, f64::NAN)
            .unwrap_err()
            .to_string()
            .contains("hint:")
    );
    assert_eq!(guard::check_loss_value(3, 0.5), Ok(0.5));
}

#[test]
fn schedules_warm_up_then_decay() {
    let s = Schedule {
        peak_lr: 1.0,
        min_lr: 0.1,
        warmup_steps: 4,
        total_steps: 14,
        decay: Decay::Cosine,
    };
    assert!(s.validate().is_ok());
    assert_eq!([s.lr_at(0), s.lr_at(1), s.lr_at(3)], [0.25, 0.5, 1.0]);
    assert_eq!(s.lr_at(4), 1.0);
    assert!((s.lr_at(9) - 0.55).abs() < 1e-12, "{}", s.lr_at(9)); // half-way: mean of peak and min
    assert!((s.lr_at(14) - 0.1).abs() < 1e-12);
    assert!((s.lr_at(1000) - 0.1).abs() < 1e-12);
    let lin = Schedule {
        decay: Decay::Linear,
        ..s
    };
    assert!((lin.lr_at(9) - 0.55).abs() < 1e-12 && (lin.lr_at(6) - 0.82).abs() < 1e-12);
    let constant = Schedule {
        decay: Decay::Constant,
        ..s
    };
    assert_eq!(constant.lr_at(13), 1.0);
    assert!(
        Schedule {
            warmup_steps: 20,
            ..s
        }
        .validate()
        .is_err()
    );
    assert!(
        Schedule { peak_lr: 0.0, ..s }
            .validate()
            .unwrap_err()
            .contains("hint:")
    );
    let no_warmup = Schedule {
        warmup_steps: 0,
        ..s
    };
    assert_eq!(no_warmup.lr_at(0), 1.0);
}

#[test]
fn checkpoints_are_listed_only_when_complete_and_can_be_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    assert!(checkpoint::latest(&root).unwrap().is_none());
    let (vm, _model, opt) = fresh(5);
    let mut st = TrainState::new(5);
    for step in [2u64, 10, 4] {
        st.step = step;
        checkpoint::save(&root, &st, &vm, &opt).unwrap();
    }
    // Leftovers of a crashed save, and a directory without state.json, are not checkpoints.
    std::fs::create_dir_all(root.join("checkpoint-00000099.tmp-1234")).unwrap();
    std::fs::create_dir_all(root.join("checkpoint-00000077")).unwrap();
    let steps: Vec<u64> = checkpoint::list(&root)
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(steps, [2, 4, 10]);
    assert_eq!(
        checkpoint::latest(&root).unwrap().unwrap(),
        checkpoint::checkpoint_dir(&root, 10)
    );
    assert_eq!(checkpoint::remove_stale_tmp(&root).unwrap(), 1);

    // Saving the same step again replaces it in place.
    st.step = 10;
    st.epoch = 3;
    checkpoint::save(&root, &st, &vm, &opt).unwrap();
    assert_eq!(
        checkpoint::read_state(&checkpoint::checkpoint_dir(&root, 10))
            .unwrap()
            .epoch,
        3
    );
    let names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.contains(".tmp-") && !n.contains(".old-")),
        "{names:?}"
    );

    let removed = checkpoint::prune(&root, 1).unwrap();
    assert_eq!(removed.len(), 2);
    let steps: Vec<u64> = checkpoint::list(&root)
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(steps, [10]);

    // A corrupt state file is an error naming the file, not a silent fresh start.
    std::fs::write(
        checkpoint::checkpoint_dir(&root, 10).join(checkpoint::STATE_FILE),
        b"{",
    )
    .unwrap();
    let err = format!(
        "{:#}",
        checkpoint::read_state(&checkpoint::checkpoint_dir(&root, 10)).unwrap_err()
    );
    assert!(err.contains("state.json"), "{err}");
}

#[test]
fn rng_state_round_trips_mid_stream() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for _ in 0..13 {
        let _: u32 = rng.random();
    }
    let s = RngState::capture(&rng);
    let json = serde_json::to_string(&s).unwrap();
    let mut back = serde_json::from_str::<RngState>(&json)
        .unwrap()
        .restore()
        .unwrap();
    for _ in 0..5 {
        assert_eq!(rng.random::<u64>(), back.random::<u64>());
    }
    let bad = RngState {
        seed: "zz".into(),
        ..s
    };
    assert!(bad.restore().is_err());
}
