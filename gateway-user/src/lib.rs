//! Portcullis: a host daemon that intercepts AI agents' outbound connections
//! with eBPF, ties each flow to an identity and governs it command by command.
//!
//! Module map (each module's doc says what it owns and must not touch):
//! - [`redirect`]: eBPF programs, pins, kernel maps, per-netns listeners.
//! - [`identity`]: tags and the cgroup tree.
//! - [`policy`]: the policy set and destination matching.
//! - [`mask`]: masking rules compiled per resource, detectors, streaming maskers.
//! - [`proxy`]: flow attribution, refusal, sessions, protocol handlers.
//! - [`audit`]: the tamper-evident audit log and its readers.
//! - [`record`]: per-session recordings (JSON Lines, asciicast, HAR), replay.
//! - [`admin`]: the admin socket; [`cli`]: the command line.
//! - [`daemon`]: wiring and background loops; [`config`], [`sys`], [`metrics`]
//!   (Prometheus text, health and readiness).
//! - [`fleet`]: requests, grants and audit shared by several nodes in PostgreSQL.
//! - [`install`]: `portcullis install` / `uninstall` (files, systemd unit).
//! - [`fuzzing`]: entry points of the fuzz targets and their stable replay.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod console;
pub mod daemon;
pub mod fleet;
pub mod fuzzing;
pub mod identity;
pub mod install;
pub mod jit;
pub mod limits;
pub mod mask;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod record;
pub mod redirect;
pub mod sys;
#[cfg(test)]
mod testutil;
pub mod workers;
