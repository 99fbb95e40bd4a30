//! Starting and stopping the lab's processes. PostgreSQL refuses to run as
//! root, so when the lab runs as root its clusters run as `postgres`.

use std::path::Path;
use std::process::{Command, Stdio};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// A command run as the cluster owner: `postgres` when we are root.
pub fn as_pg_owner(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

/// Runs a command to completion; the error carries its output.
pub fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Starts a long-running process detached from our process group, with its
/// output appended to `log`; returns its pid.
pub fn spawn_detached(mut cmd: Command, log: &Path) -> Result<u32, String> {
    use std::os::unix::process::CommandExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    Ok(child.id())
}

pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn alive(pid: u32) -> bool {
    // A zombie child of ours still answers kill -0; /proc tells them apart.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// SIGTERM, then SIGKILL if the process is still there after `grace`.
pub fn stop(pid: u32, grace: std::time::Duration) {
    if !signal(pid, "TERM") {
        return;
    }
    let deadline = std::time::Instant::now() + grace;
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if alive(pid) {
        signal(pid, "KILL");
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now, never the
/// same twice in this process. Chosen below the kernel's ephemeral range
/// (32768 and up), so that outgoing connections (pgbench, sidecars) cannot
/// take it between now and when a cluster or the WAN proxy binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32);
    let _ = STATE.compare_exchange(0, seed | 1, Ordering::Relaxed, Ordering::Relaxed);
    loop {
        // xorshift: enough to spread labs started at the same time.
        let mut x = STATE.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        STATE.store(x, Ordering::Relaxed);
        let port = 15_000 + (x % 17_000) as u16;
        let mut taken = TAKEN.lock().unwrap();
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
}

/// The binary `name` from beside this executable (cargo puts every
/// workspace binary in one target directory), else from PATH.
pub fn sibling_binary(name: &str) -> String {
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(3) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate.display().to_string();
            }
        }
    }
    name.to_owned()
}

/// Nanoseconds since the epoch: a fresh seed where none is given.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
