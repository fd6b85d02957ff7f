//! Retention of backups with Benji's policy syntax: `latest3,hours24,days7,weeks4,months12`
//! (also `years`). The newest `latestN` are kept; every other backup falls in the first
//! category whose count of calendar periods between it and now (hours, days, weeks from
//! Monday, months, years; UTC) is at most N, and of each such period the oldest backup is
//! kept; the rest, and backups older than every category, go. On top of Benji: a backup that
//! a kept incremental builds on is kept too, so a prune never breaks a chain.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};

use crate::error::{Error, Result};
use crate::types::{Backup, BackupId};

/// The time categories, in the order a backup is tried against them.
const CATEGORIES: [&str; 5] = ["hours", "days", "weeks", "months", "years"];

/// A parsed `--keep` specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    latest: Option<u32>,
    counts: BTreeMap<&'static str, u32>,
}

/// Why a backup is kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Kept {
    /// The backup.
    pub id: BackupId,
    /// `latest`, `days 3` (the oldest backup of the day 3 days ago), or `base of <id>`.
    pub reason: String,
}

/// What a prune keeps and removes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// Kept, newest first.
    pub keep: Vec<Kept>,
    /// Removed, newest first (the order they can be deleted in: children before parents).
    pub remove: Vec<BackupId>,
}

impl Policy {
    /// Parses `latest3,hours24,...`: each element a category and a positive count, each
    /// category at most once. Anything else is one error naming the element.
    pub fn parse(spec: &str) -> Result<Policy> {
        let bad = |why: String| Error::invalid("--keep", format!("{spec:?}: {why}"));
        let mut p = Policy {
            latest: None,
            counts: BTreeMap::new(),
        };
        for token in spec.split(',') {
            let split = token
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(token.len());
            let (cat, num) = token.split_at(split);
            let n: u32 = num.parse().map_err(|_| {
                bad(format!(
                    "{token:?} is not a category and a count, e.g. days7"
                ))
            })?;
            if n == 0 {
                return Err(bad(format!("{token:?}: the count must be at least 1")));
            }
            let seen = if cat == "latest" {
                p.latest.replace(n).is_some()
            } else if let Some(c) = CATEGORIES.iter().find(|c| **c == cat) {
                p.counts.insert(c, n).is_some()
            } else {
                return Err(bad(format!(
                    "unknown category {cat:?} (latest, hours, days, weeks, months, years)"
                )));
            };
            if seen {
                return Err(bad(format!("{cat} is given twice")));
            }
        }
        Ok(p)
    }

    /// Which of `backups` (one volume's) to keep and remove at time `now`.
    pub fn plan(&self, backups: &[Backup], now: DateTime<Utc>) -> Plan {
        let mut order: Vec<&Backup> = backups.iter().collect();
        order.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let mut reason: BTreeMap<BackupId, String> = BTreeMap::new();
        let latest = self.latest.unwrap_or(0) as usize;
        for b in order.iter().take(latest) {
            reason.insert(b.id, "latest".into());
        }
        // Period -> the oldest backup in it (the iteration runs newest to oldest).
        let mut oldest: BTreeMap<(&str, i64), BackupId> = BTreeMap::new();
        for b in order.iter().skip(latest) {
            for cat in CATEGORIES {
                let Some(n) = self.counts.get(cat) else {
                    continue;
                };
                let ago = periods_between(cat, b.created_at, now);
                if (0..=i64::from(*n)).contains(&ago) {
                    oldest.insert((cat, ago), b.id);
                    break;
                }
            }
        }
        for ((cat, ago), id) in oldest {
            reason.insert(id, format!("{cat} {ago}"));
        }
        // A kept incremental needs every backup it builds on.
        let parent: BTreeMap<BackupId, Option<BackupId>> =
            backups.iter().map(|b| (b.id, b.parent_id)).collect();
        let needed: Vec<BackupId> = reason.keys().copied().collect();
        for id in needed {
            let mut seen = BTreeSet::new();
            let mut cur = parent.get(&id).copied().flatten();
            while let Some(p) = cur {
                if !seen.insert(p) {
                    break;
                }
                reason.entry(p).or_insert_with(|| format!("base of {id}"));
                cur = parent.get(&p).copied().flatten();
            }
        }
        let mut plan = Plan {
            keep: Vec::new(),
            remove: Vec::new(),
        };
        for b in order {
            match reason.get(&b.id) {
                Some(r) => plan.keep.push(Kept {
                    id: b.id,
                    reason: r.clone(),
                }),
                None => plan.remove.push(b.id),
            }
        }
        plan
    }
}

