//! A peer's intents over the streaming replication protocol: the peer's
//! walsender pushes each transaction as it commits (nothing polled, every
//! change decoded once), and standby status updates tell it how far this
//! region has durably applied, which is what lets it release WAL.
//!
//! tokio-postgres has no replication mode, so this speaks the few messages
//! it needs itself (startup, authentication, START_REPLICATION, CopyData),
//! with `postgres-protocol` for encoding and SCRAM/MD5.

use crate::error::Error;
use crate::pgoutput::Lsn;
use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

pub struct ReplicationStream {
    sock: TcpStream,
    buf: BytesMut,
    what: String,
    /// The peer's process serving this connection (its walsender), from
    /// BackendKeyData: how the peer is asked whether it is still working.
    pub backend_pid: Option<i32>,
}

/// What the peer sent.
#[derive(Debug)]
pub enum Event {
    /// One pgoutput message.
    Data(bytes::Bytes),
    /// A keepalive: the peer has sent everything up to this position
    /// (`reply`: it asks for a status update now).
    Keepalive { wal_end: Lsn, reply: bool },
}

struct Frame {
    tag: u8,
    body: bytes::Bytes,
}

fn server_error(body: &[u8]) -> String {
    // Fields: a type byte then a C string each; 'M' is the message, 'C' the SQLSTATE.
    let (mut msg, mut code) = (String::new(), String::new());
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'M' => msg = text,
            b'C' => code = text,
            _ => {}
        }
    }
    format!("ERROR: {msg} (SQLSTATE {code})")
}

impl ReplicationStream {
    /// Connects to the peer in replication mode and starts streaming slot
    /// `slot` from `start` (the position this region has applied up to).
    pub async fn start(
        dsn: &str,
        slot: &str,
        start: Lsn,
        what: &str,
        timeout: Duration,
    ) -> Result<ReplicationStream, Error> {
        let config = tokio_postgres::Config::from_str(dsn).map_err(|e| Error::protocol(what, e))?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => return Err(Error::protocol(what, "the peer's dsn needs a TCP host")),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config
            .get_user()
            .ok_or_else(|| Error::protocol(what, "the peer's dsn needs a user"))?
            .to_string();
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        let password = config.get_password().map(<[u8]>::to_vec);
        let connect = async {
            let sock = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| Error::transient(format!("connecting to {what}"), e))?;
            sock.set_nodelay(true).ok();
            let mut s = ReplicationStream {
                sock,
                buf: BytesMut::with_capacity(64 * 1024),
                what: what.to_string(),
                backend_pid: None,
            };
            s.startup(&user, &dbname, password.as_deref()).await?;
            let mut out = BytesMut::new();
            frontend::query(
                &format!(
                    "START_REPLICATION SLOT {slot} LOGICAL {start} \
                     (\"proto_version\" '1', \"publication_names\" 'foreshadow_intents', \"messages\" 'true')"
                ),
                &mut out,
            )
            .map_err(|e| Error::protocol(what, e))?;
            s.send(&out).await?;
            loop {
                let f = s.frame().await?;
                match f.tag {
                    b'W' => return Ok(s),
                    b'N' | b'S' => {}
                    b'E' => return Err(s.refused(&f.body)),
                    t => {
                        return Err(Error::protocol(
                            what,
                            format!("unexpected message {:?} after START_REPLICATION", t as char),
                        ))
                    }
                }
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| Error::timeout(format!("starting replication from {what}")))?
    }

    /// A refusal by the server: a missing slot or privilege needs an operator.
    fn refused(&self, body: &[u8]) -> Error {
        let msg = server_error(body);
        if msg.contains("SQLSTATE 42") || msg.contains("SQLSTATE 28") || msg.contains("SQLSTATE 55")
        {
            Error::protocol(self.what.clone(), msg)
        } else {
            Error::transient(self.what.clone(), msg)
        }
    }

