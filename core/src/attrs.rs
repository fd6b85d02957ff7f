//! What kiln records about an object for its API users, beyond kiln's own fields: the
//! project (tenant) that owns it, who created it, a description, user properties (Cinder's
//! `metadata`) and Cinder's `bootable` flag.
//!
//! They live beside the objects (one row per object in the store), written in the same
//! transaction as the object they describe and removed with it. An object without a row —
//! made by the CLI, or before this existed — belongs to [`DEFAULT_PROJECT`] and has no
//! description or properties.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The project of objects nobody claimed: CLI-made ones, and API requests in `noauth` mode
/// without a project.
pub const DEFAULT_PROJECT: &str = "default";

/// Longest description, as Cinder's columns allow.
pub const MAX_DESCRIPTION_LEN: usize = 255;

/// Longest project or user id (Keystone ids are 64 characters at most).
pub const MAX_ID_LEN: usize = 64;

/// Most properties one object may carry.
pub const MAX_PROPERTIES: usize = 128;

/// The kind of object a row of attributes belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// A volume.
    Volume,
    /// A snapshot.
    Snapshot,
    /// An instance.
    Instance,
    /// An image.
    Image,
}

impl ObjectKind {
    /// The kind as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Volume => "volume",
            ObjectKind::Snapshot => "snapshot",
            ObjectKind::Instance => "instance",
            ObjectKind::Image => "image",
        }
    }
}

/// The API-facing attributes of one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectAttrs {
    /// The owning project: other projects do not see the object.
    pub project_id: String,
    /// The user that created it, when known.
    pub user_id: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// User properties (Cinder's `metadata`).
    pub properties: BTreeMap<String, String>,
    /// Cinder's `bootable` flag (volumes only).
    pub bootable: bool,
    /// The API's own bookkeeping of the object (e.g. the lifecycle of a Cinder attachment:
    /// reserved, attaching, attached); never shown as metadata.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

impl Default for ObjectAttrs {
    fn default() -> Self {
        ObjectAttrs::owned_by(DEFAULT_PROJECT, None)
    }
}

impl ObjectAttrs {
    /// Attributes of a new object of `project`, created by `user`; nothing else set.
    pub fn owned_by(project: &str, user: Option<&str>) -> Self {
        ObjectAttrs {
            project_id: project.to_string(),
            user_id: user.map(str::to_string),
            description: None,
            properties: BTreeMap::new(),
            bootable: false,
            extra: BTreeMap::new(),
        }
    }

    /// Checks every field: ids of 1-64 characters from letters, digits and `-_.@`, a
    /// description of at most 255 characters without control characters, and at most
    /// 128 properties with keys and values of 1-255 (values 0-255) such characters.
    pub fn validate(&self) -> Result<()> {
        validate_id("project id", &self.project_id)?;
        if let Some(u) = &self.user_id {
            validate_id("user id", u)?;
        }
        if let Some(d) = &self.description {
            validate_text("description", d, 0)?;
        }
        if self.properties.len() > MAX_PROPERTIES {
            return Err(Error::invalid(
                "metadata",
                format!("at most {MAX_PROPERTIES} keys"),
            ));
        }
        for (k, v) in &self.properties {
            validate_text("metadata key", k, 1)?;
            validate_text("metadata value", v, 0)?;
        }
        if self.extra.len() > MAX_PROPERTIES {
            return Err(Error::invalid(
                "attributes",
                format!("at most {MAX_PROPERTIES} keys"),
            ));
        }
        Ok(())
    }
}

/// Checks a project or user id.
pub fn validate_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('-')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            format!("{id:?}: use 1-{MAX_ID_LEN} letters, digits or '-_.@', not starting with '-'"),
        ))
    }
}

