//! Row values travel as text, and PostgreSQL prints and parses many types
//! according to session settings: `extra_float_digits` rounds floats,
//! `TimeZone` shifts timestamptz, `IntervalStyle`, `bytea_output` and
//! `lc_monetary` change the text, `DateStyle` changes how dates parse. So
//! capture prints, and apply parses, under one fixed set of settings,
//! whatever the writer's session or the region's defaults are.
//!
//! Capture runs in the user's session: the plain settings are swapped in
//! and out directly (a few stores, no GUC machinery per row) and restored
//! even when printing fails. The apply session keeps the settings for good.

use pgrx::pg_sys;
use std::ffi::CStr;

/// The settings both ends use, as GUC assignments (the apply session's).
const APPLY_SETTINGS: [(&CStr, &CStr); 6] = [
    (c"DateStyle", c"ISO, YMD"),
    (c"IntervalStyle", c"postgres"),
    (c"TimeZone", c"UTC"),
    (c"extra_float_digits", c"3"),
    (c"bytea_output", c"hex"),
    (c"lc_monetary", c"C"),
];

fn utc() -> *mut pg_sys::pg_tz {
    thread_local! {
        static UTC: *mut pg_sys::pg_tz = unsafe { pg_sys::pg_tzset(c"UTC".as_ptr()) };
    }
    UTC.with(|u| *u)
}

/// The output settings of the user's session, restored when dropped.
struct Saved {
    date_style: i32,
    date_order: i32,
    interval_style: i32,
    extra_float_digits: i32,
    timezone: *mut pg_sys::pg_tz,
    /// GUC nest level opened for lc_monetary, if it had to change.
    guc_level: Option<i32>,
}

impl Drop for Saved {
    fn drop(&mut self) {
        unsafe {
            pg_sys::DateStyle = self.date_style;
            pg_sys::DateOrder = self.date_order;
            pg_sys::IntervalStyle = self.interval_style;
            pg_sys::extra_float_digits = self.extra_float_digits;
            pg_sys::session_timezone = self.timezone;
            // On an error the transaction's abort unwinds the GUC stack.
            if let (Some(level), false) = (self.guc_level, std::thread::panicking()) {
                pg_sys::AtEOXact_GUC(true, level);
            }
        }
    }
}

/// A setting's current value (settings PostgreSQL does not export).
fn setting_is(name: &CStr, accepted: &[&[u8]]) -> bool {
    unsafe {
        let cur = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        !cur.is_null() && accepted.contains(&CStr::from_ptr(cur).to_bytes())
    }
}

fn monetary_is_c() -> bool {
    setting_is(c"lc_monetary", &[b"C", b"POSIX"])
}

fn bytea_is_hex() -> bool {
    setting_is(c"bytea_output", &[b"hex"])
}

/// Runs `f` (which prints row values) under the canonical output settings.
/// `money`: the row has money values, whose text follows `lc_monetary`.
pub fn printing<R>(money: bool, f: impl FnOnce() -> R) -> R {
    let utc = utc();
    let _saved = unsafe {
        let saved = Saved {
            date_style: pg_sys::DateStyle,
            date_order: pg_sys::DateOrder,
            interval_style: pg_sys::IntervalStyle,
            extra_float_digits: pg_sys::extra_float_digits,
            timezone: pg_sys::session_timezone,
            guc_level: ((money && !monetary_is_c()) || !bytea_is_hex())
                .then(|| pg_sys::NewGUCNestLevel()),
        };
        pg_sys::DateStyle = pg_sys::USE_ISO_DATES as i32;
        pg_sys::DateOrder = pg_sys::DATEORDER_YMD as i32;
        pg_sys::IntervalStyle = pg_sys::INTSTYLE_POSTGRES as i32;
        pg_sys::extra_float_digits = 3;
        if !utc.is_null() {
            pg_sys::session_timezone = utc;
        }
        // These two are not exported: set through the GUC machinery, which
        // the saved nest level undoes.
        if saved.guc_level.is_some() {
            set(c"lc_monetary", c"C", pg_sys::GucAction::GUC_ACTION_SAVE);
            set(c"bytea_output", c"hex", pg_sys::GucAction::GUC_ACTION_SAVE);
        }
        saved
    };
    f()
}

unsafe fn set(name: &CStr, value: &CStr, action: pg_sys::GucAction::Type) {
    pg_sys::set_config_option(
        name.as_ptr(),
        value.as_ptr(),
        pg_sys::GucContext::PGC_SUSET,
        pg_sys::GucSource::PGC_S_SESSION,
        action,
        true,
        0,
        false,
    );
}

/// Makes this session an apply session: values parsed under the canonical
/// settings, and `session_replication_role = replica`, so that only the
/// triggers a user marked `ENABLE REPLICA` or `ENABLE ALWAYS` fire on
/// applied rows and foreign keys are not checked (a child may arrive before
/// its parent from another region), as in PostgreSQL's own replication.
///
/// `for_session`: kept for the rest of the session (the sidecar's apply
/// session: changing `session_replication_role` discards every cached plan,
/// so it is done once); otherwise only until the calling function returns.
pub fn applying(for_session: bool) {
    let action = if for_session {
        pg_sys::GucAction::GUC_ACTION_SET
    } else {
        pg_sys::GucAction::GUC_ACTION_LOCAL
    };
    unsafe {
        let ready = pg_sys::SessionReplicationRole
            == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32
            && pg_sys::DateStyle == pg_sys::USE_ISO_DATES as i32
            && pg_sys::DateOrder == pg_sys::DATEORDER_YMD as i32
            && pg_sys::IntervalStyle == pg_sys::INTSTYLE_POSTGRES as i32
            && pg_sys::extra_float_digits == 3
            && pg_sys::session_timezone == utc()
            && monetary_is_c()
            && bytea_is_hex();
        if ready {
            return;
        }
        for (name, value) in APPLY_SETTINGS {
            set(name, value, action);
        }
        set(c"session_replication_role", c"replica", action);
    }
}
