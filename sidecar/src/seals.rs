//! Checking that every message from a peer was sealed by the peer's own
//! capture (`foreshadow_model::seal`), with the link key read from the peer
//! over the authenticated SQL connection. Any role on the peer can emit a
//! message with Foreshadow's prefix; only capture can seal one.

use crate::error::Error;
use foreshadow_model::seal;
use std::time::Duration;
use tokio_postgres::Client;

/// The peer's link key. Never logged.
pub struct LinkKey(Vec<u8>);

impl LinkKey {
    pub async fn read(remote: &Client, peer: &str, timeout: Duration) -> Result<LinkKey, Error> {
        let what = format!("reading the link key of peer {peer}");
        let row = tokio::time::timeout(
            timeout,
            remote.query_one("SELECT foreshadow.link_key()", &[]),
        )
        .await
        .map_err(|_| Error::timeout(&what))?
        .map_err(|e| {
            let mut e = Error::from_pg(&what, e);
            e.message.push_str(
                " (on the peer, run SELECT foreshadow.grant_sidecar('<the role this sidecar logs in as>'))",
            );
            e
        })?;
        Ok(LinkKey(row.get(0)))
    }

    /// Replaces each sealed message by its intent, and each message that is
    /// not sealed by the peer's capture by a rejection that the extension
    /// keeps as a `forged` dead letter (in the transaction that moves past
    /// it, so it is kept exactly once). Returns how many were rejected.
    pub fn open_all(&self, peer: &str, messages: &mut [Vec<u8>]) -> usize {
        let mut rejected = 0;
        for m in messages.iter_mut() {
            match seal::open(&self.0, m) {
                Ok(_) => {
                    m.drain(..seal::TAG_HEX);
                }
                Err(why) => {
                    rejected += 1;
                    tracing::warn!(
                        peer,
                        reason = why,
                        "rejected a message that the peer's capture did not write"
                    );
                    let rejection = serde_json::json!({"rejected": {
                        "reason": format!("{why} (message from region {peer})"),
                        "message": String::from_utf8_lossy(m),
                    }});
                    *m = serde_json::to_vec(&rejection).expect("JSON serialises");
                }
            }
        }
        rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_sealed_messages_and_wraps_the_rest() {
        let key = LinkKey(b"k".to_vec());
        let mut messages = vec![
            seal::seal(b"k", br#"{"v":2}"#),
            br#"{"v":2,"origin":"a"}"#.to_vec(),
            seal::seal(b"other key", br#"{"v":2}"#),
        ];
        assert_eq!(key.open_all("a", &mut messages), 2);
        assert_eq!(messages[0], br#"{"v":2}"#);
        for m in &messages[1..] {
            let v: serde_json::Value = serde_json::from_slice(m).unwrap();
            assert!(v["rejected"]["reason"]
                .as_str()
                .unwrap()
                .contains("region a"));
        }
        let v: serde_json::Value = serde_json::from_slice(&messages[1]).unwrap();
        assert_eq!(v["rejected"]["message"], r#"{"v":2,"origin":"a"}"#);
    }
}
