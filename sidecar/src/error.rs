//! What went wrong while replicating from one peer, and whether waiting and
//! trying again can help: the retry loop reads the kind, not the message.

use std::fmt;

#[derive(Debug)]
pub enum Kind {
    /// Connection lost, timeout, lock conflict, server shutting down: retry.
    Transient,
    /// Missing privilege, missing extension, bad setup: retry slowly, but an
    /// operator has to act.
    NeedsOperator,
}

#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    pub context: String,
    pub message: String,
}

impl Error {
    pub fn from_pg(context: impl Into<String>, e: tokio_postgres::Error) -> Error {
        let kind = match e.code().map(|c| c.code()) {
            // A certificate the configuration refuses needs an operator.
            _ if crate::tls::refused_by_tls(&e) => Kind::NeedsOperator,
            // 55006, object in use: the replication origin or slot is still
            // held by the session before a reconnect, until it ends.
            Some("55006") => Kind::Transient,
            // 28: authorization; 42: privileges, undefined objects (no
            // extension, no function); 55: object not in prerequisite state.
            Some(code)
                if code.starts_with("28") || code.starts_with("42") || code.starts_with("55") =>
            {
                Kind::NeedsOperator
            }
            _ => Kind::Transient,
        };
        let message = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            // The causes too: "error performing TLS handshake" alone does
            // not say which certificate was refused, or why.
            None => {
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                text
            }
        };
        Error {
            kind,
            context: context.into(),
            message,
        }
    }

    /// A failure that waiting and retrying can cure (network, server restart).
    pub fn transient(context: impl Into<String>, message: impl fmt::Display) -> Error {
        Error {
            kind: Kind::Transient,
            context: context.into(),
            message: message.to_string(),
        }
    }

    pub fn timeout(context: impl Into<String>) -> Error {
        Error {
            kind: Kind::Transient,
            context: context.into(),
            message: "timed out".into(),
        }
    }

    pub fn protocol(context: impl Into<String>, message: impl fmt::Display) -> Error {
        Error {
            kind: Kind::NeedsOperator,
            context: context.into(),
            message: message.to_string(),
        }
    }
}

/// A failure caused by a concurrent writer, which the same transaction
/// does not meet again a moment later: a key inserted meanwhile, a lock
/// that could not be had in time, a deadlock, a serialization failure.
pub fn met_concurrent_writer(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code().map(|c| c.code()),
        Some("23505") | Some("55P03") | Some("40P01") | Some("40001")
    )
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.message)
    }
}
