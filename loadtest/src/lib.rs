//! modelux load harness.
//!
//! * [`mock`]: an in-process mock upstream speaking the published wire
//!   formats of OpenAI (chat completions, embeddings), Anthropic Messages,
//!   Google Gemini, Cohere v2, Amazon Bedrock Converse and Azure OpenAI
//!   (OpenAI/Anthropic shapes cut from the fixtures in `tests/fixtures/`).
//! * [`httpc`]: a minimal HTTP/1.1 client (keep-alive, chunked, streaming)
//!   used by the gateway's integration tests and by the `loadgen` driver.
//!
//! Both are deliberately small and dependency-light so they can serve as a
//! fast baseline in load tests and as a predictable peer in tests.

mod answer;
mod anthropic;
mod azure;
mod bedrock;
mod cohere;
mod files;
pub mod fuzz;
mod gemini;
pub mod httpc;
mod media;
pub mod mock;
mod openai;
mod responses;
mod template;
mod wire;
