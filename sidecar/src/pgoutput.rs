//! Just enough of the `pgoutput` logical-replication protocol (version 1) to
//! read Foreshadow's intents: BEGIN, logical-decoding MESSAGE and COMMIT. The
//! intents' publication holds no tables, so no other message kinds carry
//! anything we need; they are reported as `Other` and skipped.

use foreshadow_model::intent::MESSAGE_PREFIX;

/// A position in a peer's write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Lsn, String> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("not an LSN: {s:?}"))?;
        let part =
            |p: &str| u64::from_str_radix(p, 16).map_err(|e| format!("not an LSN: {s:?}: {e}"));
        Ok(Lsn((part(hi)? << 32) | part(lo)?))
    }
}

#[derive(Debug, PartialEq)]
pub enum Message<'a> {
    Begin {
        xid: u32,
    },
    /// A logical-decoding message (`pg_logical_emit_message`).
    Message {
        transactional: bool,
        prefix: &'a str,
        content: &'a [u8],
    },
    /// `end_lsn` is the position just past the commit record: a consumer that
    /// has applied this transaction may advance its slot and origin to it.
    Commit {
        end_lsn: Lsn,
        timestamp_us: i64,
    },
    Other(u8),
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(&'static str);

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError("unterminated string"))?;
        let s =
            std::str::from_utf8(&self.0[..end]).map_err(|_| DecodeError("string is not UTF-8"))?;
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
}

pub fn decode(data: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader(data);
    match r.u8()? {
        b'B' => {
            let _final_lsn = r.u64()?;
            let _timestamp = r.u64()?;
            Ok(Message::Begin { xid: r.u32()? })
        }
        b'M' => {
            let transactional = r.u8()? & 1 == 1;
            let _lsn = r.u64()?;
            let prefix = r.cstr()?;
            let len = r.u32()? as usize;
            Ok(Message::Message {
                transactional,
                prefix,
                content: r.take(len)?,
            })
        }
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            let end_lsn = Lsn(r.u64()?);
            Ok(Message::Commit {
                end_lsn,
                timestamp_us: r.u64()? as i64,
            })
        }
        other => Ok(Message::Other(other)),
    }
}

/// One committed peer transaction's intents, in commit order.
#[derive(Debug, Default, PartialEq)]
pub struct Transaction {
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 (PostgreSQL's epoch).
    pub timestamp_us: i64,
    /// Raw intent payloads, passed on unchanged so that numbers keep their
    /// exact text.
    pub intents: Vec<Vec<u8>>,
}

/// Assembles streamed pgoutput messages into committed transactions.
/// Collects a peer's intents into transactions. A transaction larger than
/// a chunk is handed out in chunks as it arrives ([`Grouper::take_chunk`]),
/// so that the sidecar's memory stays bounded whatever its size; its
/// `Transaction` at commit then holds only the intents after the last chunk.
#[derive(Default)]
pub struct Grouper {
    cur: Option<Transaction>,
    /// Bytes of intents in `cur`.
    bytes: usize,
}

impl Grouper {
    /// Takes the next message; returns the transaction it completes, if any.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<Transaction>, DecodeError> {
        match decode(data)? {
            // A transaction begun inside another would drop what the first
            // collected (and chunks of it may be applied already).
            Message::Begin { .. } if self.cur.is_some() => {
                return Err(DecodeError("a transaction began inside another"))
            }
            Message::Begin { .. } => self.cur = Some(Transaction::default()),
            Message::Message {
                transactional: true,
                prefix,
                content,
            } if prefix == MESSAGE_PREFIX => {
                self.cur
                    .as_mut()
                    .ok_or(DecodeError("message outside a transaction"))?
                    .intents
                    .push(content.to_vec());
                self.bytes += content.len();
            }
            Message::Commit {
                end_lsn,
                timestamp_us,
            } => {
                let mut txn = self.cur.take().ok_or(DecodeError("commit without begin"))?;
                self.bytes = 0;
                txn.end_lsn = end_lsn;
                txn.timestamp_us = timestamp_us;
                return Ok(Some(txn));
            }
            Message::Message { .. } | Message::Other(_) => {}
        }
        Ok(None)
    }

