//! Rendering of command results: tables for people, one JSON document for scripts.

use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use kiln_core::service::VolumeNode;
use kiln_core::store::HistoryEntry;
use kiln_core::{BackendInfo, CheckReport};
use kiln_core::{BackendStats, Snapshot, Volume};
use serde::Serialize;

use crate::cli::Format;

/// Prints `value` as JSON, or the table `table` builds.
pub fn emit<T: Serialize + ?Sized>(format: Format, value: &T, table: impl FnOnce() -> String) {
    match format {
        Format::Json => match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            // Serializing our own plain types cannot fail; say so loudly if it ever does.
            Err(e) => eprintln!("kiln: error: cannot render JSON: {e}"),
        },
        Format::Table => println!("{}", table()),
    }
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

/// Human size with binary units, e.g. `1.0 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn status_cell(status: &str, reason: &Option<String>) -> String {
    match reason {
        Some(r) => format!("{status} ({r})"),
        None => status.to_string(),
    }
}

/// Table of volumes.
pub fn volumes_table(vs: &[Volume]) -> String {
    let mut t = table(&[
        "id",
        "name",
        "status",
        "size",
        "backend",
        "attached to",
        "source snapshot",
    ]);
    for v in vs {
        let att = v
            .attachments
            .iter()
            .map(|a| format!("{} {}", a.instance_id, a.device))
            .collect::<Vec<_>>()
            .join(", ");
        t.add_row(vec![
            v.id.to_string(),
            opt(&v.name),
            status_cell(v.status.as_str(), &v.status_reason),
            human(v.size_bytes),
            v.backend.clone(),
            att,
            v.source_snapshot_id
                .map(|s| s.to_string())
                .unwrap_or_default(),
        ]);
    }
    t.to_string()
}

