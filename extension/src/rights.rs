//! Applied writes run with the rights of the table's owner, as PostgreSQL
//! 16 subscriptions without `run_as_owner` do: any trigger, default, CHECK,
//! domain or expression function that the owner wrote runs as the owner,
//! never as the (superuser) owner of the extension.

use pgrx::pg_sys;

/// The user, security context and settings to go back to.
struct Restore {
    user: pg_sys::Oid,
    context: i32,
    guc_level: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        unsafe {
            // On an error the (sub)transaction's abort unwinds the settings.
            if !std::thread::panicking() {
                pg_sys::AtEOXact_GUC(false, self.guc_level);
            }
            pg_sys::SetUserIdAndSecContext(self.user, self.context);
        }
    }
}

/// Runs `f` as `owner`, in a security-restricted operation (no `SET ROLE`,
/// no temporary objects, as for maintenance commands run on a user's
/// table), and undoes every setting the owner's code changed meanwhile,
/// `SET` or `SET LOCAL`, as PostgreSQL does around index builds: a
/// `search_path` through the owner's schema would otherwise resolve the
/// names of what runs next with more rights — Foreshadow's own statements,
/// another owner's trigger, the sidecar's session.
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    // Already the owner (Foreshadow's own tables, from its SECURITY DEFINER
    // functions): the owner's code runs with its own rights either way.
    // Most calls are these, several per applied row.
    if unsafe { pg_sys::GetUserId() } == owner {
        return f();
    }
    let _restore = unsafe {
        let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let guc_level = pg_sys::NewGUCNestLevel();
        Restore {
            user,
            context,
            guc_level,
        }
    };
    f()
}