/// Whole calendar periods of `cat` from `t` to `now` (UTC), as Benji counts them: both
/// rounded down to the start of their hour, day, week (Monday), month or year.
fn periods_between(cat: &str, t: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let day = |d: DateTime<Utc>| d.date_naive();
    match cat {
        "hours" => {
            let h = |d: DateTime<Utc>| {
                d.with_minute(0)
                    .and_then(|d| d.with_second(0))
                    .and_then(|d| d.with_nanosecond(0))
                    .unwrap_or(d)
            };
            (h(now) - h(t)).num_hours()
        }
        "days" => (day(now) - day(t)).num_days(),
        "weeks" => {
            let monday = |d: DateTime<Utc>| {
                day(d) - Duration::days(i64::from(d.weekday().num_days_from_monday()))
            };
            (monday(now) - monday(t)).num_days() / 7
        }
        "months" => {
            i64::from(now.year() - t.year()) * 12 + i64::from(now.month()) - i64::from(t.month())
        }
        _ => i64::from(now.year() - t.year()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{BackupStatus, SnapshotId, VolumeId};

    fn backup(created_at: DateTime<Utc>, parent: Option<BackupId>) -> Backup {
        Backup {
            id: BackupId::new(),
            volume_id: VolumeId(uuid::Uuid::nil()),
            snapshot_id: SnapshotId::new(),
            parent_id: parent,
            name: None,
            target: "dir:/b".into(),
            status: BackupStatus::Available,
            status_reason: None,
            size_bytes: 1,
            stored_bytes: 1,
            created_at,
            updated_at: created_at,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn specs_parse_and_bad_ones_name_the_element() {
        let p = Policy::parse("latest3,hours24,days7,weeks4,months12,years2").unwrap();
        assert_eq!(p.latest, Some(3));
        assert_eq!(p.counts.len(), 5);
        for (bad, says) in [
            ("", "not a category"),
            ("latest0", "at least 1"),
            ("days", "not a category"),
            ("fortnights2", "unknown category"),
            ("days7,days3", "twice"),
            ("latest3,,days2", "not a category"),
            ("days-1", "unknown category"),
            ("days99999999999", "not a category"),
        ] {
            let e = Policy::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_latest_and_the_oldest_of_each_period_are_kept() {
        let now = at("2026-11-27T12:30:00Z");
        // Three today (10:00, 11:00, 11:30), two yesterday, one last week, one a year ago.
        let bs = [
            "2026-11-27T11:30:00Z",
            "2026-11-27T11:00:00Z",
            "2026-11-27T10:00:00Z",
            "2026-11-26T20:00:00Z",
            "2026-11-26T08:00:00Z",
            "2026-11-18T08:00:00Z",
            "2025-11-18T08:00:00Z",
        ]
        .map(|t| backup(at(t), None));
        let p = Policy::parse("latest1,days7").unwrap().plan(&bs, now);
        let kept: Vec<BackupId> = p.keep.iter().map(|k| k.id).collect();
        // latest: 11:30; day 0: 10:00 (its oldest); day 1: 08:00; 9 days and a year ago: gone.
        assert_eq!(kept, vec![bs[0].id, bs[2].id, bs[4].id]);
        assert_eq!(p.keep[1].reason, "days 0");
        assert_eq!(p.remove, vec![bs[1].id, bs[3].id, bs[5].id, bs[6].id]);
        // weeks counts from Monday: 2026-11-18 (Wed) is one week before 2026-11-27 (Fri).
        let p = Policy::parse("weeks1").unwrap().plan(&bs[5..6], now);
        assert_eq!(p.keep[0].reason, "weeks 1");
    }

    #[test]
    fn a_kept_incremental_keeps_every_backup_it_builds_on() {
        let now = at("2026-11-27T12:00:00Z");
        let full = backup(at("2026-10-01T00:00:00Z"), None);
        let inc1 = backup(at("2026-10-02T00:00:00Z"), Some(full.id));
        let inc2 = backup(at("2026-11-27T11:00:00Z"), Some(inc1.id));
        let other = backup(at("2026-09-01T00:00:00Z"), None);
        let p = Policy::parse("latest1").unwrap().plan(
            &[full.clone(), inc1.clone(), inc2.clone(), other.clone()],
            now,
        );
        let kept: Vec<(BackupId, &str)> =
            p.keep.iter().map(|k| (k.id, k.reason.as_str())).collect();
        let base = format!("base of {}", inc2.id);
        assert_eq!(
            kept,
            vec![
                (inc2.id, "latest"),
                (inc1.id, base.as_str()),
                (full.id, base.as_str())
            ]
        );
        assert_eq!(p.remove, vec![other.id]);
    }
}
