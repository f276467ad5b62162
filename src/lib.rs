//! rlhf-bot turns human feedback on a chat assistant into a better, reviewed model: it pulls
//! feedback into a durable store, decides whether retraining is due, trains, reports, and opens a
//! pull request. `main.rs` is a thin shell over [`app::run`]; everything else is library code.

pub mod app;
pub mod artifacts;
pub mod atomic_file;
pub mod cli;
pub mod config;
pub mod constitution;
pub mod dashboard;
pub mod dataset;
pub mod decision;
pub mod deploy;
pub mod evals;
pub mod feedback;
pub mod forge;
pub mod hub;
pub mod kernels;
pub mod kpi;
pub mod model;
pub mod model_kind;
pub mod nesting;
pub mod proposals;
pub mod registry;
pub mod report;
pub mod retry;
pub mod rlaif;
pub mod run;
pub mod sanitize;
pub mod secret;
pub mod server;
pub mod sqlite_pages;
pub mod stats;
pub mod train;
