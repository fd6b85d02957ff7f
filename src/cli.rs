//! Command-line grammar (clap). Every command prints a table by default and one JSON
//! document with `--format json`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// kiln — Cinder-style volume snapshots over files, LVM and Ceph RBD.
///
/// Volumes and snapshots are tracked in an SQLite store in the data directory, or in
/// PostgreSQL shared by several kiln nodes (`[store] url`, or KILN_STORE_URL); every backend
/// object is named from a UUID (volume-<uuid>, snapshot-<uuid>). With no config file kiln
/// uses one file backend named `default` in <data-dir>/volumes. KILN_NODE names this node
/// for backends local to one node (default: the host name).
///
/// Exit codes: 0 ok, 1 internal error, 2 usage error, 3 not found, 4 invalid input,
/// 5 wrong state, 6 busy (dependents exist), 7 unsupported, 8 backend failure, 9 store failure,
/// 10 quota exceeded (API only), 75 fenced (on a shared PostgreSQL store: this process lost
/// its heartbeat and stopped so that other nodes may take its operations over).
#[derive(Debug, Parser)]
#[command(name = "kiln", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Data directory (store, locks, default volumes) [default: ~/.local/share/kiln]
    #[arg(long, global = true, env = "KILN_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Configuration file (TOML; see etc/kiln.toml). Without one, the embedded default.
    #[arg(long, global = true, env = "KILN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// Log format on stderr (level from KILN_LOG, e.g. KILN_LOG=debug; default warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Output format of a command's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable table.
    Table,
    /// One JSON document on stdout.
    Json,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Plain text lines.
    Text,
    /// One JSON object per line (structured logs).
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Configured backends: driver, capabilities, capacity.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Create, list, show, delete, attach and detach volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list, show, delete, revert, export snapshots; show lineage.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Instances (servers): their guest agent, and snapshots of all their volumes at once.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Images: metadata-only records of instance snapshots (Nova's block_device_mapping);
    /// list, show, delete, restore (boot) them.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Back volumes up to a target outside their backend (full or incremental, one stream
    /// format for every backend), verify, restore onto any backend, delete.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Measure kiln against the backend's raw primitive.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The store kiln keeps its state in (SQLite in the data directory, or PostgreSQL with
    /// `[store] url` / KILN_STORE_URL).
    #[command(subcommand)]
    Store(StoreCmd),
    /// Serve the Cinder v3 REST API (volumes, snapshots, metadata, actions, limits) on one
    /// address until SIGTERM or Ctrl-C, for the real `openstack`/`cinder` clients and
    /// openstacksdk. Configured in the config file's [api] section; without one: noauth on
    /// 127.0.0.1:8776 (noauth refuses any non-loopback address). The CLI keeps working on
    /// the same data directory meanwhile.
    Serve(ServeArgs),
    /// Walk through kiln's main job on the configured default backend and print each step:
    /// create a volume, write data, snapshot, overwrite, snapshot it attached while a guest
    /// writes (qcow2: through a qemu-storage-daemon standing in for the hypervisor), clone,
    /// revert, export, clean up.
    Demo(DemoArgs),
    /// Internal: the freeze guard kiln starts for an instance snapshot (holds the guest
    /// agent, thaws on request, when kiln dies, or at the deadline). Not for direct use.
    #[command(hide = true)]
    AgentGuard(AgentGuardArgs),
}

/// `kiln store ...`
#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Create or upgrade the store's schema. PostgreSQL is never upgraded implicitly
    /// (nodes of different versions may share it): run this once before the first start
    /// and after each upgrade of kiln; it is safe to repeat and to run from several nodes
    /// at once. SQLite upgrades itself when opened; for it this only opens the file.
    Migrate,
}

/// `kiln serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: [api] listen, else 127.0.0.1:8776].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// At shutdown, seconds to wait for requests in flight, and then as long again for
    /// background operations (clones, reverts, deletes); one still running afterwards
    /// stays journaled and the next start resolves it.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub shutdown_timeout: u64,
}