    async fn startup(
        &mut self,
        user: &str,
        db: &str,
        password: Option<&[u8]>,
    ) -> Result<(), Error> {
        let what = self.what.clone();
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", user),
                ("database", db),
                ("replication", "database"),
                ("application_name", "foreshadow-sidecar"),
            ],
            &mut out,
        )
        .map_err(|e| Error::protocol(&what, e))?;
        self.send(&out).await?;
        let need_password =
            || Error::protocol(&what, "the peer asks for a password and the dsn has none");
        let mut scram: Option<ScramSha256> = None;
        loop {
            let mut f = self.frame().await?;
            let mut out = BytesMut::new();
            match f.tag {
                b'R' if f.body.len() < 4 => {
                    return Err(Error::protocol(&what, "short authentication message"))
                }
                b'R' => match f.body.get_i32() {
                    0 => {}
                    3 => frontend::password_message(password.ok_or_else(need_password)?, &mut out)
                        .map_err(|e| Error::protocol(&what, e))?,
                    5 => {
                        let salt: [u8; 4] = f
                            .body
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .ok_or_else(|| Error::protocol(&what, "short MD5 salt"))?;
                        let hash =
                            md5_hash(user.as_bytes(), password.ok_or_else(need_password)?, salt);
                        frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(|e| Error::protocol(&what, e))?;
                    }
                    10 => {
                        let offers_scram = f
                            .body
                            .split(|&b| b == 0)
                            .any(|m| m == SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            return Err(Error::protocol(
                                &what,
                                "the peer offers no SASL mechanism this sidecar knows",
                            ));
                        }
                        let s = ScramSha256::new(
                            password.ok_or_else(need_password)?,
                            ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                            .map_err(|e| Error::protocol(&what, e))?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| Error::protocol(&what, "SASL out of order"))?;
                        s.update(&f.body).map_err(|e| Error::protocol(&what, e))?;
                        frontend::sasl_response(s.message(), &mut out)
                            .map_err(|e| Error::protocol(&what, e))?;
                    }
                    12 => scram
                        .as_mut()
                        .ok_or_else(|| Error::protocol(&what, "SASL out of order"))?
                        .finish(&f.body)
                        .map_err(|e| Error::protocol(&what, e))?,
                    other => {
                        return Err(Error::protocol(
                            &what,
                            format!("unsupported authentication method {other}"),
                        ))
                    }
                },
                b'E' => return Err(self.refused(&f.body)),
                b'Z' => return Ok(()),
                b'K' if f.body.len() >= 4 => self.backend_pid = Some(f.body.get_i32()),
                _ => {} // ParameterStatus, notices
            }
            if !out.is_empty() {
                self.send(&out).await?;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.sock
            .write_all(bytes)
            .await
            .map_err(|e| Error::transient(self.what.clone(), e))
    }

    /// The next whole protocol message. Cancel-safe: a partial message stays
    /// in the buffer for the next call.
    async fn frame(&mut self) -> Result<Frame, Error> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if len < 4 {
                    return Err(Error::protocol(self.what.clone(), "invalid message length"));
                }
                if self.buf.len() > len {
                    let mut frame = self.buf.split_to(len + 1);
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok(Frame {
                        tag,
                        body: frame.freeze(),
                    });
                }
                self.buf.reserve(len + 1 - self.buf.len());
            }
            let n = self
                .sock
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| Error::transient(self.what.clone(), e))?;
            if n == 0 {
                return Err(Error::transient(
                    self.what.clone(),
                    "the peer closed the connection",
                ));
            }
        }
    }

    /// The next event from the peer. Cancel-safe.
    pub async fn next(&mut self) -> Result<Event, Error> {
        loop {
            let mut f = self.frame().await?;
            match f.tag {
                b'd' if !f.body.is_empty() => match f.body.get_u8() {
                    b'w' if f.body.len() >= 24 => {
                        f.body.advance(24); // start, end of WAL, send time
                        return Ok(Event::Data(f.body));
                    }
                    b'k' if f.body.len() >= 17 => {
                        return Ok(Event::Keepalive {
                            wal_end: Lsn(f.body.get_u64()),
                            reply: f.body[8] == 1,
                        });
                    }
                    other => {
                        return Err(Error::protocol(
                            self.what.clone(),
                            format!("unknown replication message {:?}", other as char),
                        ))
                    }
                },
                b'E' => return Err(self.refused(&f.body)),
                b'c' => {
                    return Err(Error::transient(
                        self.what.clone(),
                        "the peer ended replication",
                    ))
                }
                _ => {} // notices
            }
        }
    }

    /// Tells the peer that everything up to `flushed` is durably applied
    /// here (it may release that WAL) and that `received` has arrived. It
    /// asks for an answer, so that a link that died silently (no reset, as a
    /// cut WAN link) shows as a peer that stopped answering.
    pub async fn confirm(&mut self, received: Lsn, flushed: Lsn) -> Result<(), Error> {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_US;
        let mut msg = Vec::with_capacity(34);
        msg.push(b'r');
        msg.extend(received.0.to_be_bytes());
        msg.extend(flushed.0.to_be_bytes());
        msg.extend(flushed.0.to_be_bytes());
        msg.extend(now_us.to_be_bytes());
        msg.push(1);
        let mut out = BytesMut::new();
        frontend::CopyData::new(&msg[..])
            .map_err(|e| Error::protocol(self.what.clone(), e))?
            .write(&mut out);
        self.send(&out).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_error_fields() {
        let body = b"SERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0";
        assert_eq!(
            super::server_error(body),
            "ERROR: replication slot \"x\" does not exist (SQLSTATE 42704)"
        );
    }
}
