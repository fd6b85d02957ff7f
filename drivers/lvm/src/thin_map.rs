//! Allocated extents of a thin LV, read from the pool's metadata with `thin_dump`.

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
    blocks.sort_unstable();
    let mut out: Vec<Extent> = Vec::new();
    for (first, count) in blocks {
        let offset = first.saturating_mul(block);
        if offset >= size {
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
    Some(out)
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
}