/// `kiln agent-guard` (internal).
#[derive(Debug, Args)]
pub struct AgentGuardArgs {
    /// Agent socket.
    #[arg(long)]
    pub agent: String,
    /// Mountpoint to freeze (repeatable; none = all).
    #[arg(long)]
    pub mountpoint: Vec<String>,
    /// Freeze deadline (ms).
    #[arg(long)]
    pub deadline_ms: u64,
    /// Longest wait for one agent answer (ms).
    #[arg(long)]
    pub timeout_ms: u64,
}

/// `kiln backup ...`
#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Back up a volume: the data of one of its snapshots as Ceph's diff stream, in chunks
    /// with a manifest of SHA-256 sums, written so that a backup is whole or absent. Without
    /// --snapshot a snapshot is taken first (forced when the volume is in use) and kept as
    /// the base of the next incremental.
    Create {
        /// Volume id (UUID).
        volume_id: String,
        /// Back up this snapshot of the volume instead of taking one.
        #[arg(long, value_name = "SNAPSHOT")]
        snapshot: Option<String>,
        /// Where: dir:PATH (an existing writable directory), or rbd:POOL (a pool of the
        /// cluster of the configured RBD backend: one image per volume, a snapshot per
        /// backup, as Cinder's Ceph backup driver keeps them).
        #[arg(long, value_name = "TARGET")]
        target: String,
        /// Only what changed since the latest backup of the volume on the same target
        /// (read from the backend's change tracking where it has one).
        #[arg(long)]
        incremental: bool,
        /// A label.
        #[arg(long, value_name = "LABEL")]
        name: Option<String>,
    },
    /// List backups (of one volume), oldest first.
    List {
        /// Only backups of this volume.
        #[arg(long, value_name = "VOLUME")]
        volume: Option<String>,
    },
    /// Show a backup.
    Show {
        /// Backup id (UUID).
        id: String,
    },
    /// Delete a backup from its target; refused while an incremental builds on it.
    Delete {
        /// Backup id (UUID).
        id: String,
    },
    /// Apply a retention policy to a volume's backups, Benji's syntax: e.g.
    /// `latest3,hours24,days7,weeks4,months12` keeps the 3 newest, then the oldest backup of
    /// each of the last 24 hours, 7 days, 4 weeks (from Monday) and 12 months (UTC); the rest
    /// go. A backup that a kept incremental builds on is always kept (a chain is never
    /// broken). Prints what is kept (and why) and what is removed.
    Prune {
        /// Volume id (UUID).
        #[arg(long, value_name = "VOLUME")]
        volume: String,
        /// Retention policy: comma-separated latestN, hoursN, daysN, weeksN, monthsN, yearsN.
        #[arg(long, value_name = "SPEC")]
        keep: String,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Read a backup back whole: every chunk against its SHA-256 and the stream's records.
    /// A damaged backup fails naming the chunk.
    Verify {
        /// Backup id (UUID).
        id: String,
    },
    /// Restore a backup (its full backup and every incremental up to it) into a new volume
    /// on any backend (the default backend unless --backend), or over an existing detached
    /// volume of its size; prints the volume. A restore into a new volume that fails leaves
    /// no volume; over an existing one the chain is checked first, and a failure after the
    /// first write leaves the volume `error` with the reason.
    Restore {
        /// Backup id (UUID).
        id: String,
        /// Overwrite this volume (detached, same size).
        #[arg(long, value_name = "VOLUME", conflicts_with = "backend")]
        volume: Option<String>,
        /// Create the new volume on this backend.
        #[arg(long, value_name = "NAME")]
        backend: Option<String>,
    },
}

