//! Opening PostgreSQL connections with a bounded wait.

use crate::error::Error;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

/// Connects and drives the connection on its own task. The DSN is never
/// logged: it may carry a password.
pub async fn connect(dsn: &str, what: &str, timeout: Duration) -> Result<Client, Error> {
    let mut config = tokio_postgres::Config::from_str(dsn).map_err(|e| Error::protocol(what, e))?;
    config
        .application_name("foreshadow-sidecar")
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .map_err(|_| Error::timeout(format!("connecting to {what}")))?
        .map_err(|e| Error::from_pg(format!("connecting to {what}"), e))?;
    tokio::spawn(async move {
        // Errors surface on the next query through the client.
        let _ = connection.await;
    });
    Ok(client)
}
