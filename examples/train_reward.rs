//! Trains a reward model from a preference file with the library's `train reward` stage, for
//! experiments before the CLI wiring (`rlhf-bot train reward` takes the same options).
//!
//! cargo run --release --example train_reward -- --model DIR --dataset FILE.jsonl --out DIR \
//!     [--epochs N] [--max-length N] [--batch-size N] [--lr X] [--seed N] [--eval-every N]

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use rlhf_bot::train::reward_run::{RewardTrainOptions, train_reward_blocking};

fn main() -> Result<()> {
    rlhf_bot::app::init_logging(0, false);
    let mut o = RewardTrainOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut val = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => o.model = Some(PathBuf::from(val()?)),
            "--dataset" => o.dataset = Some(PathBuf::from(val()?)),
            "--eval" => o.eval = Some(PathBuf::from(val()?)),
            "--out" => o.out = PathBuf::from(val()?),
            "--epochs" => o.train.epochs = val()?.parse()?,
            "--max-length" => o.train.max_length = val()?.parse()?,
            "--batch-size" => o.train.batch_size = val()?.parse()?,
            "--lr" => o.train.lr = val()?.parse()?,
            "--seed" => o.train.seed = val()?.parse()?,
            "--eval-every" => o.train.eval_every = val()?.parse()?,
            "--resume" => o.resume = true,
            other => bail!("unknown flag {other}"),
        }
    }
    let s = train_reward_blocking(&o)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}
