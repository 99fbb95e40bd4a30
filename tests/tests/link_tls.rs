//! Sidecars connect over TLS with the server's certificate verified
//! (`sslmode=verify-full` against the lab's own CA) and SCRAM-SHA-256 bound
//! to the TLS channel; a wrong CA, a wrong host name or a wrong password is
//! a clear refusal, shown in the log and in `foreshadow.alerts`, and nothing
//! is applied over such a link.

mod common;

use common::{lab_with, names, scalar_i64, wait_for, CONVERGE};
use foreshadow_lab::Lab;
use std::time::Duration;

fn sidecar_log(lab: &Lab, region: &str) -> String {
    std::fs::read_to_string(lab.region_dir(region).join("sidecar.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_over_tls_with_verify_full_and_scram() {
    let lab = lab_with("tls-ok", 3, 20, true).await;
    let r = names(&lab);
    for (i, region) in r.iter().enumerate() {
        lab.client(region)
            .await
            .unwrap()
            .execute(
                "INSERT INTO accounts VALUES ($1, $2, 1, NULL)",
                &[&(i as i64), region],
            )
            .await
            .unwrap();
    }
    common::assert_converged(&lab).await;
    assert_eq!(
        scalar_i64(&lab, &r[0], "SELECT count(*) FROM accounts").await,
        3
    );
    for region in &r {
        // Every sidecar connection here (apply sessions, walsenders) is
        // encrypted, and none is not.
        let plain = scalar_i64(
            &lab,
            region,
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename = 'foreshadow_sidecar' AND NOT s.ssl",
        )
        .await;
        let encrypted = scalar_i64(
            &lab,
            region,
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename = 'foreshadow_sidecar' AND s.ssl",
        )
        .await;
        assert_eq!(plain, 0, "region {region}");
        assert!(
            encrypted >= 4,
            "region {region}: {encrypted} encrypted sidecar connections"
        );
    }
    // The sidecar's role is refused without TLS, whatever it claims.
    let port = lab.spec.region(&r[0]).unwrap().port;
    let plain = foreshadow_lab::lab::connect(&format!(
        "host=127.0.0.1 port={port} user=foreshadow_sidecar dbname=app password=lab-sidecar-secret sslmode=disable"
    ))
    .await;
    assert!(plain.is_err(), "the sidecar's role got in without TLS");
}

/// `region`'s sidecar restarted with its peers' DSNs changed by `change`;
/// then a write in `r[0]` must not arrive, and the refusal must be visible.
async fn refused(lab: &Lab, change: impl Fn(&str) -> String, id: i64, expect: &str) {
    let r = names(lab);
    lab.fault(&r[1], foreshadow_lab::lab::Fault::KillSidecar)
        .unwrap();
    let config = lab.sidecar_config(&r[1]).unwrap();
    let (head, peers) = config.split_at(config.find("[[peers]]").unwrap());
    lab.start_sidecar_with(&r[1], &format!("{head}{}", change(peers)))
        .unwrap();
    lab.client(&r[0])
        .await
        .unwrap()
        .execute(
            "INSERT INTO accounts VALUES ($1, 'refused?', 1, NULL)",
            &[&id],
        )
        .await
        .unwrap();
    wait_for(
        lab,
        &r[1],
        &format!(
            "SELECT (detail LIKE '%{expect}%')::text FROM foreshadow.alerts \
             WHERE alert = 'lane_stopped' AND region = '{}'",
            r[0]
        ),
        Some("true"),
        CONVERGE,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar_log(lab, &r[1])));
    let log = sidecar_log(lab, &r[1]);
    assert!(
        log.contains(expect) && log.contains("needs operator action"),
        "{log}"
    );
    assert!(
        !log.contains("lab-sidecar-secret"),
        "the password reached the log"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        scalar_i64(
            lab,
            &r[1],
            &format!("SELECT count(*) FROM accounts WHERE id = {id}")
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_host_name_or_password_is_refused() {
    let lab = lab_with("tls-refused", 2, 20, true).await;
    let certs = lab.certs();
    let (ca, other) = (
        certs.ca().display().to_string(),
        certs.other_ca().display().to_string(),
    );
    // The server's certificate is not signed by the CA the sidecar trusts.
    refused(&lab, |p| p.replace(&ca, &other), 1, "UnknownIssuer").await;
    // The certificate is for 127.0.0.1 and localhost, not this name.
    refused(
        &lab,
        |p| p.replace("host=127.0.0.1", "host=db.invalid hostaddr=127.0.0.1"),
        2,
        "certificate not valid for name",
    )
    .await;
    // SCRAM with a wrong password.
    let wrong = lab.dir.join("wrong-pgpass");
    std::fs::write(&wrong, "*:*:*:foreshadow_sidecar:not-the-password\n").unwrap();
    let passfile = certs.passfile().display().to_string();
    let wrong = wrong.display().to_string();
    refused(
        &lab,
        |p| p.replace(&passfile, &wrong),
        3,
        "password authentication failed",
    )
    .await;
    // Fixed: the held writes arrive.
    let r = names(&lab);
    lab.fault(&r[1], foreshadow_lab::lab::Fault::KillSidecar)
        .unwrap();
    lab.start_sidecar(&r[1]).unwrap();
    common::assert_converged(&lab).await;
    assert_eq!(
        scalar_i64(&lab, &r[1], "SELECT count(*) FROM accounts").await,
        3
    );
}
