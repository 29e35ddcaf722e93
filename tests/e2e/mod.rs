//! The end-to-end suites, one module per capability, and the harness they share.

pub mod harness;

mod broker_lifecycle;
mod cli_habits;
mod cli_tour;
mod cluster;
mod crash_recovery;
mod crash_recovery_damage;
mod forged_input;
mod groups;
mod hostile_input;
mod pipelines;
mod plugins;
mod shutdown;
mod topics_admin;
mod transactions;
