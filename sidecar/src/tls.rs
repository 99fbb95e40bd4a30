//! TLS to PostgreSQL for both kinds of connection. libpq's sslmode,
//! sslrootcert, sslcert and sslkey are taken out of the DSN (tokio-postgres
//! knows only disable/prefer/require and rejects the rest) and turned into
//! a rustls client configuration on the ring provider; a pgpass-format file
//! supplies the password when the DSN has none (the DSN's passfile, else
//! PGPASSFILE, else ~/.pgpass, as libpq looks).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsOptions {
    /// Whether a TLS session, once up, has authenticated the server by certificate.
    pub fn verifies_server(&self) -> bool {
        self.mode != SslMode::Disable && self.root_cert.is_some()
    }
}

/// A DSN split into what tokio-postgres understands and our TLS options.
pub struct Target {
    pub pg: tokio_postgres::Config,
    pub tls: TlsOptions,
}

const TLS_KEYS: [&str; 5] = ["sslmode", "sslrootcert", "sslcert", "sslkey", "passfile"];

/// Parses a key/value or URL DSN. The TLS options are taken out, and the rest
/// goes to tokio-postgres unchanged (same quoting, same escapes).
pub fn parse_dsn(dsn: &str) -> Result<Target, String> {
    let (rest, ours) = match dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))
    {
        Some(body) => split_url(dsn, body)?,
        None => split_key_value(dsn)?,
    };
    let mut tls = TlsOptions::default();
    let mut passfile = None;
    for (key, value) in ours {
        match key.as_str() {
            "sslmode" => {
                tls.mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "invalid sslmode {other:?} (disable, prefer, require, verify-ca or verify-full)"
                        ))
                    }
                }
            }
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(value)),
            "sslcert" => tls.cert = Some(PathBuf::from(value)),
            "sslkey" => tls.key = Some(PathBuf::from(value)),
            "passfile" => passfile = Some(PathBuf::from(value)),
            _ => unreachable!("only TLS_KEYS are taken out"),
        }
    }
    if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root_cert.is_none() {
        return Err("sslmode=verify-ca and verify-full need sslrootcert (the CA that signed the server's certificate)".into());
    }
    if tls.cert.is_some() != tls.key.is_some() {
        return Err("sslcert and sslkey go together".into());
    }
    let mut pg = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
    pg.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    // As libpq: the DSN's passfile, else PGPASSFILE, else ~/.pgpass if any.
    let passfile = passfile
        .or_else(|| std::env::var_os("PGPASSFILE").map(PathBuf::from))
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| Path::new(&h).join(".pgpass"))
                .filter(|p| p.exists())
        });
    if let (None, Some(file)) = (pg.get_password(), passfile) {
        if let Some(password) = from_passfile(&file, &pg)? {
            pg.password(password);
        }
    }
    Ok(Target { pg, tls })
}

/// The password for `pg`'s host, port, database and user in a pgpass-format
/// file (`host:port:database:user:password`, `*` matches anything, `\`
/// escapes `:` and `\`; the first matching line wins), as libpq reads it.
fn from_passfile(file: &Path, pg: &tokio_postgres::Config) -> Result<Option<String>, String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("passfile {}: {e}", file.display()))?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = pg.get_user().unwrap_or_default().to_string();
    let db = pg.get_dbname().map_or_else(|| user.clone(), str::to_string);
    let wanted = [host.as_str(), port.as_str(), db.as_str(), user.as_str()];
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields = pgpass_fields(line);
        if fields.len() == 5
            && fields[..4]
                .iter()
                .zip(wanted)
                .all(|(f, w)| f == "*" || f == w)
        {
            return Ok(Some(fields[4].clone()));
        }
    }
    Ok(None)
}

fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().unwrap().extend(chars.next()),
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

