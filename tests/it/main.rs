//! The single integration-test binary; each module tests one area.
mod registry;
mod report;
