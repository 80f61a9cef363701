//! Provider response decoders (chat and embeddings) and the client encoders fed from what
//! they accept. The first byte picks the provider format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelux::error::Surface;
use modelux::wire::{self, embeddings::Encoding, WireFormat};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let format = WireFormat::ALL[usize::from(selector) % WireFormat::ALL.len()];
    if let Ok(resp) = wire::decode_response(format, body) {
        let _ = wire::encode_response(Surface::OpenAi, &resp);
        let _ = wire::encode_response(Surface::Anthropic, &resp);
    }
    if let Ok(resp) = wire::decode_embeddings(format, body) {
        let _ = wire::embeddings::encode_response(&resp, "m", Encoding::Base64);
    }
});
