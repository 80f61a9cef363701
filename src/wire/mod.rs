//! Wire formats. No I/O here: bytes in, bytes out.

pub mod openai;
