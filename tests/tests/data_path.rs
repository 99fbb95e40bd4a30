//! The data path end to end: what a peer's write looks like once it is
//! applied in another region (same row, same version, same values, same
//! rights, same triggers as a replica), on a real 3-region lab with WAN
//! delay. Run serially (each test starts its own lab).

mod common;

use common::{
    client_as, create_table_owner, dead_letters, diff_rows, lab, names, pg_error, scalar_i64,
    sidecar_config_without, text_in, wait_for, wait_for_everywhere, wait_same_with, CONVERGE,
};
use foreshadow_lab::workload::Rng;
use foreshadow_lab::{Fault, Lab};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Long enough for a few WAN round trips and an apply, on a busy 2-core box.
const ARRIVE: Duration = Duration::from_secs(30);

/// Makes `tables` global in every region.
async fn make_global(lab: &Lab, tables: &[&str]) {
    for t in tables {
        lab.everywhere(&format!("SELECT foreshadow.make_global('{t}')"))
            .await
            .unwrap();
    }
}

/// Waits until `tables` hold the same rows everywhere; on failure says which
/// keys differ (`diff_sql`: key text, row text) and what was dead-lettered.
async fn assert_identical(lab: &Lab, tables: &[&str], diff_sql: &str) {
    if let Err(e) = lab.wait_identical(tables, CONVERGE).await {
        panic!(
            "{tables:?} did not converge: {e}\n{}\ndead letters: {}",
            diff_rows(lab, "", diff_sql).await,
            dead_letters(lab).await
        );
    }
}

/// Unwraps a wait; its failure says what was dead-lettered.
async fn or_report<T>(lab: &Lab, waited: Result<T, String>) -> T {
    match waited {
        Ok(v) => v,
        Err(e) => panic!("{e}\ndead letters: {}", dead_letters(lab).await),
    }
}

async fn assert_no_dead_letters(lab: &Lab) {
    for r in names(lab) {
        let n = scalar_i64(lab, &r, "SELECT count(*) FROM foreshadow.dead_letters").await;
        assert_eq!(n, 0, "dead letters in {r}: {}", dead_letters(lab).await);
    }
}

/// 1. Two or three regions insert the same new key at the same moment; the
/// region that applies both peers' inserts (it has no row of its own) must
/// resolve them like the others, not keep whichever apply committed last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_new_key_inserted_at_once_converges() {
    let lab = lab("samekey", 3, 20).await;
    let r = names(&lab);
    lab.everywhere(
        "CREATE TABLE newkeys (id int PRIMARY KEY, region text NOT NULL, v int NOT NULL)",
    )
    .await
    .unwrap();
    make_global(&lab, &["newkeys"]).await;
    let mut clients = Vec::new();
    for region in &r {
        clients.push(Arc::new(lab.client(region).await.unwrap()));
    }
    const KEYS: i32 = 200;
    // Key k is inserted by: k % 4 == 0 all three regions; otherwise two of
    // them, so that each region is, for a quarter of the keys, the third
    // region that applies both peers' inserts at once.
    let writers = |k: i32| -> &'static [usize] {
        match k % 4 {
            0 => &[0, 1, 2],
            1 => &[0, 1],
            2 => &[1, 2],
            _ => &[0, 2],
        }
    };
    for k in 1..=KEYS {
        // The writers of one key insert together, well within one WAN delay.
        let inserts: Vec<_> = writers(k)
            .iter()
            .map(|&i| {
                let (c, region) = (clients[i].clone(), r[i].clone());
                let v = i as i32 * 1000 + k;
                tokio::spawn(async move {
                    c.execute(
                        "INSERT INTO newkeys VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                        &[&k, &region, &v],
                    )
                    .await
                    .map_err(|e| format!("{region}: key {k}: {}", pg_error(&e)))
                })
            })
            .collect();
        for done in inserts {
            done.await.unwrap().unwrap();
        }
    }
    assert_identical(
        &lab,
        &["newkeys"],
        "SELECT id::text, t::text FROM newkeys t",
    )
    .await;
    let mut winners: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for region in &r {
        assert_eq!(
            scalar_i64(
                &lab,
                region,
                "SELECT count(*) FROM foreshadow.row_versions WHERE relid = 'newkeys'::regclass"
            )
            .await,
            KEYS as i64,
            "version records in {region}: one per key"
        );
        assert_eq!(
            scalar_i64(&lab, region, "SELECT count(*) FROM newkeys").await,
            KEYS as i64,
            "rows in {region}"
        );
        let c = lab.client(region).await.unwrap();
        let rows = c
            .query(
                "SELECT v.key::text, v.origin, t.region FROM foreshadow.row_versions v \
                 LEFT JOIN newkeys t ON v.key::jsonb ->> 'id' = t.id::text \
                 WHERE v.relid = 'newkeys'::regclass",
                &[],
            )
            .await
            .unwrap();
        let mut won = BTreeMap::new();
        for row in rows {
            let (key, origin, shown) = (
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, Option<String>>(2),
            );
            assert_eq!(
                shown.as_deref(),
                Some(origin.as_str()),
                "region {region}, key {key}: the row shown is not the winning version's"
            );
            won.insert(key, origin);
        }
        winners.push((region.clone(), won));
    }
    for (region, won) in &winners[1..] {
        let differ: Vec<_> = won
            .iter()
            .filter(|(k, o)| winners[0].1.get(*k) != Some(*o))
            .take(10)
            .collect();
        assert!(
            differ.is_empty(),
            "{region} and {} disagree on the winner of keys: {differ:?}",
            winners[0].0
        );
    }
}

