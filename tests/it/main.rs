//! The project's single integration-test binary; each module tests one area.
mod bert;
