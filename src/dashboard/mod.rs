//! The training dashboard (`rlhf-bot dashboard --out DIR`, and `GET /dashboard` in
//! `rlhf-bot serve`): model versions with lineage and status, KPI trends with intervals,
//! training curves, two versions side by side, what is deployed, and "Retrain now".
//!
//! - [`data`]: gathering what the page shows into one value (no network, no database);
//! - [`page`]: that value as one self-contained HTML page (the script draws SVG itself);
//! - [`retrain`]: the workflow dispatch behind the live page's button.
//!
//! docs/dashboard.md is the user's guide.

pub mod data;
pub mod page;
pub mod retrain;

pub use data::{DailyKpis, DashboardData, Retrain, Sources, gather};
