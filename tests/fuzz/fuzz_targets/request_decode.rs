//! Client request decoders (OpenAI, Anthropic, embeddings) and every provider encoder fed
//! from what they accept. The first byte picks the decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelux::error::Surface;
use modelux::wire::{self, routed::RoutedRequest, WireFormat};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    match selector % 3 {
        0 | 1 => {
            let surface = if selector % 3 == 0 { Surface::OpenAi } else { Surface::Anthropic };
            if let Ok(view) = RoutedRequest::parse(body) {
                let _ = view.encode_for_upstream("m");
            }
            if let Ok(req) = wire::decode_request(surface, body) {
                for format in WireFormat::ALL {
                    let _ = wire::encode_request(format, &req, "model/x:1");
                }
            }
        }
        _ => {
            if let Ok((req, _)) = wire::embeddings::decode_request(body) {
                for format in WireFormat::ALL {
                    let _ = wire::encode_embeddings(format, &req, "m");
                }
            }
        }
    }
});