/// Key/value table of one volume.
pub fn volume_table(v: &Volume) -> String {
    let mut t = table(&["field", "value"]);
    let rows: Vec<(&str, String)> = vec![
        ("id", v.id.to_string()),
        ("name", opt(&v.name)),
        ("status", v.status.to_string()),
        ("status_reason", opt(&v.status_reason)),
        (
            "size",
            format!("{} ({} bytes)", human(v.size_bytes), v.size_bytes),
        ),
        ("backend", v.backend.clone()),
        ("provider_location", opt(&v.provider_location)),
        (
            "source_snapshot_id",
            v.source_snapshot_id
                .map(|s| s.to_string())
                .unwrap_or_default(),
        ),
        (
            "attachments",
            v.attachments
                .iter()
                .map(|a| format!("{} at {}", a.instance_id, a.device))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("created_at", v.created_at.to_rfc3339()),
        ("updated_at", v.updated_at.to_rfc3339()),
    ];
    for (k, val) in rows {
        t.add_row(vec![k.to_string(), val]);
    }
    t.to_string()
}

/// Table of snapshots.
pub fn snapshots_table(ss: &[Snapshot]) -> String {
    let mut t = table(&[
        "id", "name", "status", "size", "volume", "forced", "created",
    ]);
    for s in ss {
        t.add_row(vec![
            s.id.to_string(),
            opt(&s.name),
            status_cell(s.status.as_str(), &s.status_reason),
            human(s.size_bytes),
            s.volume_id.to_string(),
            if s.forced {
                "yes".into()
            } else {
                String::new()
            },
            s.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    t.to_string()
}

/// Key/value table of one snapshot.
pub fn snapshot_table(s: &Snapshot) -> String {
    let mut t = table(&["field", "value"]);
    let rows: Vec<(&str, String)> = vec![
        ("id", s.id.to_string()),
        ("name", opt(&s.name)),
        ("status", s.status.to_string()),
        ("status_reason", opt(&s.status_reason)),
        (
            "size",
            format!("{} ({} bytes)", human(s.size_bytes), s.size_bytes),
        ),
        ("volume_id", s.volume_id.to_string()),
        ("backend", s.backend.clone()),
        ("provider_location", opt(&s.provider_location)),
        ("forced", s.forced.to_string()),
        ("created_at", s.created_at.to_rfc3339()),
    ];
    for (k, val) in rows {
        t.add_row(vec![k.to_string(), val]);
    }
    t.to_string()
}

/// A backend with its stats (or why they could not be read), as printed by `backend list`.
#[derive(Debug, Serialize)]
pub struct BackendRow {
    /// Name, driver and capabilities.
    #[serde(flatten)]
    pub info: BackendInfo,
    /// Capacity and usage, when the backend answered.
    pub stats: Option<BackendStats>,
    /// Why stats are missing.
    pub stats_error: Option<String>,
}

/// Table of backends.
pub fn backends_table(rows: &[BackendRow]) -> String {
    let mut t = table(&[
        "name",
        "driver",
        "default",
        "capabilities",
        "snapshot method",
        "capacity",
    ]);
    for r in rows {
        let c = &r.info.capabilities;
        let caps = [
            (c.thin, "thin"),
            (c.online_snapshot, "online"),
            (c.revert_any, "revert-any"),
            (c.clone, "clone"),
            (c.clone_cow, "clone-cow"),
            (c.diff, "diff"),
            (c.group_snapshot, "group"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(" ");
        let capacity = match (&r.stats, &r.stats_error) {
            _ if r.info.unavailable.is_some() => format!(
                "unavailable: {}",
                r.info.unavailable.clone().unwrap_or_default()
            ),
            (Some(s), _) => match (s.free_bytes, s.total_bytes) {
                (Some(f), Some(tot)) => format!("{} free of {}", human(f), human(tot)),
                _ => "unknown".into(),
            },
            (None, Some(e)) => format!("unavailable: {e}"),
            (None, None) => "unknown".into(),
        };
        t.add_row(vec![
            r.info.name.clone(),
            r.info.driver.clone(),
            if r.info.default {
                "yes".into()
            } else {
                String::new()
            },
            caps,
            c.snapshot_method.clone(),
            capacity,
        ]);
    }
    t.to_string()
}

/// Indented lineage tree.
pub fn tree_text(node: &VolumeNode) -> String {
    let mut out = String::new();
    tree_lines(node, "", &mut out);
    out.trim_end().to_string()
}

fn tree_lines(node: &VolumeNode, indent: &str, out: &mut String) {
    let v = &node.volume;
    let label = v
        .name
        .as_deref()
        .map(|n| format!(" \"{n}\""))
        .unwrap_or_default();
    out.push_str(&format!(
        "{indent}volume {}{label} [{}] {}\n",
        v.id,
        v.status,
        human(v.size_bytes)
    ));
    for (i, sn) in node.snapshots.iter().enumerate() {
        let last = i + 1 == node.snapshots.len();
        let s = &sn.snapshot;
        let label = s
            .name
            .as_deref()
            .map(|n| format!(" \"{n}\""))
            .unwrap_or_default();
        out.push_str(&format!(
            "{indent}{} snapshot {}{label} [{}] {}\n",
            if last { "└─" } else { "├─" },
            s.id,
            s.status,
            s.created_at.format("%Y-%m-%d %H:%M:%S")
        ));
        let child_indent = format!("{indent}{}   ", if last { " " } else { "│" });
        for c in &sn.clones {
            tree_lines(c, &child_indent, out);
        }
    }
}

/// Table of status-history entries.
pub fn history_table(h: &[HistoryEntry]) -> String {
    let mut t = table(&["at", "from", "to", "reason"]);
    for e in h {
        t.add_row(vec![
            e.at.to_rfc3339(),
            e.from_status.clone(),
            e.to_status.clone(),
            e.reason.clone(),
        ]);
    }
    t.to_string()
}

/// What a consistency check found and repaired.
pub fn check_text(r: &CheckReport) -> String {
    let mut s = String::new();
    for f in &r.findings {
        s += &format!("found: {f}\n");
    }
    for f in &r.repaired {
        s += &format!("repaired: {f}\n");
    }
    s += if r.consistent {
        "consistent"
    } else {
        "NOT consistent"
    };
    s
}

/// The result of `kiln bench snapshot`.
pub fn bench_text(r: &kiln_core::bench::SnapshotBench) -> String {
    let line = |name: &str, p: &kiln_core::bench::Percentiles| {
        format!(
            "{name:<28} median {:>9.3} ms   p90 {:>9.3} ms   max {:>9.3} ms\n",
            p.median, p.p90, p.max
        )
    };
    let mut s = format!(
        "backend {} — volume {} — {} iterations\nprimitive: {}\n",
        r.backend,
        human(r.size_bytes),
        r.iterations,
        r.primitive
    );
    s += &line("kiln snapshot create", &r.create_ms);
    s += &line("primitive create", &r.primitive_ms);
    s += &line("kiln snapshot delete", &r.delete_ms);
    s += &line("primitive delete", &r.primitive_delete_ms);
    for c in &r.comparisons {
        s += &line(&format!("{} create", c.name), &c.create_ms);
        s += &line(&format!("{} delete", c.name), &c.delete_ms);
    }
    s += &format!(
        "create ratio (kiln/primitive median): {:.2}\ndelete ratio: {:.2}",
        r.create_ratio, r.delete_ratio
    );
    s
}

/// `kiln bench instance` as text.
pub fn bench_instance_text(r: &kiln_core::bench::instance::InstanceBench) -> String {
    let row = |name: &str, p: &kiln_core::bench::Percentiles| {
        vec![
            name.to_string(),
            format!("{:.3}", p.median),
            format!("{:.3}", p.p90),
            format!("{:.3}", p.max),
        ]
    };
    let mut t = table(&["ms", "median", "p90", "max"]);
    t.add_row(row("window (guest frozen)", &r.window_ms));
    if let Some(f) = &r.freeze_rpc_ms {
        t.add_row(row("  of which freeze request", f));
    }
    t.add_row(row("  of which members, concurrently", &r.members_ms));
    if let Some(f) = &r.thaw_rpc_ms {
        t.add_row(row("  of which thaw request", f));
    }
    t.add_row(row("whole instance snapshot", &r.whole_ms));
    t.add_row(row("one volume's snapshot create", &r.single_create_ms));
    t.add_row(row(
        "sum of one-by-one creates (Nova)",
        &r.sequential_sum_ms,
    ));
    let after_freeze = r
        .window_after_freeze_ratio
        .map(|x| format!("   (window - freeze request) / one create: {x:.2}"))
        .unwrap_or_default();
    format!(
        "bench instance: {} volume(s) of {} on backend {}, {} iteration(s); window = {}\n{t}\n\
         window / one create: {:.2}{after_freeze}   one-by-one sum / window: {:.2}",
        r.volumes,
        human(r.size_bytes),
        r.backend,
        r.iterations,
        r.window,
        r.window_ratio,
        r.speedup_over_sequential
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1 << 30), "1.0 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }
}
