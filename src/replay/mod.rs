//! Experiments: stored traffic → the same routing decision → diff (PRODUCT.md §8.6).
//!
//! * `definition`: an experiment's body as the API takes it (both spellings), checked.
//! * `simulate`: `routing_only`, the candidate's decision for each stored request.
//! * `criteria`: scheduled experiments' success criteria and each run's verdict.
//! * `runner`: the queue and the worker thread that runs experiments, persists progress,
//!   results and per-request decisions in the state store, and honours cancels.

pub mod criteria;
pub mod definition;
pub mod live;
pub mod runner;
pub mod simulate;

pub use definition::{CandidateSpec, Definition, Mode};
pub use runner::Experiments;

/// The most requests one experiment replays (PRODUCT.md §8.6).
pub const MAX_SAMPLE: usize = 50_000;