/// 2. A column added to a global table (in every region) replicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_column_replicates() {
    let lab = lab("addcol", 3, 20).await;
    let r = names(&lab);
    lab.everywhere("CREATE TABLE widened (id int PRIMARY KEY, a text)")
        .await
        .unwrap();
    make_global(&lab, &["widened"]).await;
    let a = lab.client(&r[0]).await.unwrap();
    a.batch_execute("INSERT INTO widened VALUES (1, 'before')")
        .await
        .unwrap();
    wait_for_everywhere(
        &lab,
        "SELECT a FROM widened WHERE id = 1",
        Some("before"),
        ARRIVE,
    )
    .await
    .unwrap();
    lab.everywhere("ALTER TABLE widened ADD COLUMN b text")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO widened VALUES (2, 'after', 'new-col')")
        .await
        .unwrap();
    lab.client(&r[1])
        .await
        .unwrap()
        .batch_execute("UPDATE widened SET b = 'updated-col' WHERE id = 1")
        .await
        .unwrap();
    wait_for_everywhere(
        &lab,
        "SELECT a FROM widened WHERE id = 2",
        Some("after"),
        ARRIVE,
    )
    .await
    .unwrap();
    for region in &r {
        wait_for(
            &lab,
            region,
            "SELECT string_agg(id || '=' || coalesce(b, 'NULL'), ',' ORDER BY id) FROM widened",
            Some("1=updated-col,2=new-col"),
            ARRIVE,
        )
        .await
        .unwrap_or_else(|e| panic!("the added column did not replicate: {e}"));
    }
    assert_identical(
        &lab,
        &["widened"],
        "SELECT id::text, t::text FROM widened t",
    )
    .await;
    assert_no_dead_letters(&lab).await;
}

/// 3. An intent that does not fit this region's table (a column it lacks)
/// is neither applied half nor dead-lettered: the peer's lane stops with a
/// visible error naming the column, and goes on, in order, once the schema
/// fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intent_that_does_not_fit_stops_the_lane_until_schema_fits() {
    let lab = lab("lanestop", 3, 20).await;
    let r = names(&lab);
    lab.everywhere("CREATE TABLE lanes (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    make_global(&lab, &["lanes"]).await;
    let a = lab.client(&r[0]).await.unwrap();
    a.batch_execute("ALTER TABLE lanes ADD COLUMN late_col text")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO lanes VALUES (1, 'first', 'x')")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO lanes VALUES (2, 'second', 'x')")
        .await
        .unwrap();
    let last_error = format!(
        "SELECT last_error FROM foreshadow.peer_stats WHERE origin = '{}'",
        r[0]
    );
    for region in &r[1..] {
        // The lane from A stops with an error that names the column.
        let deadline = std::time::Instant::now() + ARRIVE;
        let error = loop {
            let got = text_in(&lab, region, &last_error).await;
            if let Ok(Some(e)) = &got {
                break e.clone();
            }
            let rows = text_in(
                &lab,
                region,
                "SELECT coalesce(string_agg(t::text, ', ' ORDER BY id), '') FROM lanes t",
            )
            .await;
            assert!(
                std::time::Instant::now() < deadline,
                "region {region}: no error for the intent that does not fit after {ARRIVE:?}: \
                 last_error gave {got:?}; rows: {rows:?}; dead letters: {}",
                dead_letters(&lab).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            error.contains("late_col"),
            "region {region}: last_error does not name the column: {error}"
        );
        assert_eq!(
            scalar_i64(&lab, region, "SELECT count(*) FROM lanes").await,
            0,
            "region {region} applied part of A's lane while it was stopped"
        );
    }
    assert_no_dead_letters(&lab).await;
    for region in &r[1..] {
        lab.client(region)
            .await
            .unwrap()
            .batch_execute("ALTER TABLE lanes ADD COLUMN late_col text")
            .await
            .unwrap();
    }
    wait_for_everywhere(
        &lab,
        "SELECT string_agg(id || ':' || v || ':' || coalesce(late_col, 'NULL'), ',' ORDER BY id) FROM lanes",
        Some("1:first:x,2:second:x"),
        ARRIVE,
    )
    .await
    .unwrap();
    for region in &r[1..] {
        // In order: the first row was applied no later than the second.
        assert_eq!(
            text_in(
                &lab,
                region,
                "SELECT ((SELECT xmin::text::bigint FROM lanes WHERE id = 1) \
                 <= (SELECT xmin::text::bigint FROM lanes WHERE id = 2))::text"
            )
            .await
            .unwrap()
            .as_deref(),
            Some("true"),
            "region {region} applied A's second row before its first"
        );
        wait_for(&lab, region, &last_error, None, ARRIVE)
            .await
            .unwrap();
    }
    assert_identical(&lab, &["lanes"], "SELECT id::text, t::text FROM lanes t").await;
    assert_no_dead_letters(&lab).await;
}

