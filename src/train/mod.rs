//! Training: losses as pure tensor functions (`losses`) and the loop utilities every trainer
//! shares: our own AdamW with savable state (`optim`), learning-rate schedules (`schedule`),
//! atomic checkpoints for bit-identical resume (`checkpoint`) and non-finite guards (`guard`).

pub mod batching;
pub mod checkpoint;
pub mod device;
pub mod dpo_trainer;
pub mod guard;
pub mod kto_trainer;
pub mod losses;
pub mod optim;
pub mod policy_common;
pub mod policy_eval;
pub mod ppo_trainer;
pub mod progress;
pub mod reward_models;
pub mod reward_run;
pub mod reward_trainer;
pub mod schedule;
