//! Checks on a client's SDP offer before any WebRTC state is built, so a bad offer gets a 400
//! that says what is wrong.

use super::error::ApiError;
use webrtc::peer_connection::RTCSessionDescription;

/// Offers larger than this are refused before parsing (real offers are a few kilobytes).
pub const MAX_OFFER_BYTES: usize = 64 * 1024;

/// Parses `sdp` as an offer and checks that it carries an audio section offering Opus.
pub fn parse_offer(sdp: &str) -> Result<RTCSessionDescription, ApiError> {
    if sdp.trim().is_empty() {
        return Err(ApiError::BadSdp("the offer is empty".into()));
    }
    let offer = RTCSessionDescription::offer(sdp.to_owned())
        .map_err(|err| ApiError::BadSdp(err.to_string()))?;
    let parsed = offer
        .unmarshal()
        .map_err(|err| ApiError::BadSdp(err.to_string()))?;
    let audio: Vec<_> = parsed
        .media_descriptions
        .iter()
        .filter(|m| m.media_name.media == "audio")
        .collect();
    if audio.is_empty() {
        return Err(ApiError::NoAudio);
    }
    let codecs: Vec<String> = audio
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter(|a| a.key == "rtpmap")
        .filter_map(|a| a.value.as_deref())
        .filter_map(|v| v.split_once(' ').map(|(_, codec)| codec.to_owned()))
        .collect();
    if !codecs
        .iter()
        .any(|c| c.to_ascii_lowercase().starts_with("opus/48000"))
    {
        let offered = if codecs.is_empty() {
            "nothing".to_owned()
        } else {
            codecs.join(", ")
        };
        return Err(ApiError::NoOpus { offered });
    }
    Ok(offer)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A trimmed Chromium audio + data channel offer.
    pub(crate) const CHROME_OFFER: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0 1\r\n\
a=msid-semantic: WMS\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:Ab3d\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=ice-options:trickle\r\n\
a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=sendrecv\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=rtcp-fb:111 transport-cc\r\n\
a=fmtp:111 minptime=10;useinbandfec=1\r\n\
a=rtpmap:63 red/48000/2\r\n\
a=rtpmap:9 G722/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:13 CN/8000\r\n\
a=rtpmap:110 telephone-event/48000\r\n\
a=rtpmap:126 telephone-event/8000\r\n\
a=ssrc:1001 cname:abc\r\n\
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n\
c=IN IP4 0.0.0.0\r\n\
a=ice-ufrag:Ab3d\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
a=setup:actpass\r\n\
a=mid:1\r\n\
a=sctp-port:5000\r\n\
a=max-message-size:262144\r\n";

    #[test]
    fn a_browser_offer_is_accepted() {
        parse_offer(CHROME_OFFER).unwrap();
    }

    #[test]
    fn garbage_is_a_parse_error_with_a_reason() {
        for garbage in ["", "hello", "v=0\r\nthis is not sdp\r\n", "m=audio\r\n"] {
            let err = parse_offer(garbage).unwrap_err();
            assert!(
                matches!(err, ApiError::BadSdp(ref reason) if !reason.is_empty()),
                "{garbage:?}: {err}"
            );
        }
    }

    #[test]
    fn an_offer_without_audio_is_refused() {
        let (session, rest) = CHROME_OFFER.split_once("m=audio").unwrap();
        let data_only = format!(
            "{session}m=application{}",
            rest.split_once("m=application").unwrap().1
        );
        let data_only = data_only.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 1");
        assert!(matches!(parse_offer(&data_only), Err(ApiError::NoAudio)));
    }

    #[test]
    fn an_offer_without_opus_names_what_it_offered() {
        let no_opus = CHROME_OFFER
            .replace("a=rtpmap:111 opus/48000/2\r\n", "")
            .replace("a=rtcp-fb:111 transport-cc\r\n", "")
            .replace("a=fmtp:111 minptime=10;useinbandfec=1\r\n", "")
            .replace("SAVPF 111 63", "SAVPF 63");
        let err = parse_offer(&no_opus).unwrap_err();
        assert!(
            matches!(&err, ApiError::NoOpus { offered } if offered.contains("PCMU/8000")),
            "{err}"
        );
    }
}