/// A 3-region lab where login role `app_owner` may create tables in
/// public and has run `sql` in every region; its region names.
async fn lab_with_owner_schema(name: &str, sql: impl AsRef<str>) -> (common::TestLab, Vec<String>) {
    let lab = lab(name, 3, 20).await;
    let r = names(&lab);
    create_table_owner(&lab, "app_owner").await;
    for region in &r {
        client_as(&lab, region, "app_owner")
            .await
            .batch_execute(sql.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{region}: {}", pg_error(&e)));
    }
    (lab, r)
}

/// 4. Applied writes run with the table owner's rights: a trigger the owner
/// wrote, BEFORE or AFTER the row or deferred to the commit, cannot do in
/// a peer region what the owner cannot do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_owner_cannot_become_superuser_elsewhere() {
    const ROWS: i32 = 12;
    let (lab, r) = lab_with_owner_schema("owner", "CREATE TABLE public.owned (id int PRIMARY KEY, v text);
                 CREATE TABLE public.trigger_log (id int, who text);
                 CREATE FUNCTION public.try_escalate() RETURNS trigger LANGUAGE plpgsql SECURITY INVOKER AS $$
                 BEGIN
                     BEGIN
                         ALTER ROLE app_owner SUPERUSER;
                     EXCEPTION WHEN OTHERS THEN NULL;
                     END;
                     INSERT INTO public.trigger_log VALUES (NEW.id, current_user);
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER try_escalate BEFORE INSERT ON public.owned
                     FOR EACH ROW EXECUTE FUNCTION public.try_escalate();
                 ALTER TABLE public.owned ENABLE ALWAYS TRIGGER try_escalate;
                 CREATE TRIGGER try_escalate_after AFTER INSERT ON public.owned
                     FOR EACH ROW EXECUTE FUNCTION public.try_escalate();
                 ALTER TABLE public.owned ENABLE ALWAYS TRIGGER try_escalate_after;
                 CREATE CONSTRAINT TRIGGER try_escalate_at_commit AFTER INSERT ON public.owned
                     DEFERRABLE INITIALLY DEFERRED
                     FOR EACH ROW EXECUTE FUNCTION public.try_escalate();
                 ALTER TABLE public.owned ENABLE ALWAYS TRIGGER try_escalate_at_commit;",).await;
    make_global(&lab, &["owned"]).await;
    // One transaction each: every apply call opens the row's table and
    // Foreshadow's own (the superuser's) tables afresh, and the AFTER
    // trigger must fire as the owner whatever order they are closed in.
    let owner = client_as(&lab, &r[0], "app_owner").await;
    for id in 1..=ROWS {
        owner
            .batch_execute(&format!("INSERT INTO owned VALUES ({id}, 'by app_owner')"))
            .await
            .unwrap();
    }
    let arrived = wait_for_everywhere(
        &lab,
        "SELECT count(*)::text FROM owned WHERE v = 'by app_owner'",
        Some(&ROWS.to_string()),
        ARRIVE,
    )
    .await;
    let mut supers = Vec::new();
    let mut ran_as = Vec::new();
    for region in &r {
        supers.push((
            region.clone(),
            text_in(
                &lab,
                region,
                "SELECT rolsuper::text FROM pg_roles WHERE rolname = 'app_owner'",
            )
            .await
            .unwrap(),
        ));
        ran_as.push((
            region.clone(),
            text_in(
                &lab,
                region,
                // Each row's three triggers (BEFORE, AFTER, deferred) ran.
                "SELECT string_agg(DISTINCT who, ',') || ' x' || count(*) FROM trigger_log",
            )
            .await
            .unwrap(),
        ));
    }
    assert!(
        supers.iter().all(|(_, s)| s.as_deref() == Some("false")),
        "app_owner is a superuser somewhere after its own trigger ran on an applied write: {supers:?} \
         (trigger ran as: {ran_as:?})"
    );
    or_report(&lab, arrived).await;
    assert!(
        ran_as
            .iter()
            .all(|(_, who)| who.as_deref() == Some(format!("app_owner x{}", 3 * ROWS).as_str())),
        "the owner's trigger ran as someone else than the owner: {ran_as:?}"
    );
    assert_identical(&lab, &["owned"], "SELECT id::text, t::text FROM owned t").await;
}

/// 4b. A setting the owner's code changes while a peer's write is applied
/// ends with that write: it cannot steer what Foreshadow runs next with
/// the extension's rights (a `search_path` through the owner's schema
/// would resolve its names to the owner's functions), nor the next
/// owner's code, nor the sidecar's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_code_cannot_change_settings_for_what_follows() {
    let (lab, r) = lab_with_owner_schema(
        "settings",
        "CREATE TABLE public.noisy (id int PRIMARY KEY);
                 CREATE TABLE public.seen_log (id int, path text, mark text);
                 CREATE FUNCTION public.meddle() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     INSERT INTO public.seen_log VALUES (NEW.id, current_setting('search_path'),
                         coalesce(current_setting('app.mark', true), ''));
                     PERFORM set_config('search_path', 'public, pg_catalog', false);
                     PERFORM set_config('app.mark', 'left by ' || NEW.id, false);
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER meddle BEFORE INSERT ON public.noisy
                     FOR EACH ROW EXECUTE FUNCTION public.meddle();
                 ALTER TABLE public.noisy ENABLE ALWAYS TRIGGER meddle;",
    )
    .await;
    make_global(&lab, &["noisy"]).await;
    let owner = client_as(&lab, &r[0], "app_owner").await;
    // Rows 1 and 2 in one peer transaction (one apply call), 3 and 4 in
    // later ones (the same apply session).
    for sql in [
        "BEGIN; INSERT INTO noisy VALUES (1); INSERT INTO noisy VALUES (2); COMMIT",
        "INSERT INTO noisy VALUES (3)",
        "INSERT INTO noisy VALUES (4)",
    ] {
        owner.batch_execute(sql).await.unwrap();
    }
    let arrived =
        wait_for_everywhere(&lab, "SELECT count(*)::text FROM noisy", Some("4"), ARRIVE).await;
    or_report(&lab, arrived).await;
    for region in &r[1..] {
        let seen = text_in(
            &lab,
            region,
            "SELECT string_agg(id || ': ' || path || ' / ' || mark, '; ' ORDER BY id) FROM seen_log",
        )
        .await
        .unwrap()
        .unwrap_or_default();
        assert!(
            !seen.contains("left by") && !seen.contains("public"),
            "region {region}: what the owner's trigger set while one applied row was written \
             outlived it: {seen}"
        );
    }
    assert_identical(&lab, &["noisy"], "SELECT id::text, t::text FROM noisy t").await;
}

/// The SQL that makes `app_owner` (a login role, CREATE on public) own
/// `public.<table> (id int PRIMARY KEY)` and `public.tattle()`, a volatile
/// function that tries to make app_owner a superuser and logs who ran it
/// into `public.who_ran`: wherever it runs with more rights than the
/// owner's, both show it.
fn owner_with_tattler(table: &str) -> String {
    format!(
        "CREATE TABLE public.{table} (id int PRIMARY KEY);
         CREATE TABLE public.who_ran (who text);
         CREATE FUNCTION public.tattle() RETURNS int LANGUAGE plpgsql AS $$
         BEGIN
             BEGIN
                 ALTER ROLE app_owner SUPERUSER;
             EXCEPTION WHEN OTHERS THEN NULL;
             END;
             INSERT INTO public.who_ran VALUES (current_user);
             RETURN 1;
         END $$;"
    )
}

/// In every region of `lab`: app_owner is no superuser, and every run of
/// `tattle()` was as app_owner (at least one: `ran_somewhere`).
async fn assert_tattler_ran_as_owner(lab: &Lab) {
    let mut seen = Vec::new();
    for region in names(lab) {
        let is_super = text_in(
            lab,
            &region,
            "SELECT rolsuper::text FROM pg_roles WHERE rolname = 'app_owner'",
        )
        .await
        .unwrap();
        let who = text_in(
            lab,
            &region,
            "SELECT string_agg(DISTINCT who, ',') FROM who_ran",
        )
        .await
        .unwrap();
        seen.push((region, is_super, who));
    }
    assert!(
        seen.iter().all(|(_, s, who)| s.as_deref() == Some("false")
            && who.as_deref().is_none_or(|w| w == "app_owner")),
        "the owner's code ran with more rights than the owner's (region, superuser, ran as): {seen:?}"
    );
}

