//! A GRPO step beside a PPO step at issue 19's shape, alternated in one process so both see the
//! same machine load: SmolLM2-135M-Instruct (GGUF dequantised to f32) with LoRA r 16, α 32 on
//! q/k/v/o (as `configs/smollm2-demo.yaml`), 32 sequences of up to 64 new tokens per step,
//! sampled at temperature 0.7 in one KV-cached batch, reward model the same SmolLM2 body as a
//! sequence classifier (fresh `score` head: a reward model of the policy's size).
//!
//! - GRPO: 8 prompts × 4 completions, TRL's defaults otherwise (β 0: no reference pass, one
//!   optimiser update per generation batch, `dapo` loss).
//! - PPO: the same 8 prompts each 4 times (32 rollouts), TRL's defaults (4 PPO epochs over one
//!   minibatch, value head on the policy, KL to the reference in the reward, GAE).
//!
//! Each round runs one step of each (the order flips every round) through the trainers' own
//! `train_group_rl` / `train_ppo` on a freshly loaded policy, and reads the phases they book in
//! `TrainOutcome::phase_seconds`. It prints every round, then the median of each phase group and
//! the PPO/GRPO ratio of the medians. The groups: generation; scoring (reward model); reference /
//! old-policy / value forward passes (no graph); the training forward; backward + AdamW.
//!
//! Run: `cargo build --release --bench group_rl_step`, then the binary it names under
//! `target/release/deps/` with `--bench` (env: `ROUNDS`, default 3). Needs the GGUF (see
//! `fetch-models.sh`; `RLHF_MODELS_DIR`), else prints "skipped".

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use rlhf_bot::run::outputs::PolicyAlgo;
use rlhf_bot::train::dpo_trainer::TrainOutcome;
use rlhf_bot::train::group_rl_trainer::train_group_rl;
use rlhf_bot::train::policy_common::{GroupRlOptions, Policy, PolicyTrainOptions, PpoOptions};
use rlhf_bot::train::policy_eval::RewardScorer;
use rlhf_bot::train::ppo_trainer::train_ppo;

mod common;
use common::{chat_prompts, policy_step_options, smollm2_hf_dir, start_bench};

const GENERATIONS: usize = 4;
const NEW_TOKENS: usize = 64;
const TEMPERATURE: f32 = 0.7;

/// The phase groups the report compares, and the trainer phases each one sums.
const GROUPS: [(&str, &[&str]); 6] = [
    ("generation", &["rollout generation"]),
    ("reward scoring", &["reward scoring", "step scoring"]),
    (
        "reference / old policy / value fwd",
        &[
            "reference logprobs",
            "policy logprobs",
            "policy logprobs + values",
        ],
    ),
    ("training forward", &["forward"]),
    ("backward + AdamW", &["backward + optimiser"]),
    (
        "other (advantages, GAE, metrics)",
        &["advantages", "rewards + GAE", "metrics + checkpoint"],
    ),
];

fn options(algo: PolicyAlgo, prompts: usize) -> PolicyTrainOptions {
    PolicyTrainOptions {
        max_steps: Some(1),
        batch_size: 8,
        ppo: PpoOptions {
            rollouts_per_step: prompts * GENERATIONS,
            ppo_epochs: 4,
            num_minibatches: 1,
            temperature: TEMPERATURE,
            ..PpoOptions::default()
        },
        grpo: GroupRlOptions {
            prompts_per_step: prompts,
            num_generations: GENERATIONS,
            temperature: TEMPERATURE,
            ..GroupRlOptions::default()
        },
        ..policy_step_options(algo, NEW_TOKENS)
    }
}

/// One step of `algo` on a freshly loaded policy, in a scratch run directory.
fn one_step(
    algo: PolicyAlgo,
    model: &Path,
    rm: &RewardScorer,
    prompts: &[String],
    scratch: &Path,
) -> Result<TrainOutcome> {
    let out = scratch.join(algo.as_str());
    if out.exists() {
        std::fs::remove_dir_all(&out).context("clearing the previous round's run")?;
    }
    let opts = options(algo, prompts.len());
    let mut policy = Policy::load(model, opts.lora.as_ref(), opts.seed, &Device::Cpu)?;
    if algo == PolicyAlgo::Ppo {
        // PPO answers each prompt once: the 8 prompts each 4 times, as GRPO's groups.
        let repeated: Vec<String> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), GENERATIONS))
            .collect();
        train_ppo(&mut policy, rm, &repeated, &opts, &out)
    } else {
        train_group_rl(&mut policy, rm, prompts, &opts, &out)
    }
}

