//! Opening PostgreSQL connections with a bounded wait.

use crate::error::Error;
use crate::tls;
use std::time::Duration;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Connects and drives the connection on its own task. The DSN is never
/// logged: it may carry a password.
pub async fn connect(dsn: &str, what: &str, timeout: Duration) -> Result<Client, Error> {
    let tls::Target {
        pg: mut config,
        tls: opts,
    } = tls::parse_dsn(dsn).map_err(|e| Error::protocol(what, e))?;
    config
        .application_name("foreshadow-sidecar")
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    // With sslmode=disable tokio-postgres never calls the connector, so one
    // connector type serves every mode.
    let connector =
        MakeRustlsConnect::new(tls::client_config(&opts).map_err(|e| Error::protocol(what, e))?);
    let (client, connection) = tokio::time::timeout(timeout, config.connect(connector))
        .await
        .map_err(|_| Error::timeout(format!("connecting to {what}")))?
        .map_err(|e| Error::from_pg(format!("connecting to {what}"), e))?;
    tokio::spawn(async move {
        // Errors surface on the next query through the client.
        let _ = connection.await;
    });
    Ok(client)
}
