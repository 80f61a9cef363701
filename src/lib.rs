//! modelux: a self-hosted control plane for LLM traffic on Pingora.

pub mod admission;
pub mod auth;
pub mod cache;
pub mod config;
pub mod conn;
pub mod error;
pub mod estimate;
pub mod manage;
pub mod metrics;
pub mod prices;
pub mod providers;
pub mod proxy;
pub mod replay;
pub mod routing;
pub mod server;
pub mod spend;
pub mod sse;
pub mod state;
pub mod trace;
pub mod wire;
