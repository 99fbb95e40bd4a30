//! Raising errors with a SQLSTATE and a hint, so that operators and client
//! code can tell user mistakes apart (a plain `Result` would raise 22000).

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises an ERROR; never returns.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: &str) -> ! {
    ErrorReport::new(code, message.into(), "foreshadow")
        .set_hint(hint)
        .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}
