//! Everything that talks to GitHub: the REST API through octocrab (branches, commits, pull
//! requests) and the GitHub Actions runner environment (outputs, step summary, masks,
//! annotations). This module carries out decisions; it never makes them.

pub mod actions;