/// `kiln instance ...`
#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// Record an instance: its guest agent socket, what to freeze, its root device and the
    /// image properties its snapshots inherit.
    Create(InstanceCreate),
    /// List instances.
    List,
    /// Show an instance and its attached volumes (with connection info).
    Show {
        /// Instance id (UUID).
        id: String,
    },
    /// Delete an instance record (refused while volumes are attached).
    Delete {
        /// Instance id (UUID).
        id: String,
    },
    /// Snapshot every attached volume at one instant (frozen through the guest agent when
    /// there is one) and record an image listing the snapshots; all or nothing.
    Snapshot(InstanceSnapshot),
}

/// `kiln instance create`
#[derive(Debug, Args)]
pub struct InstanceCreate {
    /// Use this id (e.g. Nova's server UUID) [default: a new one].
    #[arg(long, value_name = "UUID")]
    pub id: Option<String>,
    /// The project it belongs to in `kiln serve` (its members see it and may
    /// `createImage` it) [default: the project "default"].
    #[arg(long, value_name = "PROJECT")]
    pub project: Option<String>,
    /// Label.
    #[arg(long, value_name = "LABEL")]
    pub name: Option<String>,
    /// Host-side unix socket of the instance's qemu-guest-agent channel.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<String>,
    /// Host-side unix socket of the QMP monitor of the hypervisor (QEMU or
    /// qemu-storage-daemon) that has its qcow2 volumes open: kiln then snapshots those while
    /// attached, by a QMP transaction. Give kiln a monitor of its own (a monitor serves one
    /// client at a time).
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<String>,
    /// Freeze only this guest mountpoint (repeatable; uses guest-fsfreeze-freeze-list);
    /// without it the agent freezes every filesystem.
    #[arg(long = "freeze-mountpoint", value_name = "PATH")]
    pub freeze_mountpoints: Vec<String>,
    /// Root device (Nova's root_device_name).
    #[arg(long, value_name = "DEVICE", default_value = "/dev/vda")]
    pub root_device: String,
    /// Image property its snapshots inherit (repeatable), e.g. hw_disk_bus=virtio.
    #[arg(long = "property", value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
}

/// How `instance snapshot` quiesces the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuiesceArg {
    /// Freeze if the instance has an agent that answers; else crash-consistent.
    Auto,
    /// Freeze or fail.
    Required,
    /// Never freeze.
    Off,
}

/// `kiln instance snapshot`
#[derive(Debug, Args)]
pub struct InstanceSnapshot {
    /// Instance id (UUID).
    pub id: String,
    /// Image name.
    #[arg(long, value_name = "LABEL")]
    pub name: String,
    /// Freeze the guest's filesystems first.
    #[arg(long, value_enum, default_value_t = QuiesceArg::Auto)]
    pub quiesce: QuiesceArg,
    /// Longest freeze: the guest is thawed at this deadline even if snapshots still run
    /// (then the operation rolls back). E.g. 10s, 500ms, 1m; from 10ms to 5m.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub freeze_timeout: String,
    /// Extra image property (repeatable).
    #[arg(long = "property", value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
}

/// `kiln image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// List images.
    List,
    /// Show an image (with --format json: as Glance v2 serves it, properties flattened).
    Show {
        /// Image id (UUID).
        id: String,
    },
    /// Delete an image and its snapshots (unlike Nova, which leaves them behind).
    Delete {
        /// Image id (UUID).
        id: String,
        /// Keep the snapshots (they become ordinary snapshots).
        #[arg(long)]
        keep_snapshots: bool,
    },
    /// Create every volume of the image from its snapshot and attach it to an instance at
    /// its recorded device and boot index; all or nothing. Prints the instance.
    Restore {
        /// Image id (UUID).
        id: String,
        /// Attach to this instance [default: a new instance].
        #[arg(long, value_name = "UUID")]
        instance: Option<String>,
        /// Label of the new instance and volumes.
        #[arg(long, value_name = "LABEL")]
        name: Option<String>,
    },
    /// Write the image with its data into a new directory: image.json (the record, its
    /// block_device_mapping) and a full backup of every snapshot it lists, each chunked
    /// with SHA-256 sums. Progress bar on a terminal.
    Export {
        /// Image id (UUID).
        id: String,
        /// A new directory (never an existing one).
        #[arg(long, short, value_name = "DIR")]
        output: String,
    },
    /// Recreate an exported image on any backend: a volume and a snapshot per exported
    /// snapshot, and a new image whose block_device_mapping names them (boot it with
    /// `image restore`). All or nothing. Prints the new image.
    Import {
        /// The directory `image export` wrote.
        dir: String,
        /// Backend for the new volumes [default: the default backend].
        #[arg(long, value_name = "NAME")]
        backend: Option<String>,
    },
}

