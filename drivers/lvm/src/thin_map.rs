//! Allocated extents of a thin LV, read from the pool's metadata with `thin_dump`, and the
//! ranges where two thin LVs of one pool differ, read with `thin_delta`.

use kiln_core::Extent;

/// Extracts attribute `name="…"` from one XML tag.
fn attr(tag: &str, name: &str) -> Option<u64> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let end = start + tag[start..].find('"')?;
    tag[start..end].parse().ok()
}

/// Parses `thin_dump --dev-id N` XML into byte extents clipped to `size`, sorted and merged.
/// Returns `None` when the dump has no `data_block_size` (not a dump we understand).
pub fn extents_from_dump(xml: &str, size: u64) -> Option<Vec<Extent>> {
    let block_sectors = xml
        .lines()
        .find(|l| l.trim_start().starts_with("<superblock"))
        .and_then(|l| attr(l, "data_block_size"))?;
    let block = block_sectors.checked_mul(512).filter(|b| *b > 0)?;
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    for line in xml.lines() {
        let l = line.trim_start();
        if l.starts_with("<range_mapping") {
            blocks.push((attr(l, "origin_begin")?, attr(l, "length")?));
        } else if l.starts_with("<single_mapping") {
            blocks.push((attr(l, "origin_block")?, 1));
        }
    }
    Some(blocks_to_extents(blocks, block, size))
}

/// `(first block, block count)` runs of `block`-byte blocks as byte extents clipped to
/// `size`, sorted and merged.
fn blocks_to_extents(mut blocks: Vec<(u64, u64)>, block: u64, size: u64) -> Vec<Extent> {
    blocks.sort_unstable();
    let mut out: Vec<Extent> = Vec::new();
    for (first, count) in blocks {
        let offset = first.saturating_mul(block);
        if offset >= size || count == 0 {
            continue;
        }
        let length = count.saturating_mul(block).min(size - offset);
        match out.last_mut() {
            Some(e) if e.offset + e.length >= offset => {
                e.length = e.length.max(offset + length - e.offset);
            }
            _ => out.push(Extent { offset, length }),
        }
    }
    out
}

