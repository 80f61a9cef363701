//! The one table of codecs: a wire format finds its codec here.

use super::codec::{Codec, SurfaceCodec};
use super::WireFormat;
use crate::error::Surface;

/// In `WireFormat` order (a test checks it).
static CODECS: [&dyn Codec; 5] = [
    &super::openai::codec::OpenAiCodec,
    &super::anthropic::AnthropicCodec,
    &super::cohere::CohereCodec,
    &super::gemini::GeminiCodec,
    &super::bedrock::BedrockCodec,
];

/// The client surfaces' codecs, in `Surface` order.
static SURFACES: [&dyn SurfaceCodec; 2] =
    [&super::openai::codec::OpenAiCodec, &super::anthropic::AnthropicCodec];

pub fn codec(format: WireFormat) -> &'static dyn Codec {
    CODECS[format as usize]
}

pub fn surface_codec(surface: Surface) -> &'static dyn SurfaceCodec {
    SURFACES[surface as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_finds_its_own_codec() {
        for format in WireFormat::ALL {
            assert_eq!(codec(format).format(), format);
        }
        for surface in [Surface::OpenAi, Surface::Anthropic] {
            assert_eq!(surface_codec(surface).surface(), surface);
            assert_eq!(surface_codec(surface).format(), WireFormat::from(surface));
        }
    }
}