/// 4c. An index expression the owner wrote is evaluated (folded when the
/// index is first opened) as the owner when a peer's write is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_index_expressions_run_as_owner() {
    let (lab, r) = lab_with_owner_schema(
        "indexexpr",
        format!(
            "{}
                 CREATE FUNCTION public.sneaky(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
                 BEGIN RETURN public.tattle() + $1; END $$;
                 CREATE INDEX indexed_sneaky ON public.indexed ((public.sneaky(1) + id));",
            owner_with_tattler("indexed")
        ),
    )
    .await;
    make_global(&lab, &["indexed"]).await;
    client_as(&lab, &r[0], "app_owner")
        .await
        .batch_execute("INSERT INTO indexed VALUES (1)")
        .await
        .unwrap();
    // Arrived: by its version, as a superuser's query of the table would
    // fold the index expression itself (with the superuser's rights).
    let arrived = wait_for_everywhere(
        &lab,
        "SELECT count(*)::text FROM foreshadow.row_versions WHERE relid = 'indexed'::regclass",
        Some("1"),
        ARRIVE,
    )
    .await;
    or_report(&lab, arrived).await;
    assert_tattler_ran_as_owner(&lab).await;
}

/// 4d. Re-announcing a table (`--resync-peer`) reads the table itself, as
/// its owner, by what it is now: not whatever took the name it was made
/// global under (a view of the owner's, after a rename); remaking its
/// capture trigger too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reannounce_reads_the_table_as_its_owner() {
    let (lab, r) = lab_with_owner_schema("reannounce", owner_with_tattler("renamed")).await;
    make_global(&lab, &["renamed"]).await;
    let owner = client_as(&lab, &r[0], "app_owner").await;
    owner
        .batch_execute(
            "INSERT INTO renamed VALUES (1), (2);
             ALTER TABLE public.renamed RENAME TO moved;
             CREATE VIEW public.renamed AS SELECT public.tattle() AS id;",
        )
        .await
        .unwrap();
    let sent = text_in(
        &lab,
        &r[0],
        "SELECT foreshadow.reannounce('public.moved'::regclass)::text",
    )
    .await
    .unwrap();
    assert_eq!(
        sent.as_deref(),
        Some("2"),
        "re-announced the table's own rows"
    );
    assert_tattler_ran_as_owner(&lab).await;
    // Its capture trigger is remade on the table too, not on the view.
    let refreshed = text_in(
        &lab,
        &r[0],
        "SELECT foreshadow.refresh_table('public.moved')::text",
    )
    .await;
    assert!(
        refreshed.is_ok(),
        "refresh_table after a rename: {refreshed:?}"
    );
}

/// 5. Applying a peer's write is replicating it: ordinary (ENABLE ORIGIN)
/// triggers do not fire again on the applied rows, ENABLE REPLICA ones do,
/// and what they write to global tables travels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_triggers_do_not_fire_on_applied_rows() {
    let lab = lab("triggers", 3, 20).await;
    let r = names(&lab);
    lab.everywhere(
        "CREATE TABLE stamped (id int PRIMARY KEY, v text, updated_at timestamptz);
         CREATE TABLE applied_audit (id int, op text);
         CREATE TABLE replica_log (region text, id int, op text, PRIMARY KEY (region, id, op));
         CREATE TABLE echoed (id int PRIMARY KEY, note text);
         CREATE FUNCTION echo() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF pg_trigger_depth() = 1 THEN
                 UPDATE public.echoed SET note = 'seen in ' || foreshadow.region_name() WHERE id = NEW.id;
             END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER echo AFTER INSERT ON echoed FOR EACH ROW EXECUTE FUNCTION echo();
         ALTER TABLE echoed ENABLE REPLICA TRIGGER echo;
         CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$;
         CREATE TRIGGER touch BEFORE INSERT OR UPDATE ON stamped FOR EACH ROW EXECUTE FUNCTION touch();
         CREATE FUNCTION audit_applied() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO public.applied_audit VALUES (NEW.id, TG_OP);
             INSERT INTO public.replica_log VALUES (foreshadow.region_name(), NEW.id, TG_OP);
             RETURN NULL;
         END $$;
         CREATE TRIGGER audit_applied AFTER INSERT OR UPDATE ON stamped
             FOR EACH ROW EXECUTE FUNCTION audit_applied();
         ALTER TABLE stamped ENABLE REPLICA TRIGGER audit_applied;",
    )
    .await
    .unwrap();
    make_global(&lab, &["stamped", "replica_log", "echoed"]).await;
    // The owner's own replica trigger, named like one of Foreshadow's: it
    // fires on applied rows like any other (apply knows Foreshadow's
    // triggers by their function, not their name).
    lab.everywhere(
        "CREATE TABLE named_audit (id int); \
         CREATE FUNCTION audit_named() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO public.named_audit VALUES (NEW.id); RETURN NULL; END $$;
         CREATE TRIGGER foreshadow_counter_nulls AFTER INSERT OR UPDATE ON stamped
             FOR EACH ROW EXECUTE FUNCTION audit_named();
         ALTER TABLE stamped ENABLE REPLICA TRIGGER foreshadow_counter_nulls;",
    )
    .await
    .unwrap();
    let a = lab.client(&r[0]).await.unwrap();
    for id in 1..=5 {
        a.execute("INSERT INTO stamped (id, v) VALUES ($1, 'new')", &[&id])
            .await
            .unwrap();
    }
    a.batch_execute("UPDATE stamped SET v = 'changed' WHERE id = 2")
        .await
        .unwrap();
    a.batch_execute("UPDATE stamped SET v = 'changed' WHERE id = 4")
        .await
        .unwrap();
    wait_for_everywhere(
        &lab,
        "SELECT string_agg(id || v, ',' ORDER BY id) FROM stamped",
        Some("1new,2changed,3new,4changed,5new"),
        ARRIVE,
    )
    .await
    .unwrap();
    assert_identical(
        &lab,
        &["stamped"],
        "SELECT id::text, t::text FROM stamped t",
    )
    .await;
    // A replica trigger that writes the very row being applied: its write
    // is a local one after the applied write, and travels too.
    a.batch_execute("INSERT INTO echoed VALUES (1, 'new'), (2, 'new')")
        .await
        .unwrap();
    let audit =
        "SELECT count(*) || ' writes of ' || count(DISTINCT id) || ' rows' FROM applied_audit";
    assert_eq!(
        text_in(&lab, &r[0], audit).await.unwrap().as_deref(),
        Some("0 writes of 0 rows"),
        "the replica trigger fired for local writes in {}",
        r[0]
    );
    for region in &r[1..] {
        assert_eq!(
            text_in(&lab, region, audit).await.unwrap().as_deref(),
            Some("7 writes of 5 rows"),
            "the replica trigger did not fire once per applied write in {region}"
        );
        assert_eq!(
            text_in(&lab, region, "SELECT count(*)::text FROM named_audit")
                .await
                .unwrap()
                .as_deref(),
            Some("7"),
            "the owner's trigger named foreshadow_counter_nulls was switched off on applied rows in {region}"
        );
    }
    // What the replica trigger wrote to a global table, while a peer's
    // write was applied, is captured like any write: it reaches every
    // region (7 rows written in each of the two applying regions).
    let logged = "SELECT count(*)::text FROM replica_log";
    let arrived = wait_for_everywhere(&lab, logged, Some("14"), ARRIVE).await;
    or_report(&lab, arrived).await;
    assert_identical(
        &lab,
        &["replica_log"],
        "SELECT region || id || op, t::text FROM replica_log t",
    )
    .await;
    let echoed = "SELECT count(*)::text FROM echoed WHERE note LIKE 'seen in %'";
    let arrived = wait_for_everywhere(&lab, echoed, Some("2"), ARRIVE).await;
    or_report(&lab, arrived).await;
    assert_identical(&lab, &["echoed"], "SELECT id::text, t::text FROM echoed t").await;
}