/// The key/value grammar of tokio-postgres's `Parser` (whitespace, `key = value`,
/// 'quoted', backslash escapes). The raw text of the other parameters is kept.
fn split_key_value(dsn: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut it = dsn.char_indices().peekable();
    let (mut rest, mut ours) = (String::new(), Vec::new());
    loop {
        while it.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else { break };
        let mut key = String::new();
        while let Some((_, c)) = it.next_if(|&(_, c)| !c.is_whitespace() && c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            // tokio-postgres stops at the same place: leave it to judge.
            rest.push_str(&dsn[start..]);
            break;
        }
        while it.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        if it.next_if(|&(_, c)| c == '=').is_none() {
            // Not the word itself: it may be part of a password with an
            // unquoted space, and this message reaches the logs.
            return Err(
                "a word is not followed by `=` (quote values that contain spaces: key='a value')"
                    .into(),
            );
        }
        while it.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match it.next() {
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => value.extend(it.next().map(|(_, c)| c)),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated quoted value for `{key}`")),
                }
            }
        } else {
            while let Some((_, c)) = it.next_if(|&(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(it.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
            }
        }
        let end = it.peek().map_or(dsn.len(), |&(i, _)| i);
        if TLS_KEYS.contains(&key.as_str()) {
            ours.push((key, value));
        } else {
            rest.push_str(&dsn[start..end]);
            rest.push(' ');
        }
    }
    Ok((rest, ours))
}

/// URL DSNs. tokio-postgres's `UrlParser` takes the credentials up to the
/// first '@', then host and path up to the first '?', then `&`-separated,
/// percent-encoded `key=value` pairs.
fn split_url(dsn: &str, body: &str) -> Result<(String, Vec<(String, String)>), String> {
    let after_creds = body.find('@').map_or(0, |i| i + 1);
    let Some(q) = body[after_creds..].find('?').map(|i| after_creds + i) else {
        return Ok((dsn.to_string(), Vec::new()));
    };
    let head_len = dsn.len() - body.len() + q;
    let (mut kept, mut ours) = (Vec::new(), Vec::new());
    for param in body[q + 1..].split('&') {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let key = decode(key)?;
        if TLS_KEYS.contains(&key.as_str()) {
            ours.push((key, decode(value)?));
        } else {
            kept.push(param);
        }
    }
    let mut rest = dsn[..head_len].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, ours))
}

fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|e| format!("bad percent-encoding in the dsn: {e}"))
}