/// `kiln backend ...`
#[derive(Debug, Subcommand)]
pub enum BackendCmd {
    /// List backends with driver, capabilities and capacity.
    List,
}

/// `kiln volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (empty, or from a snapshot with --snapshot).
    Create(VolumeCreate),
    /// List volumes.
    List,
    /// Show one volume.
    Show {
        /// Volume id (UUID).
        id: String,
    },
    /// Delete a volume (refused while attached or while it has snapshots, unless --cascade).
    Delete {
        /// Volume id (UUID).
        id: String,
        /// Delete the volume's snapshots first.
        #[arg(long)]
        cascade: bool,
    },
    /// Record an attachment to an instance; the volume becomes in-use.
    Attach {
        /// Volume id (UUID).
        id: String,
        /// Instance (server) UUID.
        #[arg(long)]
        instance: String,
        /// Guest device, e.g. /dev/vdb.
        #[arg(long)]
        device: String,
        /// Boot order (0 = the root device); omit for a non-boot disk.
        #[arg(long, value_name = "N")]
        boot_index: Option<i32>,
        /// Guest bus as Nova records it (virtio, scsi, ide, ...).
        #[arg(long, value_name = "BUS")]
        disk_bus: Option<String>,
        /// Device type (disk, cdrom, ...) [default: disk].
        #[arg(long, value_name = "TYPE")]
        device_type: Option<String>,
        /// Recorded in images: a restored volume is meant to go with its instance.
        #[arg(long)]
        delete_on_termination: bool,
        /// The block node of the instance's hypervisor (--qmp) that serves this qcow2 volume
        /// [default: the node that has the volume's active file open, if the monitor answers].
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// Remove the attachment; the volume becomes available.
    Detach {
        /// Volume id (UUID).
        id: String,
    },
    /// Apply a Ceph incremental diff stream ("rbd diff v1" or what `kiln snapshot diff` and
    /// `rbd export-diff` write) onto a detached volume of the stream's size, as `rbd
    /// import-diff` applies one onto an image: a stream that starts from a snapshot needs
    /// the volume to have a snapshot of that name or id, and the snapshot the stream leads
    /// to is taken afterwards under its name. A file is checked whole before the first write
    /// (a bad stream changes nothing); a stream that fails part-way leaves the volume
    /// `error` with the reason.
    ImportDiff {
        /// Volume id (UUID).
        id: String,
        /// Stream file, or - for stdin.
        #[arg(long, short, value_name = "FILE|-")]
        input: String,
    },
    /// Make a volume cloned from a snapshot independent of it (copies shared data).
    Flatten {
        /// Volume id (UUID).
        id: String,
    },
    /// Admin: set a volume's status (Cinder's reset-state), e.g. to retry after an error
    /// you repaired by hand. Touches no backend; refused while an operation on the volume
    /// runs or is unfinished; the old status and the reason are kept (see `history`).
    ResetState {
        /// Volume id (UUID).
        id: String,
        /// New status: creating, available, in-use, deleting, error, error_deleting, reverting,
        /// restoring-backup.
        #[arg(long, value_name = "STATUS")]
        state: String,
        /// Why (kept in the history) [default: "reset by an administrator"].
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Status history of a volume (admin resets): old status, new status, reason, time.
    History {
        /// Volume id (UUID).
        id: String,
    },
    /// Admin: compare what the backend records about the volume (e.g. a qcow2 chain record)
    /// with its objects; with --repair, fix what is safe. Exit 0 only when consistent.
    Check {
        /// Volume id (UUID).
        id: String,
        /// Repair what can be repaired without losing data.
        #[arg(long)]
        repair: bool,
    },
}

/// `kiln volume create`
#[derive(Debug, Args)]
pub struct VolumeCreate {
    /// Size: 512M, 1G, 10GiB (binary units; rounded up to MiB). Defaults to the snapshot's
    /// size with --snapshot.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Backend name [default: the configured default backend, or the snapshot's].
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,
    /// Label (letters, digits, space and ._-+@:=, only).
    #[arg(long, value_name = "LABEL")]
    pub name: Option<String>,
    /// Create the volume from this snapshot (lineage is recorded).
    #[arg(long, value_name = "SNAPSHOT_ID")]
    pub snapshot: Option<String>,
}

/// `kiln snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a volume (available; with --force also in-use).
    Create {
        /// Volume id (UUID).
        volume_id: String,
        /// Label.
        #[arg(long, value_name = "LABEL")]
        name: Option<String>,
        /// Allow an attached (in-use) volume: a crash-consistent point-in-time image, or an
        /// "unsupported" error where the backend cannot promise that.
        #[arg(long)]
        force: bool,
    },
    /// List snapshots.
    List {
        /// Only this volume's snapshots.
        #[arg(long, value_name = "ID")]
        volume: Option<String>,
    },
    /// Show one snapshot.
    Show {
        /// Snapshot id (UUID).
        id: String,
    },
    /// Delete a snapshot (busy while clones depend on it, unless --flatten-dependents).
    Delete {
        /// Snapshot id (UUID).
        id: String,
        /// First make dependent clones independent (copies shared data; may take long).
        #[arg(long)]
        flatten_dependents: bool,
    },
    /// Revert the snapshot's (detached) volume to it; any snapshot, others are kept.
    Revert {
        /// Snapshot id (UUID).
        snapshot_id: String,
    },
    /// Lineage: the volume's snapshots, volumes cloned from them, and so on.
    Tree {
        /// Volume id (UUID).
        volume_id: String,
    },
    /// Admin: set a snapshot's status (Cinder's reset-state); see `volume reset-state`.
    ResetState {
        /// Snapshot id (UUID).
        id: String,
        /// New status: creating, available, deleting, error, error_deleting, restoring.
        #[arg(long, value_name = "STATUS")]
        state: String,
        /// Why (kept in the history) [default: "reset by an administrator"].
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Status history of a snapshot (admin resets).
    History {
        /// Snapshot id (UUID).
        id: String,
    },
    /// Write the snapshot's full raw image to FILE (sparse) or - (stdout); prints its sha256.
    Export {
        /// Snapshot id (UUID).
        snapshot_id: String,
        /// Output file (must not exist) or - for stdout.
        #[arg(long, short, value_name = "FILE|-")]
        output: String,
    },
    /// Write the snapshot as a Ceph incremental diff stream ("rbd diff v1", what `rbd
    /// export-diff` writes and `rbd import-diff` applies), on any backend: its whole data,
    /// or with --from only what changed since an older snapshot of the same volume (found
    /// from the backend's own tracking where it has one: see `backend list`'s diff);
    /// prints the stream's sha256 and how many bytes were read.
    Diff {
        /// Snapshot id (UUID).
        snapshot_id: String,
        /// An older snapshot of the same volume: write only the changes since it (the
        /// stream names it, so `rbd import-diff` checks the target has it).
        #[arg(long, value_name = "SNAPSHOT")]
        from: Option<String>,
        /// Output file (must not exist) or - for stdout.
        #[arg(long, short, value_name = "FILE|-")]
        output: String,
    },
}

/// `kiln bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Time kiln's snapshot create/delete against the backend's raw primitive, same run.
    Snapshot {
        /// Backend name [default: the default backend].
        #[arg(long, value_name = "NAME", conflicts_with = "volume")]
        backend: Option<String>,
        /// Benchmark on this existing volume (e.g. one holding data) instead of an empty
        /// scratch volume; its data and other snapshots are left as they were. An in-use
        /// volume is snapshotted with --force; an attached qcow2 volume through its
        /// hypervisor, against the bare QMP sequence.
        #[arg(long, value_name = "ID")]
        volume: Option<String>,
        /// Scratch volume size.
        #[arg(long, value_name = "SIZE", default_value = "1G")]
        size: String,
        /// Iterations of each measurement.
        #[arg(long, value_name = "N", default_value_t = 20)]
        iterations: usize,
    },
    /// Time an instance snapshot of N scratch volumes — its freeze window, the whole
    /// operation — against the same volumes snapshotted one by one (Nova's model), same run.
    Instance {
        /// Volumes attached to the scratch instance.
        #[arg(long, value_name = "N", default_value_t = 8)]
        volumes: usize,
        /// Backend name [default: the default backend].
        #[arg(long, value_name = "NAME")]
        backend: Option<String>,
        /// Scratch volume size.
        #[arg(long, value_name = "SIZE", default_value = "1G")]
        size: String,
        /// Iterations.
        #[arg(long, value_name = "N", default_value_t = 10)]
        iterations: usize,
        /// Freeze through this guest-agent socket (the window is then freeze to thaw).
        #[arg(long, value_name = "PATH", requires = "freeze_mountpoints")]
        agent: Option<String>,
        /// Mountpoint the agent freezes (repeatable; required with --agent).
        #[arg(long = "freeze-mountpoint", value_name = "PATH")]
        freeze_mountpoints: Vec<String>,
    },
    /// Load: CLIENTS concurrent clients creating and deleting snapshots on VOLUMES scratch
    /// volumes for DURATION seconds — through a running `kiln serve` (--mode api) or one
    /// `kiln` process per operation on this data directory (--mode cli) — reporting
    /// latencies (p50/p90/p99/max), throughput, errors, a health probe's latency (api),
    /// and that no snapshot is left in a transitional status (exit 5 otherwise).
    Api(ApiBenchArgs),
}

