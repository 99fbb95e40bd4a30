//! The version of every row of every global table
//! (`foreshadow.row_versions`), found, locked and written at the heap level
//! like the users' rows: capture writes one for every local write and apply
//! one for every peer intent, so a SQL statement for it per row was most of
//! both. A version is found through the table's primary key (relid, key)
//! and locked (waiting for a concurrent writer of it), which is what orders
//! writers of the same row.

use crate::catalog::Table;
use crate::heap::Heap;
use foreshadow_model::{Hlc, VersionVector};
use pgrx::pg_sys;
use std::rc::Rc;

/// A row's version as stored.
#[derive(Clone, Debug)]
pub struct Version {
    pub hlc: Hlc,
    pub origin: String,
    pub vv: VersionVector,
    pub deleted: bool,
    /// Strategy merge: the leaves this version resolved (a JSON array of
    /// the model's `Leaf`), while there is more than one.
    pub leaves: Option<String>,
    /// Tables with counter columns: each one's counter (`counters`).
    pub counters: Option<String>,
}

/// A stored version, locked by this transaction.
pub struct Found {
    slot: *mut pg_sys::TupleTableSlot,
    pub version: Version,
}

/// `foreshadow.row_versions`, open.
pub struct Store {
    heap: Rc<Heap>,
}

impl Store {
    pub fn new(heap: Rc<Heap>) -> Store {
        Store { heap }
    }

    fn table(&self) -> &Table {
        self.heap.table()
    }

    /// The version of row `key` (its primary key as JSON text) of table
    /// `relid`, locked; None if the row has none yet.
    pub fn find(&self, relid: pg_sys::Oid, key: &str) -> Option<Found> {
        let search = self.heap.fields([
            ("relid", Some(u32::from(relid).to_string())),
            ("key", Some(key.into())),
        ]);
        let slot = self.heap.find(&search)?;
        let nullable = |name: &str| {
            let column = self
                .table()
                .column(name)
                .expect("row_versions has the column");
            self.heap.text_of(slot, column)
        };
        let text = |name: &str| nullable(name).unwrap_or_default();
        let version = Version {
            hlc: Hlc(text("hlc").parse().unwrap_or(0)),
            origin: text("origin"),
            vv: serde_json::from_str(&text("vv")).unwrap_or_default(),
            deleted: text("deleted") == "t",
            leaves: nullable("leaves"),
            counters: nullable("counters"),
        };
        Some(Found { slot, version })
    }

    /// Deletes the locked version `found`: a tombstone forgotten here.
    pub fn forget(&self, found: Found) {
        self.heap.delete(found.slot);
    }

    /// Stores `v` as the version of row `key` of `relid`: over `found` (the
    /// locked version), or as its first version.
    pub fn write(&self, found: Option<&Found>, relid: pg_sys::Oid, key: &str, v: &Version) {
        let vv = serde_json::to_string(&v.vv).expect("a version vector serialises");
        let fields = [
            ("hlc", Some((v.hlc.0 as i64).to_string())),
            ("origin", Some(v.origin.clone())),
            ("vv", Some(vv)),
            ("deleted", Some(v.deleted.to_string())),
            ("leaves", v.leaves.clone()),
            ("counters", v.counters.clone()),
        ];
        match found {
            Some(f) => self.heap.update(f.slot, &self.heap.fields(fields)),
            None => {
                let identity = [
                    ("relid", Some(u32::from(relid).to_string())),
                    ("key", Some(key.into())),
                ];
                self.heap
                    .insert(&self.heap.fields(fields.into_iter().chain(identity)));
            }
        }
    }
}