/// Parses the XML of `thin_delta --snap1 LEFT --snap2 RIGHT` into the byte ranges, clipped
/// to `size`, sorted and merged, where the two thin devices may differ: every block range
/// that is not `<same>` (mapped in both to one data block). `<different>` (mapped in both,
/// to different data blocks), `<left_only>` and `<right_only>` (mapped, or discarded, on
/// one side only) all changed; blocks it does not mention are unmapped in both and read as
/// zeros in both. Blocks are the superblock's `data_block_size` sectors.
///
/// Accepts the default form (`<different begin=".." length=".."/>`) and the `--verbose` one
/// (`<different>` around `<range begin=".." length=".." …/>` elements), of thin-provisioning-
/// tools 0.x (C++) and 1.x (Rust). Anything else is refused rather than skipped — an element
/// not understood could be a change — as are a `<diff>` of other devices than `left` and
/// `right` and output cut short (no `</diff>`): the error says what was wrong.
pub fn changed_from_delta(
    xml: &str,
    left: u64,
    right: u64,
    size: u64,
) -> Result<Vec<Extent>, String> {
    const KINDS: [&str; 4] = ["same", "different", "left_only", "right_only"];
    let mut block = None;
    let mut in_diff = false;
    let mut diff_done = false;
    // The verbose form's open group: whether its ranges changed.
    let mut group: Option<&str> = None;
    let mut changed: Vec<(u64, u64)> = Vec::new();
    let mut pieces = xml.split('<');
    if !pieces.next().unwrap_or("").trim().is_empty() {
        return Err("text before the first element".into());
    }
    for piece in pieces {
        let (tag, text) = piece
            .split_once('>')
            .ok_or_else(|| format!("unterminated element <{}", piece.trim()))?;
        if !text.trim().is_empty() {
            return Err(format!("unexpected text {:?}", text.trim()));
        }
        let name = tag
            .split(|c: char| c.is_ascii_whitespace() || c == '/')
            .find(|s| !s.is_empty())
            .unwrap_or("");
        let closing = tag.starts_with('/');
        let empty = tag.ends_with('/');
        let range = |what: &str| -> Result<(u64, u64), String> {
            match (attr(tag, "begin"), attr(tag, "length")) {
                (Some(b), Some(l)) => Ok((b, l)),
                _ => Err(format!(
                    "{what} without a numeric begin and length: <{tag}>"
                )),
            }
        };
        match name {
            _ if tag.starts_with('?') || tag.starts_with('!') => {}
            "superblock" if closing => {}
            "superblock" => {
                let sectors = attr(tag, "data_block_size")
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("no data_block_size in <{tag}>"))?;
                block = Some(
                    sectors
                        .checked_mul(512)
                        .ok_or_else(|| format!("data_block_size {sectors} too large"))?,
                );
            }
            "diff" if closing => {
                if !in_diff || group.is_some() {
                    return Err("misplaced </diff>".into());
                }
                in_diff = false;
                diff_done = true;
            }
            "diff" => {
                if in_diff || diff_done || block.is_none() {
                    return Err("<diff> outside one <superblock>, or twice".into());
                }
                if attr(tag, "left") != Some(left) || attr(tag, "right") != Some(right) {
                    return Err(format!("<{tag}> is not the diff of {left} and {right}"));
                }
                in_diff = true;
            }
            _ if !in_diff => return Err(format!("<{tag}> outside <diff>")),
            k if KINDS.contains(&k) && closing => {
                if group != Some(k) {
                    return Err(format!("unmatched <{tag}>"));
                }
                group = None;
            }
            k if KINDS.contains(&k) && empty => {
                if group.is_some() {
                    return Err(format!("<{tag}> inside another group"));
                }
                let r = range(k)?;
                if k != "same" {
                    changed.push(r);
                }
            }
            k if KINDS.contains(&k) => {
                if group.is_some() {
                    return Err(format!("<{tag}> inside another group"));
                }
                group = Some(k);
            }
            "range" if empty => {
                let k = group.ok_or_else(|| format!("<{tag}> outside a group"))?;
                let r = range("range")?;
                if k != "same" {
                    changed.push(r);
                }
            }
            _ => return Err(format!("unexpected element <{tag}>")),
        }
    }
    let block = block.ok_or("no <superblock>")?;
    if !diff_done {
        return Err("no complete <diff> (output cut short?)".into());
    }
    Ok(blocks_to_extents(changed, block, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_to_extents() {
        let xml = r#"<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" nr_data_blocks="0">
  <device dev_id="2" mapped_blocks="4" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
    <single_mapping origin_block="2" data_block="9" time="0"/>
    <single_mapping origin_block="10" data_block="7" time="0"/>
    <single_mapping origin_block="1000" data_block="8" time="0"/>
  </device>
</superblock>"#;
        let e = extents_from_dump(xml, 11 * 65536 - 4096).unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0,
                    length: 3 * 65536
                },
                Extent {
                    offset: 10 * 65536,
                    length: 65536 - 4096
                },
            ]
        );
        let empty = r#"<superblock uuid="" data_block_size="128">
  <device dev_id="1" mapped_blocks="0">
  </device>
</superblock>"#;
        assert_eq!(extents_from_dump(empty, 1 << 20).unwrap(), vec![]);
        assert!(extents_from_dump("garbage", 10).is_none());
    }

    // Captured from thin_delta 0.9.0 (Debian 12) in the UML guest: a 64 MiB volume with
    // 0..8 MiB and 40..42 MiB written (snapshot 2), then 64 KiB rewritten at 1 MiB and at
    // 6400 KiB, 4 KiB at 50 MiB + 12 KiB, and 40..41 MiB discarded (snapshot 3).
    const DELTA: &str = r#"<superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="3">
    <same begin="0" length="16"/>
    <different begin="16" length="1"/>
    <same begin="17" length="83"/>
    <different begin="100" length="1"/>
    <same begin="101" length="27"/>
    <left_only begin="640" length="16"/>
    <same begin="656" length="16"/>
    <right_only begin="800" length="1"/>
  </diff>
