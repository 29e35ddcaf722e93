//! The end-to-end suites, one module per capability, and the harness they share.

pub mod harness;

mod broker_lifecycle;
mod cli_tour;
mod crash_recovery;
mod hostile_input;
mod topics_admin;
