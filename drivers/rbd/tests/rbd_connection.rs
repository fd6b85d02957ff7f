//! `connection_info` on the real cluster: Cinder's RBD shape, with the monitors and the
//! image as the cluster itself reports them (read back through the `ceph`/`rbd` CLIs).

mod common;

use common::{SIZE, ceph_conf, driver, rbd_cli, volume};
use kiln_core::{ErrorKind, VolumeDriver};
use kiln_driver_rbd::volume_image;
use serde_json::{Value, json};

/// `ceph mon dump` through the CLI, independent of the driver's own monitor command.
fn cli_monmap() -> Value {
    let out = std::process::Command::new("ceph")
        .arg("-c")
        .arg(ceph_conf())
        .args(["--connect-timeout", "15", "mon", "dump", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn connection_info_names_the_image_and_the_clusters_monitors_like_cinder() {
    let d = driver().await;
    let v = volume(SIZE);
    d.create_volume(&v).await.unwrap();
    let info = d.connection_info(&v).await.unwrap();
    assert_eq!(info.driver_volume_type, "rbd");
    let data = &info.data;
    let name = format!("rbd/{}", volume_image(&v.id));
    assert_eq!(data["name"], json!(name));
    // The name opens the very image: the CLI reports its size.
    let rbd_info: Value =
        serde_json::from_str(&rbd_cli(&["info", "--format", "json", &name])).unwrap();
    assert_eq!(rbd_info["size"], json!(SIZE));

    // Monitors: one per monmap entry, host and port of the address the monitor listens on
    // (this test cluster is messenger-v2 only, so that is its v2 address).
    let monmap = cli_monmap();
    let mons = monmap["mons"].as_array().unwrap();
    let hosts = data["hosts"].as_array().unwrap();
    let ports = data["ports"].as_array().unwrap();
    assert_eq!(hosts.len(), mons.len());
    assert_eq!(ports.len(), mons.len());
    for (i, mon) in mons.iter().enumerate() {
        let addrs: Vec<&str> = mon["public_addrs"]["addrvec"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["addr"].as_str().unwrap())
            .collect();
        let reported = format!(
            "{}:{}",
            hosts[i].as_str().unwrap(),
            ports[i].as_str().unwrap()
        );
        assert!(
            addrs.contains(&reported.as_str()),
            "{reported} not in {addrs:?}"
        );
    }
    // The conf of the test cluster says `mon host = v2:127.0.0.1:PORT`: the same monitor.
    let conf = std::fs::read_to_string(ceph_conf()).unwrap();
    let mon_host = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("mon host = "))
        .unwrap();
    assert_eq!(
        mon_host,
        format!(
            "v2:{}:{}",
            hosts[0].as_str().unwrap(),
            ports[0].as_str().unwrap()
        )
    );

    // The test cluster runs without cephx (auth client required = none).
    assert_eq!(data["cluster_name"], json!("ceph"));
    assert_eq!(data["auth_enabled"], json!(false));
    assert_eq!(data["auth_username"], Value::Null);
    assert_eq!(data["secret_type"], json!("ceph"));
    assert_eq!(data["secret_uuid"], Value::Null);
    assert_eq!(data["volume_id"], json!(v.id.to_string()));
    assert_eq!(data["discard"], json!(true));

    d.delete_volume(&v).await.unwrap();
}

#[tokio::test]
async fn connection_info_of_a_missing_image_is_not_found() {
    let d = driver().await;
    let never = volume(SIZE);
    let e = d.connection_info(&never).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // And once the image is deleted.
    let v = volume(SIZE);
    d.create_volume(&v).await.unwrap();
    d.connection_info(&v).await.unwrap();
    d.delete_volume(&v).await.unwrap();
    let e = d.connection_info(&v).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}