/// `kiln bench api`.
#[derive(Debug, Args)]
pub struct ApiBenchArgs {
    /// Through the REST API or the CLI.
    #[arg(long, value_enum, default_value_t = ApiBenchMode::Api)]
    pub mode: ApiBenchMode,
    /// The server (api mode); repeat it for several nodes, which then get the requests in
    /// turn (see --route) [default: http://127.0.0.1:8776].
    #[arg(long, value_name = "URL")]
    pub url: Vec<String>,
    /// With several --url: which node gets a request.
    #[arg(long, value_enum, default_value_t = ApiBenchRoute::Request)]
    pub route: ApiBenchRoute,
    /// X-Auth-Token to send (api mode).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Concurrent clients.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub clients: usize,
    /// Scratch volumes the clients share.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub volumes: usize,
    /// Seconds of load.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub duration: u64,
    /// Scratch volume size in GiB.
    #[arg(long, value_name = "GIB", default_value_t = 1)]
    pub size: u64,
}

/// How `kiln bench api` reaches kiln.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApiBenchMode {
    /// HTTP requests to `kiln serve`.
    Api,
    /// One `kiln` process per operation.
    Cli,
}

/// How `kiln bench api` spreads requests over several nodes (what a load balancer in front
/// of them would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiBenchRoute {
    /// Each request to the next node in turn (round robin).
    Request,
    /// Every request about one volume to the same node (a balancer hashing on the volume).
    Volume,
}

/// `kiln demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's volumes and snapshots instead of deleting them at the end.
    #[arg(long)]
    pub keep: bool,
}