/// Checks free text: `min`-255 characters, no control characters.
fn validate_text(what: &str, s: &str, min: usize) -> Result<()> {
    let n = s.chars().count();
    if n < min || n > MAX_DESCRIPTION_LEN {
        return Err(Error::invalid(
            what,
            format!("{min}-{MAX_DESCRIPTION_LEN} characters, got {n}"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(what, "control characters are not allowed"));
    }
    Ok(())
}

/// A project's limits; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    /// Most volumes.
    pub volumes: Option<u64>,
    /// Most snapshots.
    pub snapshots: Option<u64>,
    /// Most GiB of volumes and snapshots together (Cinder counts both).
    pub gigabytes: Option<u64>,
}

/// What a project uses now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Its volumes.
    pub volumes: u64,
    /// Its snapshots.
    pub snapshots: u64,
    /// Bytes of its volumes and snapshots together.
    pub bytes: u64,
}

/// Who a new object belongs to and the limits it must fit in: given to a creating
/// operation, which records the attributes and checks the quota in the transaction that
/// inserts the object, so concurrent creations cannot overshoot.
#[derive(Debug, Clone, Default)]
pub struct Owner {
    /// The new object's attributes.
    pub attrs: ObjectAttrs,
    /// The owning project's limits.
    pub quota: QuotaLimits,
}

impl Owner {
    /// The store steps that insert a new object `id` of `kind` and `bytes` (`insert`,
    /// the step that inserts its row) on behalf of `owner`: with an owner, the quota guard
    /// first (volumes and snapshots; it must not count the new row), then `insert`, then
    /// its attributes. Without one, `insert` alone: the object belongs to the default
    /// project.
    pub fn insert_steps(
        owner: Option<&Owner>,
        kind: ObjectKind,
        id: String,
        bytes: u64,
        insert: crate::store::Step,
    ) -> Vec<crate::store::Step> {
        let Some(owner) = owner else {
            return vec![insert];
        };
        let mut steps = Vec::with_capacity(3);
        if matches!(kind, ObjectKind::Volume | ObjectKind::Snapshot) {
            steps.push(crate::store::Step::QuotaAllows {
                project: owner.attrs.project_id.clone(),
                kind,
                limits: owner.quota,
                add_bytes: bytes,
            });
        }
        steps.push(insert);
        steps.push(crate::store::Step::PutAttrs {
            kind,
            id,
            attrs: owner.attrs.clone(),
        });
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_texts_are_checked() {
        assert!(validate_id("project id", "admin").is_ok());
        assert!(validate_id("project id", "0123456789abcdef0123456789abcdef").is_ok());
        for bad in ["", "-x", "a/b", "a b", "../x", "x;rm", &"x".repeat(65)] {
            assert!(validate_id("project id", bad).is_err(), "{bad:?}");
        }
        let mut a = ObjectAttrs::owned_by("p1", Some("u1"));
        a.description = Some("a normal description, with punctuation!".into());
        a.properties.insert("k".into(), String::new());
        assert!(a.validate().is_ok());
        a.description = Some("line\nbreak".into());
        assert!(a.validate().is_err());
        a.description = Some("d".repeat(256));
        assert!(a.validate().is_err());
        a.description = None;
        a.properties.insert(String::new(), "v".into());
        assert!(a.validate().is_err());
    }

    #[test]
    fn owner_steps_guard_before_the_insert() {
        use crate::store::Step;
        let o = Owner::default();
        let insert = || Step::DeleteVolume(crate::types::VolumeId::new());
        let s = Owner::insert_steps(Some(&o), ObjectKind::Volume, "v".into(), 1, insert());
        assert!(matches!(
            s.as_slice(),
            [
                Step::QuotaAllows { .. },
                Step::DeleteVolume(_),
                Step::PutAttrs { .. }
            ]
        ));
        let s = Owner::insert_steps(Some(&o), ObjectKind::Image, "i".into(), 0, insert());
        assert!(matches!(
            s.as_slice(),
            [Step::DeleteVolume(_), Step::PutAttrs { .. }]
        ));
        let s = Owner::insert_steps(None, ObjectKind::Snapshot, "s".into(), 1, insert());
        assert!(matches!(s.as_slice(), [Step::DeleteVolume(_)]));
    }
}
