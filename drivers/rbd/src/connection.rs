//! What a hypervisor needs to attach a volume's image: Cinder's RBD `initialize_connection`
//! shape (`driver_volume_type: "rbd"`; `name`, `hosts`, `ports`, `cluster_name`,
//! `auth_enabled`, `auth_username`, `secret_type`, `secret_uuid`, `volume_id`, `discard`),
//! so a Nova/os-brick-style consumer reads it unchanged.

use std::sync::Arc;

use kiln_core::{ConnectionInfo, Error, Result, Volume};
use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::image::Image;
use crate::names::volume_image;

/// Builds the connection info of `v`'s image: `NotFound` when the image does not exist.
/// The monitors come from the cluster's current monmap (`mon dump`, as Cinder's
/// `_get_mon_addrs` does), not from ceph.conf, so a monitor added or moved since the
/// conf was written is reported as it is now.
pub(crate) fn connection_info(c: &Arc<Cluster>, v: &Volume) -> Result<ConnectionInfo> {
    let image = volume_image(&v.id);
    // Read-only: no watch and no exclusive lock, so asking never disturbs a writer.
    match Image::open_read_only(c, &image, None) {
        Ok(_) => {}
        Err(e) if e.is_not_found() => return Err(Error::not_found("volume", v.id.to_string())),
        Err(e) => return Err(e.into()),
    }
    let dump = c.mon_command(&json!({"prefix": "mon dump", "format": "json"}))?;
    let (hosts, ports) = mon_addrs(&dump)?;
    // `rados_create` (see cluster.rs) always joins the cluster named "ceph" (only
    // `rados_create2` takes another name, and kiln has no setting for one); the name is not
    // a configuration option librados could be asked for.
    let cluster_name = "ceph";
    // The client authenticates (and the hypervisor needs the user's secret) unless the
    // cluster's client side is configured with `auth_client_required = none`.
    let auth_enabled = c
        .conf_get("auth_client_required")?
        .split([',', ' ', ';', '\t'])
        .any(|m| m == "cephx");
    let mut data = serde_json::Map::new();
    data.insert("name".into(), json!(format!("{}/{image}", c.pool())));
    data.insert("hosts".into(), json!(hosts));
    data.insert("ports".into(), json!(ports));
    data.insert("cluster_name".into(), json!(cluster_name));
    data.insert("auth_enabled".into(), json!(auth_enabled));
    data.insert(
        "auth_username".into(),
        if auth_enabled {
            json!(c.client_name())
        } else {
            Value::Null
        },
    );
    data.insert("secret_type".into(), json!("ceph"));
    // Cinder's `rbd_secret_uuid` names a libvirt secret on the compute hosts; kiln manages
    // no libvirt secrets, so there is none to name (Cinder sends null when unset too).
    data.insert("secret_uuid".into(), Value::Null);
    data.insert("volume_id".into(), json!(v.id.to_string()));
    data.insert("discard".into(), json!(true));
    Ok(ConnectionInfo {
        driver_volume_type: "rbd".into(),
        data,
    })
}

/// Parses `mon dump --format json` into the monitors' hosts and ports (strings, as Cinder
/// sends them), in monmap order. A consumer given only host and port (QEMU joins them into
/// `mon_host`) assumes the legacy v1 protocol unless the port is 3300, so each monitor's
/// v1 address is preferred; a monitor that listens on messenger v2 only is reported with
/// its v2 address (a client then needs `ms_mode`/`v2:` settings of its own — Cinder's
/// legacy `addr` field would name the same port). Monitors without an address vector
/// (pre-Nautilus) give their legacy `addr` (`ip:port/nonce`, IPv6 as `[ip]:port/nonce`).
fn mon_addrs(dump: &[u8]) -> Result<(Vec<String>, Vec<String>)> {
    let bad = |why: String| Error::backend("mon dump", format!("unexpected monmap: {why}"));
    let map: Value = serde_json::from_slice(dump).map_err(|e| bad(e.to_string()))?;
    let mons = map
        .get("mons")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no \"mons\" list".into()))?;
    let mut hosts = Vec::with_capacity(mons.len());
    let mut ports = Vec::with_capacity(mons.len());
    for mon in mons {
        let addr =
            mon_addr(mon).ok_or_else(|| bad(format!("monitor without an address: {mon}")))?;
        let (host, port) = split_addr(addr).ok_or_else(|| bad(format!("address {addr:?}")))?;
        hosts.push(host);
        ports.push(port);
    }
    if hosts.is_empty() {
        return Err(bad("no monitors".into()));
    }
    Ok((hosts, ports))
}

/// One monitor's address: v1 from its address vector, else the vector's first entry, else
/// the legacy `addr` field.
fn mon_addr(mon: &Value) -> Option<&str> {
    let vec = mon
        .get("public_addrs")
        .and_then(|a| a.get("addrvec"))
        .and_then(Value::as_array);
    if let Some(vec) = vec {
        let of_type = |t: &str| {
            vec.iter()
                .find(|a| a.get("type").and_then(Value::as_str) == Some(t))
                .and_then(|a| a.get("addr"))
                .and_then(Value::as_str)
        };
        if let Some(a) = of_type("v1").or_else(|| of_type("v2")) {
            return Some(a);
        }
    }
    mon.get("addr").and_then(Value::as_str)
}

/// `"10.0.0.1:6789/0"` → `("10.0.0.1", "6789")`; `"[::1]:6789/0"` → `("::1", "6789")`.
fn split_addr(addr: &str) -> Option<(String, String)> {
    let host_port = addr.rsplit_once('/').map_or(addr, |(hp, _nonce)| hp);
    let (host, port) = host_port.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((host.to_string(), port.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_addresses_are_split_like_cinders_get_mon_addrs() {
        assert_eq!(
            split_addr("10.0.0.1:6789/0"),
            Some(("10.0.0.1".into(), "6789".into()))
        );
        assert_eq!(
            split_addr("[fd00::1]:6789/123"),
            Some(("fd00::1".into(), "6789".into()))
        );
        assert_eq!(split_addr("10.0.0.1"), None);
        assert_eq!(split_addr(":6789/0"), None);
        // a: v1 and v2 (v1 preferred); b: v2 only; c: pre-Nautilus, legacy addr only.
        let dump = br#"{"epoch":2,"mons":[
            {"rank":0,"name":"a","public_addrs":{"addrvec":[
                {"type":"v2","addr":"10.0.0.1:3300","nonce":0},
                {"type":"v1","addr":"10.0.0.1:6789","nonce":0}]},"addr":"10.0.0.1:6789/0"},
            {"rank":1,"name":"b","public_addrs":{"addrvec":[
                {"type":"v2","addr":"127.0.0.1:57707","nonce":0}]},"addr":"127.0.0.1:57707/0"},
            {"rank":2,"name":"c","addr":"[::1]:6790/0"}]}"#;
        assert_eq!(
            mon_addrs(dump).unwrap(),
            (
                vec!["10.0.0.1".to_string(), "127.0.0.1".into(), "::1".into()],
                vec!["6789".to_string(), "57707".into(), "6790".into()]
            )
        );
        let e = mon_addrs(br#"{"mons":[]}"#).unwrap_err();
        assert_eq!(e.kind(), kiln_core::ErrorKind::Backend);
    }
}
