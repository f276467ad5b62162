//! The one integration-test binary: every module below shares the helpers in `common` and the
//! real feedback API server in `feedback_server`.

mod check_props;
mod common;
mod config;
mod crash;
mod dataset;
mod feedback_server;
mod pull;
