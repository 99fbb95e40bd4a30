//! A leaf of a conflict as a primary keeps it while its row has more than
//! one (`foreshadow.row_versions.leaves`), and as a pre-staged resolution
//! will carry it: the write's version, stamp and row image. The one stored
//! and wire form of the leaves the strategies resolve.

use super::Versioned;
use crate::lww::Stamp;
use crate::{Hlc, Intent, VersionVector};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Leaf {
    pub vv: VersionVector,
    pub hlc: Hlc,
    pub origin: String,
    /// Column → text, as an intent's row image; `None`: a delete.
    pub row: Option<Map<String, Value>>,
}

impl Versioned for Leaf {
    type Row = Map<String, Value>;
    fn vv(&self) -> &VersionVector {
        &self.vv
    }
    fn stamp(&self) -> Stamp<'_> {
        Stamp {
            hlc: self.hlc,
            origin: &self.origin,
        }
    }
    fn row(&self) -> Option<&Self::Row> {
        self.row.as_ref()
    }
}

impl From<&Intent> for Leaf {
    fn from(i: &Intent) -> Leaf {
        Leaf {
            vv: i.vv.clone(),
            hlc: i.hlc,
            origin: i.origin.clone(),
            row: i.row.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{frontier, merge};

    #[test]
    fn leaves_round_trip_and_fold_like_intents() {
        let i = Intent::decode(
            br#"{"v":2,"origin":"eu","hlc":7,"schema":"s","table":"t","op":"update","key":{"id":"1"},"row":{"id":"1","x":"a"},"vv":{"eu":1},"strategy":"merge"}"#,
        )
        .unwrap();
        let a = Leaf::from(&i);
        let text = serde_json::to_string(&vec![a.clone()]).unwrap();
        let back: Vec<Leaf> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, vec![a.clone()]);
        let mut b = a.clone();
        b.vv = serde_json::from_str(r#"{"us":1}"#).unwrap();
        b.origin = "us".into();
        b.row.as_mut().unwrap().insert("x".into(), "b".into());
        assert_eq!(frontier([&b, &a]), vec![&a, &b]);
        let got = merge::resolve([&b, &a], None, |_, x, y| {
            let mut m = x.clone();
            let joined = format!("{}{}", x["x"].as_str().unwrap(), y["x"].as_str().unwrap());
            m.insert("x".into(), joined.into());
            Ok::<_, ()>(m)
        });
        assert_eq!(got.unwrap().unwrap()["x"], "ab");
    }
}
