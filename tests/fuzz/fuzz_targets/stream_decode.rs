//! Stream transcoding from every provider format to both client surfaces, with the
//! upstream bytes cut into reads at fuzzer-chosen offsets. Byte 0 picks the formats and
//! whether the client asked for usage, byte 1 the read size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelux::error::Surface;
use modelux::wire::{Transcoder, WireFormat};

fuzz_target!(|data: &[u8]| {
    let [selector, chunk, body @ ..] = data else { return };
    let format = WireFormat::ALL[usize::from(*selector) % WireFormat::ALL.len()];
    let client = if selector & 0x40 == 0 { Surface::OpenAi } else { Surface::Anthropic };
    let framer = modelux::providers::registry::framer_for(format);
    let mut t = Transcoder::new(framer, format, client, "m", selector & 0x80 != 0);
    let mut out = Vec::new();
    for piece in body.chunks(usize::from(*chunk).max(1)) {
        if t.feed(piece, &mut out).is_err() {
            t.fail("api_error", "bad upstream", &mut out);
            return;
        }
    }
    if t.finish(&mut out).is_err() {
        t.fail("api_error", "cut short", &mut out);
    }
    let _ = t.usage();
});