/// Session settings that change how values print, for the writer.
const ODD_SESSION: &str = "SET extra_float_digits = -3; SET TimeZone = 'Asia/Tokyo'; \
     SET DateStyle = 'SQL, DMY'; SET IntervalStyle = 'sql_standard'; SET bytea_output = 'escape'";
/// The settings every region is compared under.
const CANONICAL_SESSION: &str = "SET extra_float_digits = 3; SET TimeZone = 'UTC'; \
     SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres'; SET bytea_output = 'hex'";

/// 6. Values reach every region bit for bit whatever the writer's session
/// settings, and a row keeps one version record whoever names its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_survive_any_writer_session_settings() {
    let lab = lab("settings", 3, 20).await;
    let r = names(&lab);
    // Only C/POSIX locales on this machine: lc_monetary is not varied.
    lab.everywhere(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN positive_int AS int CHECK (VALUE > 0);
         CREATE TYPE pair AS (x float8, label text);
         CREATE TABLE typed (
             k timestamptz PRIMARY KEY,
             i2 int2, i4 int4, i8 int8, num numeric, f4 float4, f8 float8, fa float8[],
             txt text, bin bytea, flag bool, d date, tm time, ts timestamp, tstz timestamptz,
             iv interval, u uuid, j json, jb jsonb, ia int[], ta text[],
             m mood, pos positive_int, p pair, cash money)",
    )
    .await
    .unwrap();
    make_global(&lab, &["typed"]).await;
    let a = lab.client(&r[0]).await.unwrap();
    a.batch_execute(ODD_SESSION).await.unwrap();
    a.batch_execute(
        r#"INSERT INTO typed VALUES
           ('2024-03-10 01:02:03.456789+00', -32768, 2147483647, -9223372036854775808,
            12345678901234567890.123456789012345678901234567890, 3.1415927, 3.141592653589793,
            '{3.141592653589793,0.1,1e-300}',
            E'ünïcødé ✓ 𝄞 "quoted" back\\slash tab\there nl\nx cr\rx \x01\x1f\x7f end',
            '\xdeadbeef00ff5c'::bytea, true, '2024-02-29', '23:59:59.999999',
            '2024-12-31 23:59:59.123456', '1999-12-31 23:59:59.5+05:30',
            '1 year 2 mons 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '{"b": 1,   "a": [1, 2.50], "b": 2}', '{"z": 1.10, "a": null}',
            '{1,2,NULL,-3}', '{"a b","c,d",NULL,"e\"f","NULL"}',
            'happy', 42, ROW(2.718281828459045, 'e'), 1234.56),
           ('2024-03-10 01:02:03.456790+00', 1, 2, 3,
            -0.000000000000000000000000000000000000000001, '1e-45', 0.1::float8 + 0.2::float8,
            '{4.9e-324,-0,2.2250738585072014e-308,1.7976931348623157e308}',
            '', '\x'::bytea, false, '0001-01-01 BC', '00:00:00', '1970-01-01 00:00:00',
            '2000-01-01 00:00:00+14', '-1 year -2 mons +3 days -04:05:06.000001',
            '00000000-0000-0000-0000-000000000000', '[]', '[]', '{}', '{}',
            'sad', 1, ROW('-0'::float8, ''), -0.01),
           ('2024-12-31 15:00:00+00', 0, 0, 0, 'NaN', 'NaN', '-0',
            '{Infinity,-Infinity,NaN}', 'x', '\x00'::bytea, NULL, 'infinity', '24:00:00',
            '-infinity', 'infinity', '0', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
            'null', 'null', '{{1,2},{3,4}}', '{{"a","b"},{"c","d"}}',
            'ok', 2147483647, ROW(NULL, NULL), 0),
           ('2025-01-01 00:00:00+05', NULL, NULL, NULL, 1.500, 'Infinity', '-Infinity',
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
            '100 years 11 mons 30 days 23:59:59.999999', NULL, NULL, NULL, NULL, NULL,
            NULL, NULL, NULL, NULL),
           ('2025-06-15 12:00:00.000001+00', 7, 7, 7, 7, 1.17549435e-38, 1.0000000000000002,
            NULL, 'to be updated', NULL, NULL, NULL, NULL, NULL, NULL, '7 days', NULL,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
           ('2025-07-01 00:00:00+00', 8, 8, 8, 8, 8, 8, NULL, 'to be deleted', NULL, NULL,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"#,
    )
    .await
    .unwrap();
    wait_for_everywhere(&lab, "SELECT count(*)::text FROM typed", Some("6"), ARRIVE)
        .await
        .unwrap();
    // Another region updates one row, the writer's region deletes another,
    // both from plain UTC sessions naming the key in UTC.
    let b = lab.client(&r[1]).await.unwrap();
    b.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let n = b
        .execute(
            "UPDATE typed SET f8 = f8 * 3, txt = txt || ' (updated)' \
             WHERE k = '2025-06-15 12:00:00.000001+00'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 1, "the update found its row in {}", r[1]);
    let a_utc = lab.client(&r[0]).await.unwrap();
    a_utc.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let n = a_utc
        .execute("DELETE FROM typed WHERE k = '2025-07-01 00:00:00+00'", &[])
        .await
        .unwrap();
    assert_eq!(n, 1);
    let digest = "SELECT md5(coalesce(string_agg(t::text || '#' || coalesce(float8send(t.f8)::text, '-') \
         || '#' || coalesce(float4send(t.f4)::text, '-') || '#' || coalesce(float8send((t.p).x)::text, '-') \
         || '#' || coalesce(t.fa::text, '-') || '#' || coalesce(t.j::text, '-'), '|' ORDER BY t.k), '')) \
         FROM typed t";
    if let Err(e) = wait_same_with(&lab, CANONICAL_SESSION, digest, CONVERGE).await {
        panic!(
            "typed rows differ between regions: {e}\n{}",
            diff_rows(
                &lab,
                CANONICAL_SESSION,
                "SELECT k::text, t::text || ' f8=' || coalesce(float8send(f8)::text, '-') \
                 || ' f4=' || coalesce(float4send(f4)::text, '-') FROM typed t"
            )
            .await
        );
    }
    // And the values are the writer's, not a rounded copy of them.
    let exact = r#"SELECT coalesce(string_agg(name, ', '), '') FROM (VALUES
        ('pi', (SELECT float8send(f8) = float8send(3.141592653589793::float8) AND float4send(f4) = float4send(3.1415927::float4)
                FROM typed WHERE k = '2024-03-10 01:02:03.456789+00')),
        ('float8[]', (SELECT fa::text = '{3.141592653589793,0.1,1e-300}'::float8[]::text FROM typed WHERE k = '2024-03-10 01:02:03.456789+00')),
        ('composite', (SELECT float8send((p).x) = float8send(2.718281828459045::float8) FROM typed WHERE k = '2024-03-10 01:02:03.456789+00')),
        ('numeric', (SELECT num::text = '12345678901234567890.123456789012345678901234567890' FROM typed WHERE k = '2024-03-10 01:02:03.456789+00')),
        ('interval', (SELECT iv::text = '1 year 2 mons 3 days 04:05:06.789'::interval::text FROM typed WHERE k = '2024-03-10 01:02:03.456789+00')),
        ('json text', (SELECT j::text = '{"b": 1,   "a": [1, 2.50], "b": 2}' FROM typed WHERE k = '2024-03-10 01:02:03.456789+00')),
        ('text', (SELECT txt = E'ünïcødé ✓ 𝄞 "quoted" back\\slash tab\there nl\nx cr\rx \x01\x1f\x7f end' FROM typed WHERE k = '2024-03-10 01:02:03.456789+00')),
        ('money', (SELECT cash = 1234.56::money FROM typed WHERE k = '2024-03-10 01:02:03.456789+00')),
        ('0.1+0.2', (SELECT float8send(f8) = float8send(0.1::float8 + 0.2::float8) FROM typed WHERE k = '2024-03-10 01:02:03.45679+00')),
        ('float4 subnormal', (SELECT float4send(f4) = float4send('1e-45'::float4) FROM typed WHERE k = '2024-03-10 01:02:03.45679+00')),
        ('float8 subnormal, -0', (SELECT fa::text = '{4.9e-324,-0,2.2250738585072014e-308,1.7976931348623157e308}'::float8[]::text FROM typed WHERE k = '2024-03-10 01:02:03.45679+00')),
        ('negative interval', (SELECT iv = '-1 year -2 mons +3 days -04:05:06.000001'::interval FROM typed WHERE k = '2024-03-10 01:02:03.45679+00')),
        ('-0', (SELECT float8send(f8) = float8send('-0'::float8) FROM typed WHERE k = '2024-12-31 15:00:00+00')),
        ('updated float', (SELECT float8send(f8) = float8send(1.0000000000000002::float8 * 3) FROM typed WHERE k = '2025-06-15 12:00:00.000001+00')),
        ('float4 min normal', (SELECT float4send(f4) = float4send(1.17549435e-38::float4) FROM typed WHERE k = '2025-06-15 12:00:00.000001+00')),
        ('deleted', (SELECT count(*) = 0 FROM typed WHERE k = '2025-07-01 00:00:00+00'))
    ) AS c(name, ok) WHERE ok IS NOT TRUE"#;
    for region in &r {
        let c = lab.client(region).await.unwrap();
        c.batch_execute(CANONICAL_SESSION).await.unwrap();
        let wrong: String = c.query_one(exact, &[]).await.unwrap().get(0);
        assert_eq!(wrong, "", "values changed on the way in {region}");
    }
    // One version record per row ever written (the deleted one a tombstone),
    // however the writer's session printed its key.
    for region in &r {
        let c = lab.client(region).await.unwrap();
        let keys: Vec<String> = c
            .query(
                "SELECT key::text FROM foreshadow.row_versions WHERE relid = 'typed'::regclass ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(keys.len(), 6, "version records in {region}: {keys:#?}");
    }
}

/// 7. Identity (GENERATED ALWAYS) and stored generated columns replicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_generated_columns_replicate() {
    let lab = lab("identity", 3, 20).await;
    let r = names(&lab);
    lab.everywhere(
        "CREATE TABLE ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, a int, \
         doubled int GENERATED ALWAYS AS (a * 2) STORED)",
    )
    .await
    .unwrap();
    make_global(&lab, &["ident"]).await;
    let a = lab.client(&r[0]).await.unwrap();
    a.batch_execute("INSERT INTO ident (a) SELECT g FROM generate_series(1, 5) g")
        .await
        .unwrap();
    a.batch_execute("UPDATE ident SET a = a + 100 WHERE id = 2")
        .await
        .unwrap();
    let waited = wait_for_everywhere(
        &lab,
        "SELECT string_agg(id || ':' || a || ':' || doubled, ',' ORDER BY id) FROM ident",
        Some("1:1:2,2:102:204,3:3:6,4:4:8,5:5:10"),
        ARRIVE,
    )
    .await;
    or_report(&lab, waited).await;
    assert_no_dead_letters(&lab).await;
    assert_identical(&lab, &["ident"], "SELECT id::text, t::text FROM ident t").await;
}

/// 8. A child row written in one region reaches a third region before the
/// parent it references (written in another region): it is applied once
/// the parent is there, never dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_before_parent_from_another_origin_applies() {
    let lab = lab("fkorder", 3, 20).await;
    let r = names(&lab);
    lab.everywhere(
        "CREATE TABLE parent (id int PRIMARY KEY, name text);
         CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent (id), name text)",
    )
    .await
    .unwrap();
    make_global(&lab, &["parent", "child"]).await;
    // The proxy cuts a region from every peer at once; to reorder, C's
    // sidecar listens to B only for a while.
    let (a_name, b_name, c_name) = (&r[0], &r[1], &r[2]);
    lab.fault(c_name, Fault::KillSidecar).unwrap();
    lab.start_sidecar_with(c_name, &sidecar_config_without(&lab, c_name, a_name))
        .unwrap();
    lab.client(a_name)
        .await
        .unwrap()
        .batch_execute("INSERT INTO parent VALUES (1, 'from A')")
        .await
        .unwrap();
    wait_for(
        &lab,
        b_name,
        "SELECT name FROM parent WHERE id = 1",
        Some("from A"),
        ARRIVE,
    )
    .await
    .unwrap();
    lab.client(b_name)
        .await
        .unwrap()
        .batch_execute("INSERT INTO child VALUES (10, 1, 'from B')")
        .await
        .unwrap();
    // Wait until C has dealt with the child in some way: applied it, kept
    // it as a dead letter, or stopped B's lane with an error.
    let dealt = format!(
        "SELECT ((SELECT count(*) FROM child) + (SELECT count(*) FROM foreshadow.dead_letters) \
         + (SELECT count(*) FROM foreshadow.peer_stats s WHERE s.origin = '{b_name}' \
            AND to_jsonb(s) ->> 'last_error' IS NOT NULL) > 0)::text"
    );
    let _ = wait_for(&lab, c_name, &dealt, Some("true"), Duration::from_secs(15)).await;
    assert_eq!(
        scalar_i64(&lab, c_name, "SELECT count(*) FROM parent").await,
        0,
        "the lab did not hold A's parent back from {c_name}"
    );
    lab.fault(c_name, Fault::KillSidecar).unwrap();
    lab.fault(c_name, Fault::StartSidecar).unwrap();
    assert_identical(
        &lab,
        &["parent", "child"],
        "SELECT 'parent ' || id, t::text FROM parent t UNION ALL SELECT 'child ' || id, t::text FROM child t",
    )
    .await;
    for region in &r {
        assert_eq!(
            text_in(&lab, region, "SELECT string_agg(c.name || '->' || p.name, ',') FROM child c JOIN parent p ON p.id = c.parent_id")
                .await
                .unwrap()
                .as_deref(),
            Some("from B->from A"),
            "region {region}"
        );
    }
    assert_no_dead_letters(&lab).await;
}

