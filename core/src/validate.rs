//! Validation of user input: sizes, labels and device names. Everything a user types passes
//! through here before it reaches the store; nothing a user types ever reaches a backend.

use crate::error::{Error, Result};

/// Largest volume kiln accepts: 64 TiB. Larger requests are almost certainly typos
/// (`10P` for `10G`) and would only fail later inside a backend.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;

/// Volumes are sized in whole MiB: every backend (LVM extents, qcow2 clusters, RBD objects)
/// handles that granularity, and Cinder's GiB is a multiple of it.
pub const SIZE_GRANULARITY: u64 = 1 << 20;

/// Parses a size such as `512M`, `1G`, `10GiB`, `1.5`-free integers only, binary units
/// (K/M/G/T, with optional `i` and `B`), or a plain byte count. Rounds up to whole MiB.
/// Zero, negative, fractional, unparsable or absurd (> 64 TiB) sizes are refused.
pub fn parse_size(input: &str) -> Result<u64> {
    let s = input.trim();
    let bad = |reason: &str| Error::invalid("size", format!("{input:?}: {reason}"));
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(bad(
            "expected a positive whole number followed by an optional unit (K, M, G, T)",
        ));
    }
    let (num, unit) = s.split_at(digits_end);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KI" | "KIB" => 10,
        "M" | "MB" | "MI" | "MIB" => 20,
        "G" | "GB" | "GI" | "GIB" => 30,
        "T" | "TB" | "TI" | "TIB" => 40,
        _ => return Err(bad("unknown unit (use K, M, G or T; units are binary)")),
    };
    let n: u64 = num.parse().map_err(|_| bad("number too large"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("larger than the 64 TiB limit"))?;
    check_size(bytes).map_err(|_| {
        bad(if n == 0 {
            "must be greater than zero"
        } else {
            "larger than the 64 TiB limit"
        })
    })
}

/// Checks a size in bytes (non-zero, at most [`MAX_VOLUME_BYTES`]) and rounds it up to whole MiB.
pub fn check_size(bytes: u64) -> Result<u64> {
    if bytes == 0 {
        return Err(Error::invalid("size", "must be greater than zero"));
    }
    if bytes > MAX_VOLUME_BYTES {
        return Err(Error::invalid(
            "size",
            format!("{bytes} bytes is larger than the 64 TiB limit"),
        ));
    }
    Ok(bytes.div_ceil(SIZE_GRANULARITY) * SIZE_GRANULARITY)
}

/// Longest label kiln stores (Cinder's name column is 255 characters).
pub const MAX_LABEL_LEN: usize = 255;

/// Checks a user label (volume or snapshot name). Labels never reach a path or a command
/// line, but they are printed in tables and logs and often pasted into shells, so kiln keeps
/// them to a conservative set: letters, digits, space and `._-+@:=,` — no path separators,
/// no shell metacharacters, no control characters, no leading `-` or `.`, no surrounding spaces.
pub fn validate_label(label: &str) -> Result<()> {
    let bad = |reason: &str| Error::invalid("name", format!("{label:?}: {reason}"));
    if label.is_empty() {
        return Err(bad("empty"));
    }
    if label.chars().count() > MAX_LABEL_LEN {
        return Err(bad("longer than 255 characters"));
    }
    if label.starts_with('-') || label.starts_with('.') {
        return Err(bad("must not start with '-' or '.'"));
    }
    if label.trim() != label {
        return Err(bad("must not start or end with white space"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_alphanumeric() || " ._-+@:=,".contains(*c)))
    {
        return Err(bad(&format!(
            "character {c:?} is not allowed (letters, digits, space and ._-+@:=, only)"
        )));
    }
    Ok(())
}

/// Checks a guest device name: `/dev/` followed by `vd`, `sd`, `xvd` or `hd` and 1-2 letters.
pub fn validate_device(device: &str) -> Result<()> {
    let ok = device
        .strip_prefix("/dev/")
        .and_then(|rest| {
            ["xvd", "vd", "sd", "hd"]
                .iter()
                .find_map(|p| rest.strip_prefix(p))
        })
        .is_some_and(|letters| {
            (1..=2).contains(&letters.len()) && letters.chars().all(|c| c.is_ascii_lowercase())
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "device",
            format!("{device:?}: expected /dev/vdX, /dev/sdX, /dev/xvdX or /dev/hdX"),
        ))
    }
}