</superblock>
"#;

    // The same diff with --verbose.
    const DELTA_VERBOSE: &str = r#"<superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="3">
    <same>
      <range begin="0" data_begin="0" length="16"/>
    </same>
    <different>
      <range begin="16" left_data_begin="16" right_data_begin="160" length="1"/>
    </different>
    <same>
      <range begin="17" data_begin="17" length="83"/>
    </same>
    <different>
      <range begin="100" left_data_begin="100" right_data_begin="161" length="1"/>
    </different>
    <same>
      <range begin="101" data_begin="101" length="27"/>
    </same>
    <left_only>
      <range begin="640" data_begin="128" length="16"/>
    </left_only>
    <same>
      <range begin="656" data_begin="144" length="16"/>
    </same>
    <right_only>
      <range begin="800" data_begin="162" length="1"/>
    </right_only>
  </diff>
</superblock>
"#;

    fn x(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn delta_to_changed_extents() {
        const K: u64 = 1024;
        let want = vec![
            x(1 << 20, 64 * K),
            x(6400 * K, 64 * K),
            x(40 << 20, 1 << 20),
            x(50 << 20, 64 * K),
        ];
        assert_eq!(changed_from_delta(DELTA, 2, 3, 64 << 20), Ok(want.clone()));
        assert_eq!(changed_from_delta(DELTA_VERBOSE, 2, 3, 64 << 20), Ok(want));
        // Clipped to the image: the discarded range is cut, the last one is past the end.
        assert_eq!(
            changed_from_delta(DELTA, 2, 3, (40 << 20) + 4096),
            Ok(vec![
                x(1 << 20, 64 * K),
                x(6400 * K, 64 * K),
                x(40 << 20, 4096)
            ])
        );
        // thin-provisioning-tools 1.x: more superblock attributes, an XML declaration, no
        // trailing newline; touching ranges of different kinds merge; nothing changed.
        let rust = r#"<?xml version="1.0"?>
<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="256" nr_data_blocks="6144">
  <diff left="7" right="9">
    <different begin="4" length="2"/>
    <right_only begin="6" length="1"/>
    <same begin="7" length="1"/>
    <left_only begin="8" length="1"/>
  </diff>
</superblock>"#;
        assert_eq!(
            changed_from_delta(rust, 7, 9, 1 << 30),
            Ok(vec![x(4 << 17, 3 << 17), x(8 << 17, 1 << 17)])
        );
        let none = "<superblock data_block_size=\"128\">\n  <diff left=\"1\" right=\"1\">\n  </diff>\n</superblock>\n";
        assert_eq!(changed_from_delta(none, 1, 1, 1 << 20), Ok(vec![]));
    }

    #[test]
    fn delta_output_not_understood_is_refused() {
        // Another pair of devices than asked for.
        assert!(changed_from_delta(DELTA, 3, 2, 1 << 30).is_err());
        // Cut short: no </diff>.
        let cut = &DELTA[..DELTA.find("</diff>").unwrap()];
        assert!(changed_from_delta(cut, 2, 3, 1 << 30).is_err());
        let cut = &DELTA[..DELTA.find("<right_only").unwrap() + 12];
        assert!(changed_from_delta(cut, 2, 3, 1 << 30).is_err());
        // An element that could be a change, an attribute missing, a bare range, no block
        // size, text, an error message, nothing.
        for (from, to) in [
            ("<same begin=\"17\"", "<moved begin=\"17\""),
            (
                "<different begin=\"16\" length=\"1\"/>",
                "<different begin=\"16\"/>",
            ),
            (
                "<different begin=\"16\" length=\"1\"/>",
                "<range begin=\"16\" length=\"1\"/>",
            ),
            (" data_block_size=\"128\"", ""),
            ("<same begin=\"0\" length=\"16\"/>", "changed: 0+16"),
            ("<left_only begin=\"640\"", "<left_only begin=\"-1\""),
        ] {
            let bad = DELTA.replacen(from, to, 1);
            assert_ne!(bad, DELTA);
            assert!(changed_from_delta(&bad, 2, 3, 1 << 30).is_err(), "{bad}");
        }
        let unclosed = DELTA_VERBOSE.replacen("</left_only>", "", 1);
        assert!(changed_from_delta(&unclosed, 2, 3, 1 << 30).is_err());
        for bad in [
            "",
            "Unable to find mapping tree for snap2 (99)",
            "<superblock",
        ] {
            assert!(changed_from_delta(bad, 2, 3, 1 << 30).is_err(), "{bad}");
        }
    }
}