/// 9. Dead letters can be retried once their cause is fixed: applied once,
/// removed, and retrying again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_retried() {
    let lab = lab("retry", 3, 20).await;
    let r = names(&lab);
    let (a_name, b_name, c_name) = (&r[0], &r[1], &r[2]);
    lab.everywhere("CREATE TABLE late (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    for region in [a_name, b_name] {
        lab.client(region)
            .await
            .unwrap()
            .batch_execute("SELECT foreshadow.make_global('late')")
            .await
            .unwrap();
    }
    lab.client(a_name)
        .await
        .unwrap()
        .batch_execute("INSERT INTO late VALUES (1, 'one')")
        .await
        .unwrap();
    wait_for(
        &lab,
        b_name,
        "SELECT v FROM late WHERE id = 1",
        Some("one"),
        ARRIVE,
    )
    .await
    .unwrap();
    wait_for(
        &lab,
        c_name,
        "SELECT count(*)::text FROM foreshadow.dead_letters",
        Some("1"),
        ARRIVE,
    )
    .await
    .unwrap();
    let c = lab.client(c_name).await.unwrap();
    c.batch_execute("SELECT foreshadow.make_global('late', announce_existing => false)")
        .await
        .unwrap();
    c.batch_execute("SELECT foreshadow.retry_dead_letters()")
        .await
        .unwrap_or_else(|e| panic!("retrying dead letters in {c_name}: {}", pg_error(&e)));
    let rows = "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM late";
    assert_eq!(
        text_in(&lab, c_name, rows).await.unwrap().as_deref(),
        Some("1=one")
    );
    assert_eq!(
        scalar_i64(&lab, c_name, "SELECT count(*) FROM foreshadow.dead_letters").await,
        0,
        "{}",
        dead_letters(&lab).await
    );
    c.batch_execute("SELECT foreshadow.retry_dead_letters()")
        .await
        .unwrap();
    assert_eq!(
        text_in(&lab, c_name, rows).await.unwrap().as_deref(),
        Some("1=one")
    );
    // The row is global everywhere now: a later write reaches C, and a
    // retry after it does not bring the old value back.
    lab.client(b_name)
        .await
        .unwrap()
        .batch_execute("UPDATE late SET v = 'two' WHERE id = 1")
        .await
        .unwrap();
    wait_for_everywhere(&lab, rows, Some("1=two"), ARRIVE)
        .await
        .unwrap();
    c.batch_execute("SELECT foreshadow.retry_dead_letters()")
        .await
        .unwrap();
    assert_eq!(
        text_in(&lab, c_name, rows).await.unwrap().as_deref(),
        Some("1=two")
    );
    assert_identical(&lab, &["late"], "SELECT id::text, t::text FROM late t").await;
    assert_no_dead_letters(&lab).await;
}

