//! The lab's own certificate authority, for labs run with TLS (`up --tls`):
//! a CA, a server certificate for 127.0.0.1 and localhost that every
//! region's PostgreSQL presents, and an unrelated CA for the tests that
//! must see a wrong CA refused. Made with the openssl command line.

use crate::proc::run;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The password of the sidecar's role in a TLS lab. It reaches the sidecar
/// through a pgpass file, never its config or command line.
pub const SIDECAR_PASSWORD: &str = "lab-sidecar-secret";

/// Where a lab's certificates are.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn new(lab_dir: &Path) -> Certs {
        Certs {
            dir: lab_dir.join("tls"),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.crt")
    }

    pub fn passfile(&self) -> PathBuf {
        self.dir.join("pgpass")
    }

    /// Makes the CAs, the server certificate and the sidecar's pgpass file.
    pub fn generate(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let ca = |name: &str, subject: &str| {
            self.openssl(
                &[
                    "req",
                    "-x509",
                    "-new",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-sha256",
                    "-days",
                    "3650",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.crt"),
                    "-subj",
                    subject,
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
                name,
            )
        };
        ca("ca", "/CN=Foreshadow Lab CA")?;
        ca("other-ca", "/CN=Unrelated CA")?;
        self.openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
            "server key",
        )?;
        std::fs::write(
            self.dir.join("server.ext"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .map_err(|e| e.to_string())?;
        self.openssl(
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-sha256",
                "-days",
                "825",
                "-extfile",
                "server.ext",
                "-out",
                "server.crt",
            ],
            "server certificate",
        )?;
        let passfile = self.passfile();
        std::fs::write(
            &passfile,
            format!("*:*:*:{}:{SIDECAR_PASSWORD}\n", crate::lab::SIDECAR_ROLE),
        )
        .map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(passfile, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())
    }

    fn openssl(&self, args: &[&str], what: &str) -> Result<(), String> {
        let mut c = Command::new("openssl");
        c.current_dir(&self.dir).args(args);
        run(c, &format!("openssl: {what}"))
    }
}
