//! Strategy `vv` on a real 3-region lab with WAN delay: writes to the same
//! row made in every region without hearing each other are all kept, as
//! the same siblings everywhere (the latest stamped one in the table), and
//! `foreshadow.resolve` in any one region replaces them in every region.

mod common;

use common::{fault_all, lab, names, text_in, wait_for_everywhere, CONVERGE};
use foreshadow_lab::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_stay_as_siblings_until_resolved() {
    let lab = lab("siblings", 3, 20).await;
    let r = names(&lab);
    lab.everywhere(
        "CREATE TABLE public.docs (id bigint PRIMARY KEY, body text NOT NULL); \
         SELECT foreshadow.make_global('public.docs', strategy => 'vv');",
    )
    .await
    .unwrap();
    lab.client(&r[0])
        .await
        .unwrap()
        .execute("INSERT INTO docs VALUES (1, 'draft')", &[])
        .await
        .unwrap();
    lab.wait_identical(&["public.docs"], CONVERGE)
        .await
        .unwrap();
    fault_all(&lab, &r, Fault::Cut);
    for region in &r {
        lab.client(region)
            .await
            .unwrap()
            .execute(
                "UPDATE docs SET body = $1 WHERE id = 1",
                &[&format!("by {region}")],
            )
            .await
            .unwrap();
    }
    fault_all(&lab, &r, Fault::Heal);
    // Every region: the three writes, nothing else, the same.
    let siblings = "SELECT string_agg((row ->> 'body') || '@' || origin || CASE WHEN in_table THEN '*' ELSE '' END, \
                    ', ' ORDER BY stamp, origin) FROM foreshadow.siblings WHERE table_name = 'docs'::regclass";
    let mut seen = None;
    for region in &r {
        common::wait_for(
            &lab,
            region,
            "SELECT count(*)::text FROM foreshadow.siblings",
            Some("3"),
            CONVERGE,
        )
        .await
        .unwrap();
        let got = text_in(&lab, region, siblings).await.unwrap().unwrap();
        for w in &r {
            assert!(got.contains(&format!("by {w}@{w}")), "{region}: {got}");
        }
        assert_eq!(
            seen.get_or_insert(got.clone()),
            &got,
            "{region}: the same siblings"
        );
    }
    lab.wait_identical(&["public.docs"], CONVERGE)
        .await
        .unwrap();
    // One region resolves: every region ends with that row and no sibling.
    lab.client(&r[1])
        .await
        .unwrap()
        .execute(
            "SELECT foreshadow.resolve('docs', '{\"id\": 1}', '{\"id\": 1, \"body\": \"all three\"}')",
            &[],
        )
        .await
        .unwrap();
    wait_for_everywhere(
        &lab,
        "SELECT count(*)::text FROM foreshadow.siblings",
        Some("0"),
        CONVERGE,
    )
    .await
    .unwrap();
    wait_for_everywhere(
        &lab,
        "SELECT body FROM docs WHERE id = 1",
        Some("all three"),
        CONVERGE,
    )
    .await
    .unwrap();
}