/// 10. A counter column may be written as NULL: the writer's own insert
/// succeeds, the counter is stored as 0 in every region (documented: a
/// counter counts from zero), and increments from it add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_in_counter_column_is_accepted() {
    let lab = lab("nullcounter", 3, 20).await;
    let r = names(&lab);
    lab.everywhere("CREATE TABLE page_hits (id int PRIMARY KEY, hits bigint)")
        .await
        .unwrap();
    make_global(&lab, &["page_hits"]).await;
    lab.everywhere("SELECT foreshadow.set_column_strategy('page_hits', 'hits', 'counter')")
        .await
        .unwrap();
    let a = lab.client(&r[0]).await.unwrap();
    let b = lab.client(&r[1]).await.unwrap();
    a.batch_execute("INSERT INTO page_hits VALUES (1, NULL)")
        .await
        .unwrap_or_else(|e| panic!("inserting NULL into a counter column: {}", pg_error(&e)));
    let waited = wait_for_everywhere(
        &lab,
        "SELECT count(*) || ':' || coalesce(max(hits)::text, 'NULL') FROM page_hits",
        Some("1:0"),
        ARRIVE,
    )
    .await;
    or_report(&lab, waited).await;
    let add = "UPDATE page_hits SET hits = coalesce(hits, 0) + 5 WHERE id = 1";
    let (ra, rb) = tokio::join!(a.batch_execute(add), b.batch_execute(add));
    ra.unwrap();
    rb.unwrap();
    assert_identical(
        &lab,
        &["page_hits"],
        "SELECT id::text, t::text FROM page_hits t",
    )
    .await;
    // Both increments count.
    wait_for_everywhere(
        &lab,
        "SELECT coalesce(hits::text, 'NULL') FROM page_hits WHERE id = 1",
        Some("10"),
        ARRIVE,
    )
    .await
    .unwrap();
    assert_no_dead_letters(&lab).await;
}

