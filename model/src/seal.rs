//! Sealing intents: proof that a logical-decoding message was written by a
//! region's own capture, not emitted by hand.
//!
//! Any role may call `pg_logical_emit_message`, with any prefix, so the
//! prefix proves nothing. Capture (which runs with the extension owner's
//! rights) seals each intent with an HMAC-SHA-256 under the region's link
//! key, a secret that only the extension owner and the peers' sidecars can
//! read; a receiving sidecar opens each message with that key and rejects
//! anything that does not open.
//!
//! On the wire a sealed intent is the tag (the HMAC's first 16 bytes, as 32
//! lowercase hex digits), then the intent's JSON.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Hex digits of the tag in front of the JSON.
pub const TAG_HEX: usize = 32;

fn mac(key: &[u8], body: &[u8]) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(body);
    m
}

/// `body` sealed under `key`.
pub fn seal(key: &[u8], body: &[u8]) -> Vec<u8> {
    let tag = mac(key, body).finalize().into_bytes();
    let mut out = Vec::with_capacity(TAG_HEX + body.len());
    for b in &tag[..TAG_HEX / 2] {
        out.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    out.extend_from_slice(body);
    out
}

/// The body of a message sealed under `key`, or why it is not one.
pub fn open<'a>(key: &[u8], message: &'a [u8]) -> Result<&'a [u8], &'static str> {
    if message.len() < TAG_HEX {
        return Err("the message is too short to carry a seal");
    }
    let (hex, body) = message.split_at(TAG_HEX);
    let tag: Option<Vec<u8>> = hex
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
        })
        .collect();
    let tag = tag.ok_or("the message carries no seal")?;
    // Constant-time comparison (the Mac trait's).
    mac(key, body)
        .verify_truncated_left(&tag)
        .map_err(|_| "the seal does not match: not written by the region's capture")?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_what_it_sealed() {
        let sealed = seal(b"key", br#"{"v":2}"#);
        assert_eq!(sealed.len(), TAG_HEX + 7);
        assert_eq!(open(b"key", &sealed), Ok(&br#"{"v":2}"#[..]));
    }

    #[test]
    fn refuses_another_key_a_changed_body_or_no_seal() {
        let sealed = seal(b"key", br#"{"v":2}"#);
        assert!(open(b"other", &sealed).is_err());
        let mut changed = sealed.clone();
        *changed.last_mut().unwrap() = b']';
        assert!(open(b"key", &changed).is_err());
        assert!(open(b"key", br#"{"v":2,"origin":"a","hlc":1,"schema":"public"}"#).is_err());
        assert!(open(b"key", b"short").is_err());
    }
}
