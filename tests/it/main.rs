//! The one integration-test binary: every module below shares the helpers in `common` and the
//! real feedback API server in `feedback_server`.

mod bert;
mod bucket;
mod check_props;
mod child_usage;
mod common;
mod config;
mod crash;
mod cuda;
mod dataset;
mod deploy;
mod dpospeed;
mod export_model;
mod feedback_server;
mod firstrun;
mod forge_behaviour;
mod forge_contract;
mod hostile;
mod hygiene;
mod install;
mod llama;
mod losses;
mod matvec;
mod moto;
mod policy_model;
mod policycli;
mod policytrain;
mod promotion;
mod pull;
mod pull_hostile;
mod registry;
mod report;
mod rewardloss;
mod train_utils;
mod trainer;
mod unreachable_api;
