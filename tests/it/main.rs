//! The single integration-test binary (one link step for all integration tests).
mod losses;
mod train_utils;
