//! modelux load harness.
//!
//! * [`mock`]: an in-process mock upstream speaking the published OpenAI Chat
//!   Completions and Anthropic Messages wire formats (fixtures in
//!   `tests/fixtures/openai/` and `tests/fixtures/anthropic/`).
//! * [`httpc`]: a minimal HTTP/1.1 client (keep-alive, chunked, streaming)
//!   used by the gateway's integration tests and by the `loadgen` driver.
//!
//! Both are deliberately small and dependency-light so they can serve as a
//! fast baseline in load tests and as a predictable peer in tests.

mod anthropic;
pub mod httpc;
pub mod mock;
mod template;
mod wire;