    /// Between transactions: nothing of one has arrived yet.
    pub fn between(&self) -> bool {
        self.cur.is_none()
    }

    /// The intents of the open transaction so far, if they are at least
    /// `max_bytes` or `max_intents`: taken out, to be applied before the rest
    /// of the transaction arrives.
    pub fn take_chunk(&mut self, max_bytes: usize, max_intents: usize) -> Option<Vec<Vec<u8>>> {
        let cur = self.cur.as_mut()?;
        if self.bytes < max_bytes && cur.intents.len() < max_intents {
            return None;
        }
        self.bytes = 0;
        Some(std::mem::take(&mut cur.intents))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin() -> Vec<u8> {
        let mut v = vec![b'B'];
        v.extend(1u64.to_be_bytes());
        v.extend(2u64.to_be_bytes());
        v.extend(7u32.to_be_bytes());
        v
    }
    fn message(prefix: &str, content: &[u8]) -> Vec<u8> {
        let mut v = vec![b'M', 1];
        v.extend(5u64.to_be_bytes());
        v.extend(prefix.as_bytes());
        v.push(0);
        v.extend((content.len() as u32).to_be_bytes());
        v.extend(content);
        v
    }
    fn commit(end: u64) -> Vec<u8> {
        let mut v = vec![b'C', 0];
        v.extend(9u64.to_be_bytes());
        v.extend(end.to_be_bytes());
        v.extend(3u64.to_be_bytes());
        v
    }

    fn group(rows: &[Vec<u8>]) -> Result<Vec<Transaction>, DecodeError> {
        let mut g = Grouper::default();
        let mut out = Vec::new();
        for r in rows {
            out.extend(g.feed(r)?);
        }
        Ok(out)
    }

    #[test]
    fn groups_intents_by_transaction_and_skips_foreign_messages() {
        let rows = vec![
            begin(),
            message("foreshadow", b"{1}"),
            message("other", b"x"),
            message("foreshadow", b"{2}"),
            commit(0x1_0000_0010),
            begin(),
            commit(0x20),
        ];
        let txns = group(&rows).unwrap();
        assert_eq!(txns.len(), 2);
        assert_eq!(txns[0].intents, vec![b"{1}".to_vec(), b"{2}".to_vec()]);
        assert_eq!(txns[0].end_lsn.to_string(), "1/10");
        assert!(txns[1].intents.is_empty());
    }

    #[test]
    fn hands_out_a_large_transaction_in_chunks() {
        let mut g = Grouper::default();
        assert!(g.feed(&begin()).unwrap().is_none());
        let mut chunks = Vec::new();
        for i in 0..10u8 {
            g.feed(&message("foreshadow", &[b'{', i, b'}'])).unwrap();
            chunks.extend(g.take_chunk(usize::MAX, 4));
        }
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4]);
        let last = g.feed(&commit(0x30)).unwrap().unwrap();
        assert_eq!(last.intents.len(), 2);
        assert!(
            g.take_chunk(0, 0).is_none(),
            "nothing open after the commit"
        );
        g.feed(&begin()).unwrap();
        g.feed(&message("foreshadow", &[0; 100])).unwrap();
        assert_eq!(g.take_chunk(100, usize::MAX).map(|c| c.len()), Some(1));
    }

    #[test]
    fn refuses_truncated_and_orphan_messages() {
        let mut m = message("foreshadow", b"abc");
        m.truncate(m.len() - 1);
        assert_eq!(decode(&m), Err(DecodeError("truncated")));
        assert!(group(&[message("foreshadow", b"{}")]).is_err());
        assert!(group(&[commit(1)]).is_err());
        assert!(group(&[begin(), message("foreshadow", b"{}"), begin()]).is_err());
    }

    #[test]
    fn lsn_text_round_trips() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("nope".parse::<Lsn>().is_err());
    }
}