/// Checks an attachment's Nova fields: boot index 0-255, bus and device type short words
/// of lower-case letters and digits.
pub fn validate_attachment(a: &crate::types::Attachment) -> Result<()> {
    if let Some(b) = a.boot_index
        && !(0..=255).contains(&b)
    {
        return Err(Error::invalid(
            "boot index",
            format!("{b}: must be 0 to 255"),
        ));
    }
    for (what, v) in [("disk bus", &a.disk_bus), ("device type", &a.device_type)] {
        if let Some(v) = v
            && (v.is_empty()
                || v.len() > 16
                || !v
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
        {
            return Err(Error::invalid(
                what,
                format!("{v:?}: expected a short word such as virtio, scsi, disk, cdrom"),
            ));
        }
    }
    if let Some(n) = &a.node
        && !crate::hypervisor::qmp::valid_node_name(n)
    {
        return Err(Error::invalid(
            "block node",
            format!(
                "{n:?}: a QEMU node name starts with a letter, has only letters, digits,                  '-', '.' and '_', and at most 31 characters"
            ),
        ));
    }
    Ok(())
}

/// Properties kiln writes itself on an image; a user may not set them.
pub const RESERVED_PROPERTIES: &[&str] = &["root_device_name", "bdm_v2", "block_device_mapping"];

/// Checks image properties (`KEY=VALUE`): keys of 1-255 characters from letters, digits
/// and `_.:-`, not starting with `-`, not reserved (`root_device_name`, `bdm_v2`,
/// `block_device_mapping`, `kiln_*`); values up to 64 KiB without control characters.
pub fn validate_properties(props: &std::collections::BTreeMap<String, String>) -> Result<()> {
    for (k, v) in props {
        let bad = |reason: &str| Error::invalid("property", format!("{k:?}: {reason}"));
        if k.is_empty() || k.len() > 255 {
            return Err(bad("keys are 1 to 255 characters"));
        }
        if k.starts_with('-') {
            return Err(bad("must not start with '-'"));
        }
        if let Some(c) = k
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_.:-".contains(*c)))
        {
            return Err(bad(&format!(
                "character {c:?} is not allowed in a key (letters, digits and _.:- only)"
            )));
        }
        if RESERVED_PROPERTIES.contains(&k.as_str()) || k.starts_with("kiln_") {
            return Err(bad("kiln sets this property itself"));
        }
        if v.len() > 64 << 10 {
            return Err(bad("value longer than 64 KiB"));
        }
        if v.chars().any(char::is_control) {
            return Err(bad("control characters are not allowed in a value"));
        }
    }
    Ok(())
}

/// Checks a host path kiln stores and later opens (an agent socket): absolute, no `..`
/// component, no control characters, at most 4096 bytes.
pub fn validate_host_path(what: &str, path: &str) -> Result<()> {
    let bad = |reason: &str| Error::invalid(what.to_string(), format!("{path:?}: {reason}"));
    if !path.starts_with('/') {
        return Err(bad("must be an absolute path"));
    }
    if path.len() > 4096 {
        return Err(bad("longer than 4096 bytes"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(bad("must not contain '..'"));
    }
    if path.chars().any(char::is_control) {
        return Err(bad("control characters are not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        // Rounded up to whole MiB.
        assert_eq!(parse_size("1000").unwrap(), 1 << 20);
        assert_eq!(parse_size("1025K").unwrap(), 2 << 20);
    }

    #[test]
    fn bad_sizes_are_refused() {
        for s in [
            "",
            "0",
            "0G",
            "-1G",
            "1.5G",
            "G",
            "10X",
            "65T",
            "99999999999999999999",
            "1 G B",
        ] {
            let e = parse_size(s).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{s:?} gave {e}");
        }
        assert!(parse_size("64T").is_ok());
    }

    #[test]
    fn labels() {
        for ok in [
            "db",
            "snapshot for web-1",
            "nightly_2026-11-22",
            "a.b+c@d:e=f,g",
            "données",
        ] {
            validate_label(ok).unwrap();
        }
        for bad in [
            "",
            "-rf",
            ".hidden",
            "../etc",
            "a/b",
            "$(reboot)",
            "a;b",
            "`x`",
            "a|b",
            " x",
            "x\n",
            "a\"b",
            "a'b",
            "a*b",
            "a\\b",
        ] {
            assert!(validate_label(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_label(&"x".repeat(256)).is_err());
    }

    #[test]
    fn devices() {
        for ok in ["/dev/vda", "/dev/vdb", "/dev/sdaa", "/dev/xvdc"] {
            validate_device(ok).unwrap();
        }
        for bad in [
            "vda",
            "/dev/vd",
            "/dev/vdabc",
            "/dev/../vda",
            "/dev/vd1",
            "/dev/nvme0n1",
            "/dev/vdA",
        ] {
            assert!(validate_device(bad).is_err(), "{bad:?} accepted");
        }
    }
}
