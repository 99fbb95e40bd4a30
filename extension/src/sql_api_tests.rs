//! In-database tests of the SQL API (`cargo pgrx test pg15`).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Applies a batch as the sidecar does: in a session with the peer's
    /// replication origin, through `foreshadow.apply_transaction`. The
    /// origin is this backend's own: tests run in parallel, and an origin
    /// can be set up in one session at a time.
    fn apply(batch: &str) -> i32 {
        Spi::run(
            "SELECT pg_replication_origin_create('foreshadow_test_' || pg_backend_pid()) \
             WHERE pg_replication_origin_oid('foreshadow_test_' || pg_backend_pid()) IS NULL",
        )
        .unwrap();
        Spi::run(
            "SELECT pg_replication_origin_session_setup('foreshadow_test_' || pg_backend_pid()) \
             WHERE NOT pg_replication_origin_session_is_setup()",
        )
        .unwrap();
        let changed = Spi::get_one_with_args::<i32>(
            "SELECT foreshadow.apply_transaction('peer', $1, p::text, (p + 1)::text, now()) \
             FROM coalesce(pg_replication_origin_session_progress(false), '0/0') AS p",
            &[batch.into()],
        )
        .unwrap()
        .unwrap();
        // Let go of the origin: the next test's backend may get its id.
        Spi::run("SELECT pg_replication_origin_session_reset()").unwrap();
        changed
    }

    /// What the caller's transaction had deferred, which an apply call
    /// fires at once (it makes constraints immediate), runs as the caller,
    /// not as the extension's owner.
    #[pg_test]
    fn an_apply_call_fires_the_callers_deferred_triggers_as_the_caller() {
        Spi::run(
            "CREATE ROLE low NOSUPERUSER; \
             GRANT EXECUTE ON FUNCTION foreshadow.apply_transaction(text, text, text, text, timestamptz, integer) TO low; \
             CREATE TABLE public.who_ran (who text); \
             CREATE FUNCTION public.tell() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN INSERT INTO public.who_ran VALUES (current_user); RETURN NULL; END $$; \
             CREATE TABLE public.d (id int); \
             CREATE CONSTRAINT TRIGGER tell AFTER INSERT ON public.d DEFERRABLE INITIALLY DEFERRED \
               FOR EACH ROW EXECUTE FUNCTION public.tell(); \
             GRANT INSERT ON public.d, public.who_ran TO low",
        )
        .unwrap();
        Spi::run("SET ROLE low").unwrap();
        Spi::run("INSERT INTO public.d VALUES (1)").unwrap();
        Spi::run("RESET ROLE").unwrap();
        // The origin's setup needs more than `low` has; the call does not.
        Spi::run("SELECT pg_replication_origin_create('foreshadow_test_low')").unwrap();
        Spi::run("SELECT pg_replication_origin_session_setup('foreshadow_test_low')").unwrap();
        Spi::run("SET ROLE low").unwrap();
        Spi::run("SELECT foreshadow.apply_transaction('peer', '[]', '0/0', NULL, NULL)").unwrap();
        Spi::run("RESET ROLE").unwrap();
        Spi::run("SELECT pg_replication_origin_session_reset()").unwrap();
        assert_eq!(
            Spi::get_one::<String>("SELECT string_agg(who, ',') FROM public.who_ran"),
            Ok(Some("low".into()))
        );
    }

    /// The message of the error `f` raises ("" if none).
    fn error_of(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        PgTryBuilder::new(|| {
            f();
            String::new()
        })
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::PostgresError(r) => r.message().to_string(),
            _ => "another error".into(),
        })
        .execute()
    }

    /// Capture cannot be switched off on a global table: not disabled, not
    /// limited to replica sessions, not dropped; and sessions with
    /// session_replication_role = replica are captured too.
    #[pg_test]
    fn capture_cannot_be_bypassed() {
        setup_accounts();
        // Each attempt in a subtransaction of its own (a plpgsql block).
        Spi::run(
            "CREATE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS \
             $$ BEGIN EXECUTE q; RETURN ''; EXCEPTION WHEN OTHERS THEN RETURN SQLERRM; END $$",
        )
        .unwrap();
        let error_of = |sql: &str| {
            Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()])
                .unwrap()
                .unwrap()
        };
        Spi::run(
            "CREATE FUNCTION public.nothing() RETURNS trigger LANGUAGE plpgsql \
             AS $$ BEGIN RETURN NULL; END $$",
        )
        .unwrap();
        for sql in [
            "ALTER TABLE accounts DISABLE TRIGGER foreshadow_capture",
            "ALTER TABLE accounts DISABLE TRIGGER ALL",
            "ALTER TABLE accounts DISABLE TRIGGER USER",
            "ALTER TABLE accounts ENABLE REPLICA TRIGGER foreshadow_capture",
            "ALTER TABLE accounts ENABLE TRIGGER foreshadow_no_truncate",
            "ALTER TRIGGER foreshadow_capture ON accounts RENAME TO other",
            "CREATE OR REPLACE TRIGGER foreshadow_capture AFTER INSERT ON accounts \
             FOR EACH ROW EXECUTE FUNCTION public.nothing()",
            "DROP TRIGGER foreshadow_capture ON accounts",
            "SET session_replication_role = replica; \
             ALTER TABLE accounts DISABLE TRIGGER foreshadow_capture",
        ] {
            let e = error_of(sql);
            assert!(
                e.contains(
                    "of global table public.accounts must stay as foreshadow.make_global() made it"
                ),
                "{sql}: {e}"
            );
        }
        // Through a partitioned parent: attached, its triggers would follow
        // the parent's.
        Spi::run("CREATE TABLE parted (id int PRIMARY KEY, owner text, balance bigint) PARTITION BY RANGE (id)")
            .unwrap();
        let e =
            error_of("ALTER TABLE parted ATTACH PARTITION accounts FOR VALUES FROM (0) TO (1000)");
        assert!(
            e.contains("global table public.accounts cannot be a partition"),
            "attach: {e}"
        );
        Spi::run("SET session_replication_role = replica").unwrap();
        Spi::run("INSERT INTO accounts VALUES (1, 'r', 1)").unwrap();
        Spi::run("RESET session_replication_role").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.row_versions"),
            Ok(Some(1))
        );
        // drop_global still removes them.
        Spi::run("SELECT foreshadow.drop_global('accounts')").unwrap();
    }

    fn setup_accounts() {
        Spi::run("CREATE TABLE public.accounts (id int PRIMARY KEY, owner text, balance bigint)")
            .unwrap();
        Spi::run("SELECT foreshadow.make_global('public.accounts'::regclass)").unwrap();
    }

    #[pg_test]
    fn make_global_lists_table_with_default_strategy() {
        setup_accounts();
        let strategy = Spi::get_one::<String>(
            "SELECT strategy FROM foreshadow.global_tables WHERE table_name = 'accounts'::regclass",
        );
        assert_eq!(strategy, Ok(Some("lww".to_string())));
    }

    #[pg_test]
    fn writes_stamp_versions_outside_user_columns() {
        setup_accounts();
        Spi::run("INSERT INTO accounts VALUES (1, 'ann', 10)").unwrap();
        Spi::run("UPDATE accounts SET balance = 20 WHERE id = 1").unwrap();
        let vv = Spi::get_one::<pgrx::JsonB>(
            "SELECT vv::jsonb FROM foreshadow.row_versions WHERE key::jsonb = '{\"id\": \"1\"}'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(vv.0, serde_json::json!({"test-region": 2}));
        let cols = Spi::get_one::<i64>(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'accounts'",
        );
        assert_eq!(cols, Ok(Some(3)));
        Spi::run("DELETE FROM accounts WHERE id = 1").unwrap();
        let deleted = Spi::get_one::<bool>(
            "SELECT deleted FROM foreshadow.row_versions WHERE key::jsonb = '{\"id\": \"1\"}'",
        );
        assert_eq!(deleted, Ok(Some(true)));
    }

    #[pg_test]
    fn hlc_is_monotonic_and_above_floor() {
        use foreshadow_model::Hlc;
        let a = crate::clock::stamp_above(Hlc(0));
        let b = crate::clock::stamp_above(Hlc(0));
        assert!(b > a);
        let far = Hlc(b.0 + (1 << 20));
        assert!(crate::clock::stamp_above(far) > far);
    }

    /// A peer's stamp too far ahead of the wall clock is not adopted: the
    /// peer transaction raises (its lane stops and retries), nothing applies.
    #[pg_test]
    fn a_stamp_from_the_future_is_held() {
        setup_accounts();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ahead = foreshadow_model::Hlc::from_millis(now_ms + 60_000).0;
        let batch = format!(
            r#"[{{"v":2,"origin":"peer","hlc":{ahead},"schema":"public","table":"accounts","op":"insert","key":{{"id":5}},"row":{{"id":5,"owner":"p","balance":1}},"vv":{{"peer":1}},"strategy":"lww","class":"data"}}]"#
        );
        let message = error_of(|| {
            apply(&batch);
        });
        assert!(
            message.starts_with("clock offset: a peer's write is stamped 59"),
            "{message}"
        );
        assert!(
            message.ends_with("(foreshadow.max_clock_offset is 500 ms)"),
            "{message}"
        );
    }

    /// No role but the extension owner's delegates can call anything
    /// internal: only pure helpers and read-only functions are public.
    #[pg_test]
    fn nothing_internal_is_executable_by_public() {
        Spi::run("CREATE ROLE plain LOGIN").unwrap();
        let callable = Spi::get_one::<Vec<String>>(
            "SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p \
             WHERE p.pronamespace = 'foreshadow'::regnamespace \
               AND has_function_privilege('plain', p.oid, 'EXECUTE')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            callable,
            [
                "default_shadows",
                "hlc_text",
                "known_regions",
                "lww_wins",
                "region_name",
                "resolve",
                "table_digest",
                "vv_bump",
                "vv_compare",
                "vv_merge"
            ]
        );
        assert_eq!(
            Spi::get_one::<bool>(
                "SELECT has_table_privilege('plain', 'foreshadow.link_key', 'SELECT')"
            ),
            Ok(Some(false))
        );
    }

    /// Capture speaks only for the table it fires on, and only if that
    /// table is global: attached by hand elsewhere it refuses the write.
    #[pg_test(error = "foreshadow.capture() fired on table \"mine\", which is not a global table")]
    fn capture_attached_to_another_table_refuses() {
        setup_accounts();
        Spi::run("CREATE TABLE public.mine (id int PRIMARY KEY, owner text, balance bigint)")
            .unwrap();
        Spi::run(
            "CREATE TRIGGER t AFTER INSERT ON public.mine FOR EACH ROW \
             EXECUTE FUNCTION foreshadow.capture('public', 'accounts', 'lww', '[\"id\"]', '[]')",
        )
        .unwrap();
        Spi::run("INSERT INTO public.mine VALUES (1, 'x', 1)").unwrap();
    }

    /// A message the sidecar found unsealed is kept as a forged dead letter
    /// in the transaction that moves past it, and nothing of it applies.
    #[pg_test]
    fn forged_messages_are_kept_not_applied() {
        setup_accounts();
        let forged = r#"[{"rejected":{"reason":"the seal does not match","message":"{\"v\":2}"}}]"#;
        assert_eq!(apply(forged), 0);
        assert_eq!(
            Spi::get_two::<String, String>("SELECT kind, intent FROM foreshadow.dead_letters"),
            Ok((Some("forged".into()), Some(r#"{"v":2}"#.into())))
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT alert FROM foreshadow.alerts"),
            Ok(Some("rejected".into()))
        );
    }

    #[pg_test]
    fn remote_intent_applies_only_when_newer() {
        setup_accounts();
        let intent = |hlc: i64, balance: i64| {
            format!(
                r#"[{{"v":2,"origin":"peer","hlc":{hlc},"schema":"public","table":"accounts","op":"insert","key":{{"id":5}},"row":{{"id":5,"owner":"p","balance":{balance}}},"vv":{{"peer":1}},"strategy":"lww","class":"data"}}]"#
            )
        };
        assert_eq!(apply(&intent(1000, 7)), 1);
        assert_eq!(apply(&intent(999, 8)), 0);
        assert_eq!(
            Spi::get_one::<i64>("SELECT balance FROM accounts WHERE id = 5"),
            Ok(Some(7))
        );
    }

    /// One peer transaction that writes a row twice (insert, then update),
    /// or a run of peer transactions applied together that does: each write
    /// sees the one before it.
    #[pg_test]
    fn a_row_written_twice_in_one_apply_call_applies() {
        setup_accounts();
        let intent = |op: &str, hlc: i64, balance: i64| {
            format!(
                r#"{{"v":2,"origin":"peer","hlc":{hlc},"schema":"public","table":"accounts","op":"{op}","key":{{"id":"7"}},"row":{{"id":"7","owner":"p","balance":"{balance}"}},"vv":{{"peer":{hlc}}},"strategy":"lww","class":"data"}}"#
            )
        };
        let batch = format!(
            "[{}, {}, {}, {}, {}]",
            intent("insert", 1, 10),
            intent("update", 2, 20),
            intent("delete", 3, 0),
            intent("insert", 4, 40),
            intent("update", 5, 50)
        );
        assert!(apply(&batch) > 0);
        assert_eq!(
            Spi::get_one::<i64>("SELECT balance FROM accounts WHERE id = 7"),
            Ok(Some(50))
        );
        assert_eq!(
            Spi::get_two::<i64, bool>("SELECT hlc, deleted FROM foreshadow.row_versions"),
            Ok((Some(5), Some(false)))
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.row_versions"),
            Ok(Some(1))
        );
    }

    /// Every conflict applying peers' writes meets is in the history, by
    /// PostgreSQL's kind; a region's own successive writes and a write that
    /// had seen the version here are none; entries older than
    /// foreshadow.conflict_retention are not shown.
    #[pg_test]
    fn conflicts_are_recorded_by_kind() {
        setup_accounts();
        Spi::run(
            "INSERT INTO accounts VALUES (1, 'a', 1), (2, 'a', 2), (5, 'a', 5), (6, 'a', 6); \
             UPDATE accounts SET balance = 20 WHERE id = 2; UPDATE accounts SET balance = 21 WHERE id = 2; \
             DELETE FROM accounts WHERE id = 5",
        )
        .unwrap();
        let intent = |op: &str, id: i64, hlc: u64, vv: &str| {
            let row = if op == "delete" {
                "null".to_string()
            } else {
                format!(r#"{{"id":"{id}","owner":"p","balance":"{hlc}"}}"#)
            };
            format!(
                r#"{{"v":2,"origin":"peer","hlc":{hlc},"schema":"public","table":"accounts","op":"{op}","key":{{"id":"{id}"}},"row":{row},"vv":{vv},"strategy":"lww","class":"data"}}"#
            )
        };
        // Just ahead of this region's clock (within max_clock_offset).
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let far = foreshadow_model::Hlc::from_millis(now_ms + 200).0;
        let batch = format!(
            "[{}, {}, {}, {}, {}, {}]",
            intent("update", 1, far, r#"{"peer":1}"#),
            intent("update", 3, far, r#"{"peer":2}"#),
            intent("delete", 4, far, r#"{"peer":2}"#),
            intent("update", 5, 1, r#"{"peer":1}"#),
            intent("insert", 6, 1, r#"{"peer":1}"#),
            // Had seen this region's second write of row 2: no conflict.
            intent("update", 2, far, r#"{"peer":1,"test-region":3}"#),
        );
        apply(&batch);
        let kinds = Spi::get_one::<String>(
            "SELECT string_agg(key->>'id' || ' ' || kind || ' ' || outcome, ', ' ORDER BY id) \
               FROM foreshadow.conflicts",
        );
        assert_eq!(
            kinds,
            Ok(Some(
                "1 update_origin_differs applied, 3 update_missing applied, 4 delete_missing applied, \
                 5 update_deleted kept, 6 insert_exists kept"
                    .into()
            ))
        );
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT leaves::text FROM foreshadow.conflicts WHERE key->>'id' = '6'"
            )
            .unwrap()
            .map(|l| l.contains(r#""origin": "test-region""#) && l.contains(r#""origin": "peer""#)),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT conflicts FROM foreshadow.peer_stats"),
            Ok(Some(5))
        );
        Spi::run("UPDATE foreshadow.conflict_log SET detected_at = now() - interval '8 days' WHERE key = '{\"id\":\"1\"}'")
            .unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.conflicts"),
            Ok(Some(4))
        );
    }

    /// A cart whose concurrent versions are merged by a non-commutative
    /// function: the accumulated items, then the next version's new ones.
    fn setup_carts(body: &str) {
        Spi::run("CREATE TABLE public.carts (id int PRIMARY KEY, items text[] NOT NULL)").unwrap();
        Spi::run(&format!(
            "CREATE FUNCTION public.cart_merge(base carts, local carts, remote carts) RETURNS carts \
             LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN {body} END $$"
        ))
        .unwrap();
        Spi::run(
            "SELECT foreshadow.make_global('public.carts', strategy => 'merge', \
                    merge_function => 'public.cart_merge(carts, carts, carts)', shadows => '{test-region}')",
        )
        .unwrap();
    }

    const UNION_APPEND: &str =
        "RETURN ROW(local.id, local.items || ARRAY(SELECT x FROM unnest(remote.items) x \
         WHERE x <> ALL (local.items)))::public.carts;";

    fn cart_intent(hlc: u64, vv: &str, items: &str) -> String {
        format!(
            r#"{{"v":2,"origin":"peer","hlc":{hlc},"schema":"public","table":"carts","op":"update","key":{{"id":"1"}},"row":{{"id":"1","items":"{items}"}},"vv":{vv},"strategy":"merge","class":"data"}}"#
        )
    }

    fn cart() -> Option<Vec<String>> {
        Spi::get_one::<Vec<String>>("SELECT items FROM carts WHERE id = 1").unwrap()
    }

    /// A peer's write concurrent with this region's is merged over both
    /// versions in stamp order (the peer's, stamped earlier, first); a
    /// later peer write that saw its first one but not this region's is
    /// folded with the leaves again, not with the merged row; a local write
    /// after that has seen them all and ends the conflict.
    #[pg_test]
    fn merge_folds_the_leaves_in_stamp_order() {
        setup_carts("RETURN NULL;");
        // Replaced by dropping and creating it again: the table keeps the
        // function by its signature, so it is the new one.
        Spi::run("DROP FUNCTION public.cart_merge(carts, carts, carts)").unwrap();
        Spi::run(&format!(
            "CREATE FUNCTION public.cart_merge(base carts, local carts, remote carts) RETURNS carts \
             LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN {UNION_APPEND} END $$"
        ))
        .unwrap();
        Spi::run("INSERT INTO carts VALUES (1, '{a}')").unwrap();
        apply(&format!("[{}]", cart_intent(1, r#"{"peer":1}"#, "{b}")));
        let failures = Spi::get_one::<String>(
            "SELECT string_agg(error, '; ') FROM foreshadow.conflict_failures",
        );
        assert_eq!(cart(), Some(vec!["b".into(), "a".into()]), "{failures:?}");
        apply(&format!("[{}]", cart_intent(2, r#"{"peer":2}"#, "{b,c}")));
        assert_eq!(cart(), Some(vec!["b".into(), "c".into(), "a".into()]));
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT string_agg(kind || ' ' || outcome || ' ' || merge_calls, ', ' ORDER BY id) FROM foreshadow.conflicts"
            ),
            Ok(Some("update_origin_differs merged 1, update_origin_differs merged 1".into()))
        );
        // A duplicate delivery changes nothing.
        apply(&format!("[{}]", cart_intent(2, r#"{"peer":2}"#, "{b,c}")));
        assert_eq!(cart(), Some(vec!["b".into(), "c".into(), "a".into()]));
        assert_eq!(
            Spi::get_one::<i64>(
                "SELECT jsonb_array_length(leaves::jsonb) FROM foreshadow.row_versions"
            ),
            Ok(Some(2))
        );
        Spi::run("UPDATE carts SET items = items || '{d}' WHERE id = 1").unwrap();
        assert_eq!(
            Spi::get_one::<bool>("SELECT leaves IS NULL FROM foreshadow.row_versions"),
            Ok(Some(true))
        );
    }

    /// A merge function that raises (or returns NULL) fails the resolution:
    /// the last writer wins, the failure is kept with the leaves and the
    /// error, and the apply goes on.
    #[pg_test]
    fn a_failing_merge_falls_back_to_last_writer_wins() {
        setup_carts(
            "IF remote.items @> '{boom}' THEN RAISE EXCEPTION 'no boom'; END IF; RETURN NULL;",
        );
        Spi::run("INSERT INTO carts VALUES (1, '{a}')").unwrap();
        apply(&format!("[{}]", cart_intent(1, r#"{"peer":1}"#, "{boom}")));
        // This region's write is stamped later: it wins.
        assert_eq!(cart(), Some(vec!["a".into()]));
        assert_eq!(
            Spi::get_two::<String, i64>(
                "SELECT error, jsonb_array_length(leaves) FROM foreshadow.conflict_failures"
            ),
            Ok((
                Some("merge function public.cart_merge returned NULL".into()),
                Some(2)
            ))
        );
        Spi::run("TRUNCATE foreshadow.conflict_failures").unwrap();
        Spi::run("INSERT INTO carts VALUES (2, '{boom}')").unwrap();
        let boom = cart_intent(1, r#"{"peer":2}"#, "{x}").replace(r#""1""#, r#""2""#);
        apply(&format!("[{boom}]"));
        assert_eq!(
            Spi::get_one::<String>("SELECT error FROM foreshadow.conflict_failures"),
            Ok(Some(
                "merge function public.cart_merge raised: no boom".into()
            ))
        );
        // The merge call's timeout is not left armed by its error: this
        // outlasts foreshadow.merge_timeout (1 s) and is not cancelled.
        Spi::run("SELECT pg_sleep(1.2)").unwrap();
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT outcome FROM foreshadow.conflicts ORDER BY id DESC LIMIT 1"
            ),
            Ok(Some("merge failed: last writer wins".into()))
        );
    }

    /// With the key's owner in another region (R2): a concurrent peer
    /// write opens a conflict and waits (the row keeps this region's
    /// version, the conflict shows as pending); the owner's resolution
    /// (R4) then makes the row, closes the conflict as the shadow's, and
    /// the write it resolved is skipped when it comes again. Past the
    /// deadline a primary resolves an open conflict itself (R5).
    #[pg_test]
    fn open_conflicts_wait_for_the_owner_or_fall_back() {
        setup_carts(UNION_APPEND);
        assert_eq!(
            Spi::get_one::<i32>("SELECT foreshadow.set_shadows('carts', '{peer}')"),
            Ok(Some(2))
        );
        Spi::run("INSERT INTO carts VALUES (1, '{a}'), (2, '{a}')").unwrap();
        let (hlc, vv) = Spi::get_two::<i64, String>(
            "SELECT hlc, vv FROM foreshadow.row_versions WHERE key::jsonb ->> 'id' = '1'",
        )
        .unwrap();
        let (hlc, vv) = (hlc.unwrap(), vv.unwrap());
        let write = cart_intent(1, r#"{"peer":1}"#, "{b}");
        apply(&format!("[{write}]"));
        assert_eq!(cart(), Some(vec!["a".into()]), "waits for the owner");
        assert_eq!(
            Spi::get_one::<String>("SELECT resolved_by FROM foreshadow.conflicts"),
            Ok(Some("pending".into()))
        );
        assert_eq!(
            Spi::get_two::<i64, i64>("SELECT open_conflicts, leaves FROM foreshadow.shadow_status"),
            Ok((Some(1), Some(2)))
        );
        let leaves = format!(
            r#"[{{"vv":{{"peer":1}},"hlc":1,"origin":"peer","row":{{"id":"1","items":"{{b}}"}}}},{{"vv":{vv},"hlc":{hlc},"origin":"test-region","row":{{"id":"1","items":"{{a}}"}}}}]"#
        );
        // The peer's entry beside this region's ("peer" sorts first).
        let joined = vv.replacen('{', r#"{"peer":1,"#, 1);
        let resolution = format!(
            r#"{{"v":2,"origin":"peer","hlc":{hlc},"schema":"public","table":"carts","op":"update","key":{{"id":"1"}},"row":{{"id":"1","items":"{{b,a}}"}},"vv":{joined},"strategy":"merge","class":"data","resolves":{leaves}}}"#
        );
        apply(&format!("[{resolution}]"));
        assert_eq!(cart(), Some(vec!["b".into(), "a".into()]));
        assert_eq!(
            Spi::get_two::<String, String>("SELECT resolved_by, outcome FROM foreshadow.conflicts"),
            Ok((Some("shadow".into()), Some("pre-staged".into())))
        );
        apply(&format!("[{write}]"));
        assert_eq!(cart(), Some(vec!["b".into(), "a".into()]), "known: skipped");
        // Row 2: the owner's resolution never comes.
        let write2 = cart_intent(2, r#"{"peer":2}"#, "{c}").replace(r#""1""#, r#""2""#);
        apply(&format!("[{write2}]"));
        assert_eq!(
            Spi::get_one::<i64>("SELECT foreshadow.resolve_overdue()"),
            Ok(Some(0))
        );
        Spi::run(
            "UPDATE foreshadow.conflict_log SET detected_at = detected_at - interval '1 minute'",
        )
        .unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT foreshadow.resolve_overdue()"),
            Ok(Some(1))
        );
        assert_eq!(
            Spi::get_one::<Vec<String>>("SELECT items FROM carts WHERE id = 2"),
            Ok(Some(vec!["c".into(), "a".into()]))
        );
        assert_eq!(
            Spi::get_two::<String, i32>(
                "SELECT resolved_by, merge_calls FROM foreshadow.conflicts WHERE key ->> 'id' = '2'"
            ),
            Ok((Some("fallback".into()), Some(1)))
        );
    }

    /// A peer's shadow set (a metadata intent, R7) is adopted if it is
    /// later than this region's by (epoch, regions), ignored otherwise; one
    /// naming a region unknown here stops the lane (the batch raises).
    #[pg_test]
    fn peer_shadow_sets_are_adopted_if_later() {
        setup_carts(UNION_APPEND);
        let set = |epoch: u32, regions: &str| {
            format!(
                r#"[{{"v":2,"origin":"peer","hlc":{epoch},"schema":"public","table":"carts","op":"update","key":{{}},"row":null,"vv":{{"peer":1}},"strategy":"merge","class":"metadata","shadow_set":{{"epoch":{epoch},"regions":{regions}}}}}]"#
            )
        };
        let shadows = || {
            Spi::get_two::<i32, Vec<String>>(
                "SELECT shadow_epoch, shadows FROM foreshadow.global_tables WHERE table_name = 'public.carts'::regclass",
            )
            .unwrap()
        };
        apply(&set(2, r#"["peer"]"#));
        assert_eq!(shadows(), (Some(2), Some(vec!["peer".into()])));
        // Same epoch, a smaller set: this region keeps its own.
        apply(&set(2, "[]"));
        assert_eq!(shadows(), (Some(2), Some(vec!["peer".into()])));
        apply(&set(1, r#"["test-region"]"#));
        assert_eq!(shadows(), (Some(2), Some(vec!["peer".into()])));
        // Same epoch, a larger set wins (the peer changed it at once too).
        apply(&set(2, r#"["peer","test-region"]"#));
        assert_eq!(
            shadows(),
            (Some(2), Some(vec!["peer".into(), "test-region".into()]))
        );
        let mars = set(3, r#"["mars"]"#);
        assert_eq!(
            error_of(move || {
                apply(&mars);
            }),
            "unknown region \"mars\" for a shadow"
        );
    }

    /// set_shadows takes regions of foreshadow.regions only, each once.
    #[pg_test]
    fn set_shadows_checks_the_regions() {
        setup_carts(UNION_APPEND);
        let error_of = |sql: &'static str| error_of(move || Spi::run(sql).unwrap());
        assert_eq!(
            error_of("SELECT foreshadow.set_shadows('public.carts', '{mars}')"),
            "unknown region \"mars\" for a shadow"
        );
        assert_eq!(
            error_of("SELECT foreshadow.set_shadows('public.carts', '{peer,peer}')"),
            "a region is named twice in the shadow set {peer,peer}"
        );
        assert_eq!(
            error_of("SELECT foreshadow.set_shadows('public.carts', NULL)"),
            "foreshadow.set_shadows: regions must not be NULL"
        );
        assert_eq!(
            Spi::get_one::<Vec<String>>(
                "SELECT shadows FROM foreshadow.global_tables WHERE table_name = 'public.carts'::regclass"
            ),
            Ok(Some(vec!["test-region".into()]))
        );
        assert_eq!(
            Spi::get_one::<i32>("SELECT foreshadow.set_shadows('public.carts', '{}')"),
            Ok(Some(2))
        );
    }

    /// Strategy vv: a peer's write concurrent with this region's is kept
    /// beside it as a sibling (the later stamped one in the table), and
    /// foreshadow.resolve writes a version that has seen both, which ends
    /// them; siblings of tables the caller may not read are not shown.
    #[pg_test]
    fn vv_keeps_siblings_until_resolved() {
        Spi::run("CREATE TABLE public.docs (id int PRIMARY KEY, body text)").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.docs', strategy => 'vv')").unwrap();
        Spi::run("INSERT INTO docs VALUES (1, 'mine')").unwrap();
        apply(
            r#"[{"v":2,"origin":"peer","hlc":1,"schema":"public","table":"docs","op":"update","key":{"id":"1"},"row":{"id":"1","body":"theirs"},"vv":{"peer":1},"strategy":"vv","class":"data"}]"#,
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT body FROM docs WHERE id = 1"),
            Ok(Some("mine".into()))
        );
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT string_agg((row ->> 'body') || ':' || origin || ':' || in_table, ', ' ORDER BY stamp) FROM foreshadow.siblings"
            ),
            Ok(Some("theirs:peer:false, mine:test-region:true".into()))
        );
        assert_eq!(
            Spi::get_two::<String, String>("SELECT resolved_by, outcome FROM foreshadow.conflicts"),
            Ok((Some("local".into()), Some("siblings kept".into())))
        );
        Spi::run(r#"SELECT foreshadow.resolve('public.docs', '{"id": 1}', '{"id": "1", "body": "both"}')"#)
            .unwrap();
        assert_eq!(
            Spi::get_one::<String>("SELECT body FROM docs WHERE id = 1"),
            Ok(Some("both".into()))
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.siblings"),
            Ok(Some(0))
        );
        assert_eq!(
            error_of(|| Spi::run(
                r#"SELECT foreshadow.resolve('public.docs', '{"id": 1}', '{"id": 2}')"#
            )
            .unwrap()),
            r#"row {"id": 2} does not have primary key {"id": 1}"#
        );
    }

    /// make_global checks the merge function: present for merge only, of
    /// the table's row type, IMMUTABLE.
    #[pg_test]
    fn make_global_checks_the_merge_function() {
        Spi::run("CREATE TABLE public.m (id int PRIMARY KEY, v text)").unwrap();
        Spi::run(
            "CREATE FUNCTION public.two(a m, b m) RETURNS m LANGUAGE sql IMMUTABLE AS 'SELECT b'; \
             CREATE FUNCTION public.vol(a m, b m, c m) RETURNS m LANGUAGE sql AS 'SELECT c'; \
             CREATE FUNCTION public.txt(a m, b m, c m) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT NULL::text'; \
             CREATE FUNCTION public.strict(a m, b m, c m) RETURNS m LANGUAGE sql IMMUTABLE STRICT AS 'SELECT c'",
        )
        .unwrap();
        let error_of = |sql: &'static str| error_of(move || Spi::run(sql).unwrap());
        assert_eq!(
            error_of("SELECT foreshadow.make_global('public.m', strategy => 'merge')"),
            "strategy merge needs a merge function for table public.m"
        );
        assert_eq!(
            error_of("SELECT foreshadow.make_global('public.m', strategy => 'merge', merge_function => 'public.two(public.m,public.m)')"),
            "merge function public.two(public.m,public.m) does not fit table public.m"
        );
        assert_eq!(
            error_of("SELECT foreshadow.make_global('public.m', strategy => 'merge', merge_function => 'public.txt(public.m,public.m,public.m)')"),
            "merge function public.txt(public.m,public.m,public.m) does not fit table public.m"
        );
        assert_eq!(
            error_of("SELECT foreshadow.make_global('public.m', strategy => 'merge', merge_function => 'public.vol(public.m,public.m,public.m)')"),
            "merge function public.vol(public.m,public.m,public.m) is not IMMUTABLE"
        );
        assert_eq!(
            error_of("SELECT foreshadow.make_global('public.m', strategy => 'merge', merge_function => 'public.strict(public.m,public.m,public.m)')"),
            "merge function public.strict(public.m,public.m,public.m) is STRICT"
        );
        assert_eq!(
            error_of("SELECT foreshadow.make_global('public.m', merge_function => 'public.vol(public.m,public.m,public.m)')"),
            "a merge function is for strategy merge, not lww"
        );
    }

    /// make_global refuses a primary key whose equal values can print
    /// differently (its rows' versions are found by the printed key), and
    /// takes one whose values print alike.
    #[pg_test]
    fn make_global_refuses_keys_that_print_equal_values_differently() {
        Spi::run(
            "CREATE TABLE public.kn (id numeric PRIMARY KEY); \
             CREATE TABLE public.kf (a int, b float8, PRIMARY KEY (a, b)); \
             CREATE TABLE public.ki (id interval PRIMARY KEY); \
             CREATE TABLE public.ks (id numeric(12,2) PRIMARY KEY); \
             CREATE TABLE public.kt (a text, b uuid, c timestamptz, d date, PRIMARY KEY (a, b, c, d))",
        )
        .unwrap();
        let error_of = |sql: &'static str| error_of(move || Spi::run(sql).unwrap());
        for (table, columns) in [("kn", "id"), ("kf", "b"), ("ki", "id")] {
            let sql = format!("SELECT foreshadow.make_global('public.{table}')");
            let sql: &'static str = Box::leak(sql.into_boxed_str());
            assert_eq!(
                error_of(sql),
                format!(
                    "cannot make public.{table} global: equal values of its primary key column {columns} can print differently"
                )
            );
        }
        Spi::run("SELECT foreshadow.make_global('public.ks')").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.kt')").unwrap();
    }

    fn setup_counters() {
        Spi::run("CREATE TABLE public.c (id int PRIMARY KEY, n bigint NOT NULL, note text)")
            .unwrap();
        Spi::run("SELECT foreshadow.make_global('public.c')").unwrap();
        Spi::run("SELECT foreshadow.set_column_strategy('public.c', 'n', 'counter')").unwrap();
    }

    #[pg_test]
    fn counter_columns_add_increments_whoever_wins() {
        setup_counters();
        // The peer's write number `w` (counters count each once, by it).
        let intent = |w: i64, hlc: i64, n: i64, delta: i64, note: &str| {
            format!(
                r#"[{{"v":2,"origin":"peer","hlc":{hlc},"schema":"public","table":"c","op":"update","key":{{"id":1}},"row":{{"id":1,"n":{n},"note":"{note}"}},"vv":{{"peer":{w}}},"delta":{{"n":{delta}}},"strategy":"lww","class":"data"}}]"#
            )
        };
        // A row the peer created with 5 and a later write that lost here
        // (an older stamp): both increments count, the rest of the row
        // follows the newer stamp.
        apply(&intent(1, 2000, 5, 5, "newer"));
        apply(&intent(2, 1000, 3, 3, "older"));
        assert_eq!(
            Spi::get_two::<i64, String>("SELECT n, note FROM c WHERE id = 1"),
            Ok((Some(8), Some("newer".into())))
        );
        // Local writes travel as increments too.
        Spi::run("UPDATE c SET n = n + 2 WHERE id = 1").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT n FROM c WHERE id = 1"),
            Ok(Some(10))
        );
        assert_eq!(
            Spi::get_one::<Vec<String>>(
                "SELECT counter_columns FROM foreshadow.global_tables WHERE table_name = 'c'::regclass"
            ),
            Ok(Some(vec!["n".to_string()]))
        );
    }

    /// An increment kept as a dead letter (its table was not global here)
    /// and replayed after a later write of its region was counted still
    /// counts, once.
    #[pg_test]
    fn a_replayed_increment_counts_after_later_ones() {
        Spi::run("CREATE TABLE public.c (id int PRIMARY KEY, n bigint NOT NULL, note text)")
            .unwrap();
        let write = |w: i64, op: &str, n: i64, delta: i64| {
            format!(
                r#"[{{"v":2,"origin":"peer","hlc":{w},"schema":"public","table":"c","op":"{op}","key":{{"id":"1"}},"row":{{"id":"1","n":"{n}","note":null}},"vv":{{"peer":{w}}},"delta":{{"n":{delta}}},"strategy":"lww","class":"data"}}]"#
            )
        };
        apply(&write(1, "insert", 5, 5));
        Spi::run("SELECT foreshadow.make_global('public.c')").unwrap();
        Spi::run("SELECT foreshadow.set_column_strategy('public.c', 'n', 'counter')").unwrap();
        apply(&write(2, "update", 8, 3));
        assert_eq!(
            Spi::get_one::<i64>("SELECT foreshadow.retry_dead_letters()"),
            Ok(Some(1))
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT n FROM c WHERE id = 1"),
            Ok(Some(8))
        );
    }

    /// A merge or vv row deleted here is noted as settled, and the next
    /// heartbeat takes the note; its tombstone goes once every other
    /// region has said it is at that version or past it, not before, and
    /// not while an intent kept as not_global could still be applied.
    #[pg_test]
    fn settled_tombstones_go_when_every_region_is_past_them() {
        Spi::run("CREATE TABLE public.s (id int PRIMARY KEY, v text)").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.s', strategy => 'vv')").unwrap();
        let version = || {
            Spi::get_one::<String>("SELECT vv FROM foreshadow.row_versions")
                .unwrap()
                .unwrap()
        };
        Spi::run("INSERT INTO s VALUES (1, 'a')").unwrap();
        // A row with no version here starts this region's entry at its
        // stamp (bump_fresh), so that it stays above a forgotten tombstone.
        assert_eq!(
            Spi::get_one::<bool>(
                "SELECT (vv::jsonb ->> 'test-region')::int8 = hlc FROM foreshadow.row_versions"
            ),
            Ok(Some(true))
        );
        let inserted = version();
        Spi::run("DELETE FROM s").unwrap();
        let deleted = version();
        let count = |sql: &str| Spi::get_one::<i64>(sql).unwrap().unwrap();
        let versions = || count("SELECT count(*) FROM foreshadow.row_versions");
        let collect = || count("SELECT foreshadow.collect_settled()");
        assert_eq!(
            Spi::get_one::<String>("SELECT vv FROM foreshadow.settled"),
            Ok(Some(deleted.clone())),
            "the delete's version, noted"
        );
        let said = |vv: &str| {
            Spi::run(&format!(
                "INSERT INTO foreshadow.settled_by SELECT relid, key, 'peer', '{vv}' \
                   FROM foreshadow.row_versions \
                 ON CONFLICT (relid, key, region) DO UPDATE SET vv = EXCLUDED.vv"
            ))
            .unwrap()
        };
        assert_eq!((collect(), versions()), (0, 1), "the peer said nothing");
        said(&inserted);
        assert_eq!(
            Spi::get_two::<i64, i64>(
                "SELECT settled_to_send, settled_heard FROM foreshadow.shadow_status"
            ),
            Ok((Some(1), Some(1))),
            "the note waits for a heartbeat; what the peer said, for a use"
        );
        assert_eq!(
            (collect(), versions()),
            (0, 1),
            "the peer is at the insert, not the delete"
        );
        said(&deleted.replacen('{', r#"{"peer":1,"#, 1));
        Spi::run(
            "INSERT INTO foreshadow.dead_letters (origin, kind, reason, intent) VALUES \
             ('peer', 'not_global', 'test', '{\"hlc\": 5}')",
        )
        .unwrap();
        assert_eq!((collect(), versions()), (0, 1), "a kept intent");
        Spi::run("DELETE FROM foreshadow.dead_letters").unwrap();
        assert_eq!((collect(), versions()), (1, 0));
        assert_eq!(count("SELECT count(*) FROM foreshadow.settled_by"), 0);
        // What was said of a key with no version here goes after an hour.
        Spi::run(
            "INSERT INTO foreshadow.settled_by (relid, key, region, vv, heard_at) VALUES \
             ('public.s'::regclass, '{\"id\":\"9\"}', 'peer', '{}', now() - interval '61 minutes'), \
             ('public.s'::regclass, '{\"id\":\"8\"}', 'peer', '{}', now() - interval '59 minutes')",
        )
        .unwrap();
        assert_eq!(collect(), 0);
        assert_eq!(
            Spi::get_one::<String>("SELECT string_agg(key, ',') FROM foreshadow.settled_by"),
            Ok(Some(r#"{"id":"8"}"#.into()))
        );
        Spi::run("DELETE FROM foreshadow.settled_by").unwrap();
        // A heartbeat that is sent takes the note with it (one with nothing
        // below it yet is not sent, and keeps it).
        assert_eq!(count("SELECT foreshadow.heartbeat()"), 0);
        assert_eq!(count("SELECT count(*) FROM foreshadow.settled"), 1);
        Spi::run("UPDATE foreshadow.heartbeat SET below = 5").unwrap();
        assert_eq!(count("SELECT foreshadow.heartbeat()"), 5);
        assert_eq!(count("SELECT count(*) FROM foreshadow.settled"), 0);
    }

    /// Tombstones of lww tables go once every other region's heartbeat is
    /// past them, and not while an intent kept for a table that was not
    /// global here (which may be replayed, with its old stamp) is older,
    /// nor while a region replicates here that foreshadow.regions omits.
    #[pg_test]
    fn tombstones_go_when_every_region_is_past_them() {
        Spi::run("CREATE TABLE public.t (id int PRIMARY KEY)").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.t')").unwrap();
        let tombstones = || {
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.row_versions WHERE deleted")
                .unwrap()
                .unwrap()
        };
        let collect = || {
            Spi::get_one::<i64>("SELECT foreshadow.collect_tombstones()")
                .unwrap()
                .unwrap()
        };
        Spi::run("INSERT INTO t VALUES (1); DELETE FROM t").unwrap();
        assert_eq!((collect(), tombstones()), (0, 1), "peer not heard from yet");
        Spi::run(
            "INSERT INTO foreshadow.stability VALUES \
             ('peer', 4611686018427387904, '{\"test-region\": 4611686018427387904}', now())",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO foreshadow.dead_letters (origin, kind, reason, intent) VALUES \
             ('peer', 'not_global', 'test', '{\"hlc\": 5}')",
        )
        .unwrap();
        assert_eq!((collect(), tombstones()), (0, 1), "a kept intent is older");
        Spi::run("DELETE FROM foreshadow.dead_letters").unwrap();
        Spi::run("SELECT pg_replication_origin_create('foreshadow_from_mars')").unwrap();
        assert_eq!(
            (collect(), tombstones()),
            (0, 1),
            "mars is not in foreshadow.regions"
        );
        Spi::run("SELECT pg_replication_origin_drop('foreshadow_from_mars')").unwrap();
        assert_eq!((collect(), tombstones()), (1, 0));
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.tombstones"),
            Ok(Some(0))
        );
        // The clock is kept for a restart: at least what was collected.
        assert_eq!(
            Spi::get_one::<bool>("SELECT clock > 0 FROM foreshadow.heartbeat"),
            Ok(Some(true))
        );
    }

    #[pg_test(error = "cannot re-announce public.c: it has counter columns")]
    fn reannounce_refuses_tables_with_counters() {
        setup_counters();
        Spi::run("SELECT foreshadow.reannounce('public.c'::regclass)").unwrap();
    }

    #[pg_test(
        error = "column \"note\" of public.c is of type text, not an exact number: it cannot be a counter"
    )]
    fn counter_must_be_an_exact_number() {
        setup_counters();
        Spi::run("SELECT foreshadow.set_column_strategy('public.c', 'note', 'counter')").unwrap();
    }

    #[pg_test]
    fn numbers_keep_every_digit_through_apply() {
        // A key of numeric with a declared scale: one without is refused
        // (make_global_refuses_keys_that_print_equal_values_differently).
        Spi::run("CREATE TABLE public.n (id numeric(30,9) PRIMARY KEY, x numeric)").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.n')").unwrap();
        let big = "12345678901234567890.123456789";
        let intent = format!(
            r#"[{{"v":2,"origin":"peer","hlc":5,"schema":"public","table":"n","op":"insert","key":{{"id":{big}}},"row":{{"id":{big},"x":0.30000000000000000001}},"vv":{{"peer":1}},"strategy":"lww","class":"data"}}]"#
        );
        apply(&intent);
        assert_eq!(
            Spi::get_one::<String>(&format!("SELECT x::text FROM n WHERE id = {big}")),
            Ok(Some("0.30000000000000000001".into()))
        );
    }

    #[pg_test]
    fn intent_for_unknown_table_goes_to_dead_letters() {
        let intent = r#"[{"v":2,"origin":"peer","hlc":1,"schema":"public","table":"nope","op":"delete","key":{"id":1},"row":null,"vv":{"peer":1},"strategy":"lww","class":"data"}]"#;
        assert_eq!(apply(intent), 0);
        let (kind, reason) =
            Spi::get_two::<String, String>("SELECT kind, reason FROM foreshadow.dead_letters")
                .unwrap();
        assert_eq!(kind.as_deref(), Some("not_global"));
        assert!(reason.unwrap().contains("public.nope"));
        // Once the table is global here, the kept intent applies, once.
        Spi::run("CREATE TABLE public.nope (id int PRIMARY KEY)").unwrap();
        Spi::run("INSERT INTO public.nope VALUES (1)").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.nope', announce_existing => false)")
            .unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT foreshadow.retry_dead_letters()"),
            Ok(Some(1))
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM public.nope"),
            Ok(Some(0))
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.dead_letters"),
            Ok(Some(0))
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT foreshadow.retry_dead_letters()"),
            Ok(Some(0))
        );
    }

    #[pg_test]
    fn only_intents_that_can_never_apply_are_dead_letters() {
        setup_accounts();
        let forged = r#"[{"v":2,"origin":"elsewhere","hlc":1,"schema":"public","table":"accounts","op":"delete","key":{"id":1},"row":null,"vv":{"elsewhere":1},"strategy":"lww","class":"data"}, "not an intent", {"v":1}]"#;
        assert_eq!(apply(forged), 0);
        assert_eq!(
            Spi::get_one::<Vec<String>>(
                "SELECT array_agg(kind ORDER BY id) FROM foreshadow.dead_letters"
            ),
            Ok(Some(vec![
                "wrong_origin".into(),
                "malformed".into(),
                "malformed".into()
            ]))
        );
    }

    #[pg_test(
        error = "intent from region peer for public.accounts carries column \"extra\", which the table does not have in this region"
    )]
    fn an_intent_that_does_not_fit_raises() {
        setup_accounts();
        apply(
            r#"[{"v":2,"origin":"peer","hlc":1,"schema":"public","table":"accounts","op":"insert","key":{"id":1},"row":{"id":1,"extra":2},"vv":{"peer":1},"strategy":"lww","class":"data"}]"#,
        );
    }

    #[pg_test]
    fn keys_and_values_do_not_depend_on_session_settings() {
        Spi::run("CREATE TABLE public.ts (k timestamptz PRIMARY KEY, f float8)").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.ts')").unwrap();
        Spi::run("SET TimeZone = 'Asia/Tokyo'").unwrap();
        Spi::run("SET extra_float_digits = -3").unwrap();
        Spi::run("INSERT INTO ts VALUES ('2026-11-30 12:00:00+00', pi())").unwrap();
        Spi::run("SET TimeZone = 'UTC'").unwrap();
        Spi::run("DELETE FROM ts").unwrap();
        assert_eq!(
            Spi::get_one::<i64>(
                "SELECT count(*) FROM foreshadow.row_versions WHERE relid = 'ts'::regclass"
            ),
            Ok(Some(1))
        );
        // The session's own settings are back after capture.
        assert_eq!(
            Spi::get_one::<String>("SHOW extra_float_digits"),
            Ok(Some("-3".into()))
        );
    }

    /// Capture runs with the writer's search_path (pinning it would cost a
    /// setting change per row): its catalog lookup must not use anything a
    /// user put ahead of pg_catalog.
    #[pg_test]
    fn capture_ignores_a_hostile_search_path() {
        Spi::run("CREATE SCHEMA evil").unwrap();
        Spi::run(
            "CREATE FUNCTION evil.trap(oid, oid) RETURNS boolean LANGUAGE plpgsql \
             AS $$ BEGIN RAISE EXCEPTION 'a user''s operator ran in capture'; END $$",
        )
        .unwrap();
        Spi::run("CREATE OPERATOR evil.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = evil.trap)")
            .unwrap();
        // make_global invalidates the cached catalog: capture reads it again.
        setup_accounts();
        Spi::run("SET search_path = evil, pg_catalog, public").unwrap();
        Spi::run("INSERT INTO public.accounts VALUES (1, 'ann', 10)").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.row_versions"),
            Ok(Some(1))
        );
    }

    #[pg_test]
    fn null_counter_is_stored_as_zero() {
        setup_counters();
        Spi::run("ALTER TABLE c ALTER COLUMN n DROP NOT NULL").unwrap();
        Spi::run("INSERT INTO c VALUES (1, NULL, 'x')").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT n FROM c WHERE id = 1"),
            Ok(Some(0))
        );
    }

    /// A numeric counter cannot become NaN or infinite: no increment gets
    /// it there in the other regions.
    #[pg_test]
    fn counter_refuses_what_increments_cannot_reach() {
        Spi::run("CREATE TABLE public.cn (id int PRIMARY KEY, n numeric NOT NULL)").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.cn')").unwrap();
        Spi::run("SELECT foreshadow.set_column_strategy('public.cn', 'n', 'counter')").unwrap();
        Spi::run("INSERT INTO cn VALUES (1, 2.5)").unwrap();
        Spi::run("UPDATE cn SET n = n + 1.25 WHERE id = 1").unwrap();
        assert_eq!(
            Spi::get_one::<String>("SELECT n::text FROM cn WHERE id = 1"),
            Ok(Some("3.75".into()))
        );
        // Last: the error is caught without a subtransaction to undo it.
        assert_eq!(
            error_of(|| Spi::run("UPDATE cn SET n = 'Infinity' WHERE id = 1").unwrap()),
            "counter column \"n\" cannot go from 3.75 to Infinity"
        );
    }

    #[pg_test]
    fn digest_is_order_independent_and_content_sensitive() {
        Spi::run("CREATE TABLE t1 (id int PRIMARY KEY, v text); CREATE TABLE t2 (id int PRIMARY KEY, v text)").unwrap();
        Spi::run("INSERT INTO t1 VALUES (1,'a'),(2,'b'); INSERT INTO t2 VALUES (2,'b'),(1,'a')")
            .unwrap();
        let d = |t: &str| {
            Spi::get_one::<String>(&format!("SELECT foreshadow.table_digest('{t}')"))
                .unwrap()
                .unwrap()
        };
        assert_eq!(d("t1"), d("t2"));
        Spi::run("UPDATE t2 SET v = 'c' WHERE id = 2").unwrap();
        assert_ne!(d("t1"), d("t2"));
    }

    #[pg_test(error = "table public.nopk has no primary key")]
    fn refuses_table_without_primary_key() {
        Spi::run("CREATE TABLE public.nopk (v int)").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.nopk')").unwrap();
    }

    #[pg_test(error = "unknown conflict strategy \"fancy\" for table public.accounts")]
    fn refuses_unknown_strategy() {
        Spi::run("CREATE TABLE public.accounts (id int PRIMARY KEY)").unwrap();
        Spi::run("SELECT foreshadow.make_global('public.accounts', strategy => 'fancy')").unwrap();
    }

    #[pg_test(error = "TRUNCATE is not supported on global table public.accounts")]
    fn refuses_truncate() {
        setup_accounts();
        Spi::run("TRUNCATE accounts").unwrap();
    }

    #[pg_test(error = "cannot change the primary key of a row of global table public.accounts")]
    fn refuses_primary_key_update() {
        setup_accounts();
        Spi::run("INSERT INTO accounts VALUES (1, 'ann', 10)").unwrap();
        Spi::run("UPDATE accounts SET id = 2 WHERE id = 1").unwrap();
    }

    #[pg_test]
    fn drop_global_removes_capture() {
        setup_accounts();
        Spi::run("SELECT foreshadow.drop_global('accounts')").unwrap();
        Spi::run("INSERT INTO accounts VALUES (1, 'ann', 10)").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.row_versions"),
            Ok(Some(0))
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.global_tables"),
            Ok(Some(0))
        );
    }

    #[pg_test]
    fn dropping_a_global_table_forgets_it() {
        setup_accounts();
        Spi::run("INSERT INTO accounts VALUES (1, 'ann', 10)").unwrap();
        Spi::run("DROP TABLE accounts").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.tables"),
            Ok(Some(0))
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM foreshadow.row_versions"),
            Ok(Some(0))
        );
    }

    #[pg_test]
    fn grant_sidecar_handles_names_that_need_quoting() {
        Spi::run(r#"CREATE ROLE "Side Car" LOGIN REPLICATION"#).unwrap();
        Spi::run(r#"SELECT foreshadow.grant_sidecar('"Side Car"')"#).unwrap();
        let can = Spi::get_one::<bool>(
            r#"SELECT has_function_privilege('Side Car', 'foreshadow.apply_transaction(text, text, text, text, timestamptz, integer)', 'EXECUTE')"#,
        );
        assert_eq!(can, Ok(Some(true)));
    }
}