/// Seconds of each phase group in one step, then the total. A phase no group names is an error:
/// the trainers booked something new and the split would silently miss it.
fn grouped(o: &TrainOutcome) -> Result<Vec<f64>> {
    let seconds = |keep: &dyn Fn(&str) -> bool| {
        o.phase_seconds
            .iter()
            .filter(|(n, _)| keep(n))
            .fold(0.0, |sum, (_, s)| sum + s)
    };
    let unknown: Vec<&str> = o
        .phase_seconds
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !GROUPS.iter().any(|(_, p)| p.contains(n)))
        .collect();
    if !unknown.is_empty() {
        anyhow::bail!("phases with no group in this bench: {unknown:?}\nhint: add them to GROUPS");
    }
    let mut v: Vec<f64> = GROUPS
        .iter()
        .map(|(_, phases)| seconds(&|n| phases.contains(&n)))
        .collect();
    v.push(seconds(&|_| true));
    Ok(v)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn print_row(label: &str, values: &[f64]) {
    let cells: Vec<String> = values.iter().map(|s| format!("{s:>9.2}")).collect();
    println!("  {label:<24} {}", cells.join(" "));
}

fn main() -> Result<()> {
    start_bench();
    let rounds: usize = std::env::var("ROUNDS")
        .map_or(Ok(3), |v| v.parse())
        .context("ROUNDS must be a whole number of rounds, e.g. ROUNDS=3")?;
    let rounds = rounds.max(1);
    let tmp = tempfile::tempdir().context("creating a scratch directory")?;
    let Some(dir) = smollm2_hf_dir(tmp.path())? else {
        return Ok(());
    };
    let prompts = chat_prompts(&dir)?;
    let rm = RewardScorer::load(&dir, &Device::Cpu)?;
    println!(
        "GRPO vs PPO step, SmolLM2-135M-Instruct + LoRA r16 q/k/v/o, reward model SmolLM2-135M: {} prompts x {GENERATIONS} completions x {NEW_TOKENS} new tokens; threads {}; {rounds} rounds",
        prompts.len(),
        candle_core::utils::get_num_threads(),
    );
    let mut header: Vec<&str> = GROUPS.iter().map(|(n, _)| *n).collect();
    header.push("total");
    for (i, h) in header.iter().enumerate() {
        println!("  column {i}: {h}");
    }
    let algos = [PolicyAlgo::Grpo, PolicyAlgo::Ppo];
    let mut seen: [Vec<Vec<f64>>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for k in 0..2 {
            // Flip the order every round so neither algorithm always runs second.
            let which = (k + round) % 2;
            let o = one_step(algos[which], &dir, &rm, &prompts, tmp.path())?;
            let row = grouped(&o)?;
            let label = format!(
                "round {} {} ({:.0} tok/row)",
                round + 1,
                algos[which].as_str(),
                o.tokens as f64 / (prompts.len() * GENERATIONS) as f64
            );
            print_row(&label, &row);
            seen[which].push(row);
        }
    }
    let medians: Vec<Vec<f64>> = seen
        .iter()
        .map(|rows| {
            (0..rows[0].len())
                .map(|c| median(rows.iter().map(|r| r[c]).collect()))
                .collect()
        })
        .collect();
    println!("medians over {rounds} rounds (s):");
    print_row("grpo", &medians[0]);
    print_row("ppo", &medians[1]);
    let ratio: Vec<f64> = medians[1]
        .iter()
        .zip(&medians[0])
        .map(|(p, g)| if *g > 0.0 { p / g } else { f64::NAN })
        .collect();
    print_row("ppo / grpo", &ratio);
    Ok(())
}