/// The rustls configuration for `opts` (ring provider, TLS 1.2 and 1.3).
/// It reads the PEM files on every call, so replaced certificates are picked up.
pub fn client_config(opts: &TlsOptions) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let chain = match &opts.root_cert {
        // libpq: with a root certificate, require (and prefer) verify the chain too.
        Some(path) if opts.mode != SslMode::Disable => Some(
            WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(path)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?,
        ),
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match chain {
        Some(webpki) if opts.mode == SslMode::VerifyFull => webpki,
        chain => Arc::new(Lenient { chain, provider }),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&opts.cert, &opts.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("sslcert/sslkey: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let bad = |e: String| format!("sslrootcert {}: {e}", path.display());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(roots)
}

/// Every mode but verify-full. With sslrootcert (verify-ca, and
/// require/prefer with one, as libpq does) the chain must lead to it but the
/// name is not checked: webpki checks the chain before the name, so a name
/// error means the chain was accepted. Without (prefer/require): encryption
/// only, any certificate. The handshake signature is checked either way, so
/// the server holds the key of the certificate it showed: that is what makes
/// tls-server-end-point channel binding meaningful.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // rustls 0.23.40 returns NotValidForNameContext; older releases return NotValidForName.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// RFC 5929 tls-server-end-point for SCRAM-SHA-256-PLUS: the hash of the
/// server's DER certificate, using the hash of the certificate's signature
/// algorithm, with MD5 and SHA-1 replaced by SHA-256. PostgreSQL's
/// be_tls_get_certificate_hash does the same. None when there is no single
/// hash (Ed25519, RSA-PSS): then there is no channel binding.
pub fn tls_server_end_point(conn: &rustls::ClientConnection) -> Option<Vec<u8>> {
    end_point_hash(conn.peer_certificates()?.first()?.as_ref())
}

pub fn end_point_hash(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
    use x509_cert::der::oid::db::rfc5912::{
        ECDSA_WITH_SHA_224, ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512,
        MD_5_WITH_RSA_ENCRYPTION, SHA_1_WITH_RSA_ENCRYPTION, SHA_224_WITH_RSA_ENCRYPTION,
        SHA_256_WITH_RSA_ENCRYPTION, SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
    };
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    Some(match cert.signature_algorithm.oid {
        MD_5_WITH_RSA_ENCRYPTION
        | SHA_1_WITH_RSA_ENCRYPTION
        | SHA_256_WITH_RSA_ENCRYPTION
        | ECDSA_WITH_SHA_256 => Sha256::digest(der).to_vec(),
        SHA_224_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_224 => Sha224::digest(der).to_vec(),
        SHA_384_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_384 => Sha384::digest(der).to_vec(),
        SHA_512_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_512 => Sha512::digest(der).to_vec(),
        _ => return None,
    })
}

/// A failed handshake on the replication connection. A certificate that the
/// configuration refuses needs an operator; anything else (reset, timeout)
/// is worth a retry.
pub fn handshake_error(what: &str, e: std::io::Error) -> crate::error::Error {
    let refused = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(is_refusal);
    let msg = format!("TLS handshake: {e}");
    if refused {
        crate::error::Error::protocol(what, msg)
    } else {
        crate::error::Error::transient(what, msg)
    }
}

fn is_refusal(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(_) // e.g. the server refused our client certificate
            | rustls::Error::PeerIncompatible(_)
    )
}

/// The same test for tokio-postgres errors. tokio_postgres::Error::source() is
/// tokio-rustls's io::Error, whose get_ref() is the rustls::Error.
pub fn refused_by_tls(e: &tokio_postgres::Error) -> bool {
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(r) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return is_refusal(r);
        }
        if err.to_string() == "server does not support TLS" {
            return true; // connect_tls.rs: sslmode=require and the server said 'N'
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn takes_tls_options_out_of_key_value_dsns() {
        let t = parse_dsn(
            "host=127.0.0.1 sslmode=verify-full sslrootcert='/etc/x y/ca.crt' user=u password='a b\\'c'",
        )
        .unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            t.tls.root_cert.as_deref(),
            Some(Path::new("/etc/x y/ca.crt"))
        );
        assert_eq!(t.pg.get_user(), Some("u"));
        assert_eq!(t.pg.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(
            t.pg.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn a_refused_dsn_does_not_quote_what_may_be_a_password() {
        let Err(e) = parse_dsn("host=a user=u password=secret words") else {
            panic!("a DSN with an unquoted space in a value was taken");
        };
        assert!(!e.contains("words") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn takes_tls_options_out_of_urls() {
        let t = parse_dsn(
            "postgresql://u:p%40ss@127.0.0.1:5432/app?sslmode=verify-ca&sslrootcert=%2Ftmp%2Fca.crt&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyCa);
        assert_eq!(t.tls.root_cert.as_deref(), Some(Path::new("/tmp/ca.crt")));
        assert_eq!(t.pg.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(t.pg.get_dbname(), Some("app"));
        assert_eq!(t.pg.get_connect_timeout(), Some(&Duration::from_secs(3)));
    }

    #[test]
    fn reads_the_password_from_a_passfile() {
        let file = std::env::temp_dir().join(format!("pgpass-test-{}", std::process::id()));
        std::fs::write(
            &file,
            "# comment\nother:5432:*:u:no\n127.0.0.1:5433:app:u:p\\:w\\\\x\n*:*:*:*:fallback\n",
        )
        .unwrap();
        let dsn = |rest: &str| format!("host=127.0.0.1 {rest} passfile={}", file.display());
        let t = parse_dsn(&dsn("port=5433 user=u dbname=app")).unwrap();
        assert_eq!(t.pg.get_password(), Some(&b"p:w\\x"[..]));
        let t = parse_dsn(&dsn("port=5432 user=u dbname=app")).unwrap();
        assert_eq!(t.pg.get_password(), Some(&b"fallback"[..]));
        // A password in the DSN wins.
        let t = parse_dsn(&dsn("port=5433 user=u dbname=app password=given")).unwrap();
        assert_eq!(t.pg.get_password(), Some(&b"given"[..]));
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn refuses_what_libpq_refuses() {
        assert!(parse_dsn("host=h sslmode=verify-full").is_err()); // no sslrootcert
        assert!(parse_dsn("host=h sslmode=allow").is_err());
        assert!(parse_dsn("host=h sslcert=/c").is_err()); // no sslkey
        assert_eq!(parse_dsn("host=h").unwrap().tls.mode, SslMode::Prefer);
    }

    /// /tmp/tlsdesign-certs/server-p384.crt: sha384WithRSAEncryption, so SHA-384.
    /// Expected value: `openssl x509 -in server-p384.crt -outform DER | openssl dgst -sha384`.
    const SHA384_SIGNED: &str = "-----BEGIN CERTIFICATE-----
MIICozCCAYugAwIBAgIUHavQjEsh2A7+deMarhuMNdxlbPowDQYJKoZIhvcNAQEM
BQAwHDEaMBgGA1UEAwwRRm9yZXNoYWRvdyBMYWIgQ0EwHhcNMjYxMTMwMjAzNjE5
WhcNMjkwMzA0MjAzNjE5WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwdjAQBgcqhkjO
PQIBBgUrgQQAIgNiAARqpCoKj6g1vQ0p+xZ6pjEVha1ASAW3XXZ3gDOuGwUrjfgi
Yk10qXAjisI41wZwTevaMLky90qxKpZzDOt5Gju3m8tmj9+W+HXQlIPso0l9Q3rX
SgfpFyb+zTr+lJsN4QCjgZIwgY8wDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8EBAMC
BaAwEwYDVR0lBAwwCgYIKwYBBQUHAwEwGgYDVR0RBBMwEYIJbG9jYWxob3N0hwR/
AAABMB0GA1UdDgQWBBRKkWw6WI4UUmswUZ2Gm717Ut6hLDAfBgNVHSMEGDAWgBTd
bbIcJcntraPZNyxlDpJkF3DbgjANBgkqhkiG9w0BAQwFAAOCAQEAjzNscLi9gpKF
K0UiLK/xppCzLW6AQQR+EGzah97QuYtdvBJ8uf5PYBhFQnL1EJdcU41LI8CiDD4m
ZQqjgsYhi9a9NDjkejipK9W9kUzJAf/WHppJ/t0kypxZWYIsnYbk5op4ruJckQk5
tQq9wwE4qowlMzI/j0nVnPoBjJ0EiGI5Q2w346gXh10KGIqRp+FcC62bKu753M2m
BaceFbxhLT09JVJOHrHzPiV6MP/bB9OJvzUJeLTlj36vqmIyUfXdckJP0uyfcyh5
r89qDkJ5s3EMFCK8qbAsXnx72n5zNbBPnDt6oIm8PnuTz+53THS5JBRGhY1TqMwO
URwpBvyVVA==
-----END CERTIFICATE-----
";

    #[test]
    fn end_point_hash_uses_the_signature_hash() {
        let der = CertificateDer::from_pem_slice(SHA384_SIGNED.as_bytes()).unwrap();
        let hex: String = end_point_hash(der.as_ref())
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "eaa06835b2ac01c3d6dcd7fa54c3180abff9fd41869e6c53023a7e4c535f102aaa5a48b64f2af7b29c2bdda88b9b0aad"
        );
    }
}
