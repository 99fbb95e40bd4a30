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
use crate::tls::{self, SslMode};
use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::ChannelBinding as CbPolicy;
use tokio_rustls::client::TlsStream;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

pub struct ReplicationStream {
    sock: Sock,
    buf: BytesMut,
    what: String,
    /// The peer's process serving this connection (its walsender), from
    /// BackendKeyData: how the peer is asked whether it is still working.
    pub backend_pid: Option<i32>,
}

/// The connection to the peer, before or after the TLS upgrade.
enum Sock {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Sock {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Sock::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Sock {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Sock::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_flush(cx),
            Sock::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
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

/// libpq's SSLRequest, then the TLS handshake. Returns the socket and, when
/// TLS is on, the tls-server-end-point hash for SCRAM-SHA-256-PLUS.
async fn negotiate_tls(
    mut tcp: TcpStream,
    host: &str,
    mode: SslMode,
    config: Option<Arc<rustls::ClientConfig>>,
    what: &str,
) -> Result<(Sock, Option<Vec<u8>>), Error> {
    let Some(config) = config else {
        return Ok((Sock::Plain(tcp), None)); // sslmode=disable
    };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req); // Int32 len 8, Int32 80877103 (1234<<16 | 5679)
    tcp.write_all(&req)
        .await
        .map_err(|e| Error::transient(format!("connecting to {what}"), e))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| Error::transient(format!("connecting to {what}"), e))?;
    match answer[0] {
        b'S' => {}
        b'N' if mode == SslMode::Prefer => return Ok((Sock::Plain(tcp), None)),
        b'N' => {
            return Err(Error::protocol(
                what,
                "the peer does not accept TLS connections (ssl = off) and sslmode requires TLS",
            ))
        }
        other => {
            return Err(Error::protocol(
                what,
                format!("unexpected answer {:?} to SSLRequest", other as char),
            ))
        }
    }
    // Exactly one byte was read from the unbuffered TcpStream and `buf` is
    // still empty, so nothing sent in plaintext after the 'S' can be taken as
    // protocol data (CVE-2021-23222). rustls treats it as a broken handshake.
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        Error::protocol(
            what,
            format!("{host:?} is not a valid TLS server name: {e}"),
        )
    })?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| tls::handshake_error(what, e))?;
    let end_point = tls::tls_server_end_point(stream.get_ref().1); // (&TcpStream, &ClientConnection)
    Ok((Sock::Tls(Box::new(stream)), end_point))
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
        let tls::Target {
            pg: config,
            tls: tls_opts,
        } = tls::parse_dsn(dsn).map_err(|e| Error::protocol(what, e))?;
        let cb_policy = config.get_channel_binding();
        let server_verified = tls_opts.verifies_server();
        let tls_config = match tls_opts.mode {
            SslMode::Disable => None,
            _ => Some(Arc::new(
                tls::client_config(&tls_opts).map_err(|e| Error::protocol(what, e))?,
            )),
        };
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => return Err(Error::protocol(what, "the peer's dsn needs a TCP host")),
        };
        // hostaddr: where to connect, while `host` is the name TLS checks.
        let address = config
            .get_hostaddrs()
            .first()
            .map_or_else(|| host.clone(), |a| a.to_string());
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config
            .get_user()
            .ok_or_else(|| Error::protocol(what, "the peer's dsn needs a user"))?
            .to_string();
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        let password = config.get_password().map(<[u8]>::to_vec);
        let connect = async {
            let sock = TcpStream::connect((address.as_str(), port))
                .await
                .map_err(|e| Error::transient(format!("connecting to {what}"), e))?;
            sock.set_nodelay(true).ok();
            let (sock, end_point) =
                negotiate_tls(sock, &host, tls_opts.mode, tls_config.clone(), what).await?;
            let verified = server_verified && matches!(sock, Sock::Tls(_));
            let mut s = ReplicationStream {
                sock,
                buf: BytesMut::with_capacity(64 * 1024),
                what: what.to_string(),
                backend_pid: None,
            };
            s.startup(
                &user,
                &dbname,
                password.as_deref(),
                end_point,
                cb_policy,
                verified,
            )
            .await?;
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
        end_point: Option<Vec<u8>>,
        cb_policy: CbPolicy,
        server_verified: bool, // TLS with a certificate checked against sslrootcert
    ) -> Result<(), Error> {
        let what = self.what.clone();
        let encrypted = matches!(self.sock, Sock::Tls(_));
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
        let mut scram_verified = false; // ScramSha256::finish succeeded: the server knows the password
        let mut auth_ok = false;
        loop {
            let mut f = self.frame().await?;
            let mut out = BytesMut::new();
            match f.tag {
                b'R' if f.body.len() < 4 => return Err(Error::protocol(&what, "short authentication message")),
                b'R' if auth_ok => return Err(Error::protocol(&what, "authentication request after AuthenticationOk")),
                b'R' => match f.body.get_i32() {
                    0 => {
                        if scram.is_some() && !scram_verified {
                            return Err(Error::protocol(&what,
                                "the peer ended SCRAM before proving that it knows the password (AuthenticationOk without a verified server signature)"));
                        }
                        if cb_policy == CbPolicy::Require && !scram_verified {
                            return Err(Error::protocol(&what, "channel_binding=require, but the peer did not authenticate with SCRAM-SHA-256-PLUS"));
                        }
                        // Policy (libpq's require_auth, in spirit): a server that lets us in without
                        // checking the password has proven nothing. Accept that only if TLS verified it.
                        if scram.is_none() && password.is_some() && !server_verified {
                            return Err(Error::protocol(&what,
                                "the peer accepted us without checking the password, and TLS did not verify its identity (use sslmode=verify-full)"));
                        }
                        auth_ok = true;
                    }
                    3 | 5 if !encrypted => {
                        return Err(Error::protocol(&what,
                            "the peer asks for a cleartext or MD5 password over an unencrypted connection; use scram-sha-256 in its pg_hba.conf, or TLS"))
                    }
                    3 => frontend::password_message(password.ok_or_else(need_password)?, &mut out)
                        .map_err(|e| Error::protocol(&what, e))?,
                    5 => {
                        let salt: [u8; 4] = f.body.get(..4).and_then(|b| b.try_into().ok())
                            .ok_or_else(|| Error::protocol(&what, "short MD5 salt"))?;
                        let hash = md5_hash(user.as_bytes(), password.ok_or_else(need_password)?, salt);
                        frontend::password_message(hash.as_bytes(), &mut out).map_err(|e| Error::protocol(&what, e))?;
                    }
                    10 if scram.is_some() => return Err(Error::protocol(&what, "SASL out of order")),
                    10 => {
                        let (mut offers_scram, mut offers_plus) = (false, false);
                        for m in f.body.split(|&b| b == 0) {
                            offers_scram |= m == SCRAM_SHA_256.as_bytes();
                            offers_plus |= m == SCRAM_SHA_256_PLUS.as_bytes();
                        }
                        let binding = end_point.as_ref().filter(|_| cb_policy != CbPolicy::Disable);
                        let (cb, mechanism) = match binding {
                            Some(hash) if offers_plus => (ChannelBinding::tls_server_end_point(hash.clone()), SCRAM_SHA_256_PLUS),
                            Some(_) if offers_scram => (ChannelBinding::unrequested(), SCRAM_SHA_256),
                            _ if offers_scram => (ChannelBinding::unsupported(), SCRAM_SHA_256),
                            _ => return Err(Error::protocol(&what, "the peer offers no SASL mechanism this sidecar knows")),
                        };
                        if cb_policy == CbPolicy::Require && mechanism != SCRAM_SHA_256_PLUS {
                            return Err(Error::protocol(&what, "channel_binding=require, but SCRAM-SHA-256-PLUS is not possible (no TLS, or the peer does not offer it)"));
                        }
                        let s = ScramSha256::new(password.ok_or_else(need_password)?, cb);
                        frontend::sasl_initial_response(mechanism, s.message(), &mut out)
                            .map_err(|e| Error::protocol(&what, e))?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or_else(|| Error::protocol(&what, "SASL out of order"))?;
                        // After finish() the state is Done: update() then fails before message() (which would panic) is reached.
                        s.update(&f.body).map_err(|e| Error::protocol(&what, e))?;
                        frontend::sasl_response(s.message(), &mut out).map_err(|e| Error::protocol(&what, e))?;
                    }
                    12 => {
                        scram.as_mut().ok_or_else(|| Error::protocol(&what, "SASL out of order"))?
                            .finish(&f.body) // verifies the server signature (constant time)
                            .map_err(|e| Error::protocol(&what, e))?;
                        scram_verified = true;
                    }
                    other => return Err(Error::protocol(&what, format!("unsupported authentication method {other}"))),
                },
                b'E' => return Err(self.refused(&f.body)),
                b'Z' if !auth_ok => return Err(Error::protocol(&what, "ReadyForQuery before AuthenticationOk")),
                b'Z' => return Ok(()),
                b'K' if f.body.len() >= 4 => self.backend_pid = Some(f.body.get_i32()),
                _ => {} // ParameterStatus, notices
            }
            if !out.is_empty() {
                self.send(&out).await?;
            }
        }
    }

    /// Writes and flushes: tokio-rustls may keep written records buffered.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.sock
            .write_all(bytes)
            .await
            .map_err(|e| Error::transient(self.what.clone(), e))?;
        self.sock
            .flush()
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

    #[tokio::test]
    async fn refuses_ok_before_scram_finishes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let _ = s.read(&mut buf).await; // StartupMessage
            let mech = b"SCRAM-SHA-256\0\0";
            let mut m = vec![b'R'];
            m.extend(((8 + mech.len()) as u32).to_be_bytes());
            m.extend(10i32.to_be_bytes());
            m.extend(mech);
            s.write_all(&m).await.unwrap();
            let _ = s.read(&mut buf).await; // SASLInitialResponse
            s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'])
                .await
                .unwrap();
            let _ = s.read(&mut buf).await;
        });
        let dsn = format!("host=127.0.0.1 port={port} user=u password=p dbname=d sslmode=disable");
        let err = super::ReplicationStream::start(
            &dsn,
            "s",
            crate::pgoutput::Lsn(0),
            "test",
            std::time::Duration::from_secs(5),
        )
        .await
        .err()
        .expect("must refuse");
        assert!(err.message.contains("SCRAM"), "{err}");
    }
}
