//! The end-to-end suites, one module per capability, and the harness they share.

pub mod checker;
pub mod harness;
pub mod netproxy;

mod broker_lifecycle;
mod cli_habits;
mod cli_tour;
mod cluster;
pub(crate) mod cluster_faults;
mod cluster_pipelines;
mod cluster_transactions;
mod crash_recovery;
mod crash_recovery_damage;
mod deposed_leader;
mod disk_failure;
mod forged_input;
mod greedy_clients;
mod group_rejoin;
mod groups;
mod hostile_input;
mod in_process;
mod older_clients;
mod pipelines;
mod plugins;
mod producer_numbering;
mod returning_broker;
mod shutdown;
mod topics_admin;
mod transactions;
mod txn_soak;