/// Sleeps 0..=`max_ms` milliseconds, so that writes in different regions
/// interleave with the applies of each other's writes (a writer that never
/// pauses makes every peer write arrive older than its own, and lose).
async fn pause(rng: &mut Rng, max_ms: u64) {
    tokio::time::sleep(Duration::from_millis(rng.next_u64() % (max_ms + 1))).await;
}

/// 11. One region deletes and re-inserts a row in a loop while the others
/// update it: the apply never makes a client's statement fail (no
/// deadlock between an apply and a local writer), and all converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_reinsert_racing_apply_does_not_fail_writers() {
    let lab = lab("churn", 3, 20).await;
    let r = names(&lab);
    // A user trigger that takes a few milliseconds, on local and applied
    // writes alike (ENABLE ALWAYS): each write of the row, local or applied,
    // spends that long between starting and inserting the row, so that a
    // local write and an apply of the same key overlap often, as they do
    // on a loaded server, instead of once in a blue moon.
    lab.everywhere(
        "CREATE TABLE churn (id int PRIMARY KEY, v text);
         CREATE FUNCTION take_a_moment() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_catalog.pg_sleep(0.003); RETURN NEW; END $$;
         CREATE TRIGGER take_a_moment BEFORE INSERT OR UPDATE ON churn
             FOR EACH ROW EXECUTE FUNCTION take_a_moment();
         ALTER TABLE churn ENABLE ALWAYS TRIGGER take_a_moment;",
    )
    .await
    .unwrap();
    make_global(&lab, &["churn"]).await;
    lab.client(&r[0])
        .await
        .unwrap()
        .batch_execute("INSERT INTO churn VALUES (1, 'seed')")
        .await
        .unwrap();
    wait_for_everywhere(
        &lab,
        "SELECT v FROM churn WHERE id = 1",
        Some("seed"),
        ARRIVE,
    )
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let statements = Arc::new(AtomicU64::new(0));
    // A plain INSERT in A may legitimately find the row again: a newer
    // upsert from B or C, concurrent with A's delete, wins over it. That
    // unique violation is the user's conflict, not the apply's failure.
    let reinserted_by_peer = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, region) in r.iter().enumerate() {
        let c = lab.client(region).await.unwrap();
        let (stop, statements, reinserted) =
            (stop.clone(), statements.clone(), reinserted_by_peer.clone());
        let region = region.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors: Vec<String> = Vec::new();
            let mut n = 0u64;
            let mut rng = Rng::new(i as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let v = format!("{region}-{n}");
                if i == 0 {
                    if let Err(e) = c.execute("DELETE FROM churn WHERE id = 1", &[]).await {
                        errors.push(format!("{region} DELETE: {}", pg_error(&e)));
                    }
                    pause(&mut rng, 20).await;
                    match c.execute("INSERT INTO churn VALUES (1, $1)", &[&v]).await {
                        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                            reinserted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.push(format!("{region} INSERT: {}", pg_error(&e))),
                        Ok(_) => {}
                    }
                    statements.fetch_add(2, Ordering::Relaxed);
                    pause(&mut rng, 20).await;
                } else {
                    if let Err(e) = c
                        .execute(
                            "INSERT INTO churn VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                            &[&v],
                        )
                        .await
                    {
                        errors.push(format!("{region} UPSERT: {}", pg_error(&e)));
                    }
                    statements.fetch_add(1, Ordering::Relaxed);
                    pause(&mut rng, 15).await;
                }
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    let total = statements.load(Ordering::Relaxed);
    eprintln!(
        "churn: {total} statements, {} re-inserts found the row a peer brought back, {} errors",
        reinserted_by_peer.load(Ordering::Relaxed),
        errors.len()
    );
    for region in &r {
        eprintln!(
            "churn: applied in {region} (origin:intents/changed rows): {:?}",
            text_in(
                &lab,
                region,
                "SELECT string_agg(origin || ':' || intents || '/' || changed_rows, ' ' ORDER BY origin) \
                 FROM foreshadow.peer_stats"
            )
            .await
        );
    }
    assert!(
        total > 200,
        "the writers did too little to test anything: {total}"
    );
    let deadlocks = errors.iter().filter(|e| e.contains("40P01")).count();
    assert!(
        errors.is_empty(),
        "{} client statements failed ({deadlocks} deadlocks), e.g.:\n  {}",
        errors.len(),
        errors
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert_identical(&lab, &["churn"], "SELECT id::text, t::text FROM churn t").await;
    lab.wait_converged("public.churn", CONVERGE).await.unwrap();
}
