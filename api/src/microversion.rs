//! API microversions, as OpenStack negotiates them: the client names one in
//! `OpenStack-API-Version: <service> <major>.<minor>` (absent = the minimum, `latest` =
//! the maximum); a version outside the range is 406, a malformed one 400. The answer
//! echoes the version used, with `Vary` on the header.

use std::fmt;

use axum::http::{HeaderMap, StatusCode};

use crate::error::ApiError;

/// The request header, and the response header that echoes it.
pub const HEADER: &str = "openstack-api-version";

/// A `major.minor` API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}

impl Version {
    /// `major.minor`.
    pub const fn new(major: u16, minor: u16) -> Self {
        Version { major, minor }
    }

    /// Whether this version is `major.minor` or later.
    pub fn at_least(self, major: u16, minor: u16) -> bool {
        self >= Version::new(major, minor)
    }

    fn parse(s: &str) -> Option<Version> {
        let (a, b) = s.split_once('.')?;
        let digits =
            |x: &str| !x.is_empty() && x.len() <= 4 && x.bytes().all(|c| c.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return None;
        }
        Some(Version::new(a.parse().ok()?, b.parse().ok()?))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One API's microversion range and the names its header uses.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// The service name in the header (`volume`, `compute`).
    pub service: &'static str,
    /// Other names accepted in a request (`block-storage`).
    pub aliases: &'static [&'static str],
    /// A legacy header carrying the bare version (`X-OpenStack-Nova-API-Version`).
    pub legacy_header: Option<&'static str>,
    /// Lowest supported.
    pub min: Version,
    /// Highest supported.
    pub max: Version,
}

/// Cinder v3. The maximum is 3.66 because from 3.66 on an attached volume is snapshotted
/// without `force`, which is how kiln works and what openstackclient relies on; the
/// features Cinder added after 3.66 (re-image, encryption key transfer, extend
/// completion) are not kiln's.
pub const VOLUME: Range = Range {
    service: "volume",
    aliases: &["block-storage"],
    legacy_header: None,
    min: Version::new(3, 0),
    max: Version::new(3, 66),
};

/// Nova's v2.1, the subset kiln serves (servers it knows, `createImage`). The maximum is
/// 2.45, from which `createImage` answers the image id in its body.
pub const COMPUTE: Range = Range {
    service: "compute",
    aliases: &[],
    legacy_header: Some("x-openstack-nova-api-version"),
    min: Version::new(2, 1),
    max: Version::new(2, 45),
};

impl Range {
    /// The version a request asks for (see the module docs).
    pub fn negotiate(&self, headers: &HeaderMap) -> Result<Version, ApiError> {
        let mut asked: Option<String> = None;
        for value in headers.get_all(HEADER) {
            let text = value
                .to_str()
                .map_err(|_| ApiError::bad_request("OpenStack-API-Version is not ASCII"))?;
            for part in text.split(',') {
                let mut words = part.split_whitespace();
                let (Some(service), Some(version), None) =
                    (words.next(), words.next(), words.next())
                else {
                    return Err(ApiError::bad_request(format!(
                        "malformed OpenStack-API-Version {part:?}: expected \"<service> <version>\""
                    )));
                };
                let service = service.to_ascii_lowercase();
                if service == self.service || self.aliases.contains(&service.as_str()) {
                    asked = Some(version.to_string());
                }
            }
        }
        if asked.is_none()
            && let Some(h) = self.legacy_header
            && let Some(v) = headers.get(h)
        {
            asked = Some(
                v.to_str()
                    .map_err(|_| ApiError::bad_request(format!("{h} is not ASCII")))?
                    .trim()
                    .to_string(),
            );
        }
        let Some(asked) = asked else {
            return Ok(self.min);
        };
        if asked.eq_ignore_ascii_case("latest") {
            return Ok(self.max);
        }
        let v = Version::parse(&asked).ok_or_else(|| {
            ApiError::bad_request(format!(
                "malformed API version {asked:?}: expected MAJOR.MINOR or \"latest\""
            ))
        })?;
        if v < self.min || v > self.max {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                format!(
                    "Version {v} is not supported by the API. Minimum is {} and maximum is {}.",
                    self.min, self.max
                ),
            ));
        }
        Ok(v)
    }

    /// The response header value: `volume 3.27`.
    pub fn header_value(&self, v: Version) -> String {
        format!("{} {v}", self.service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ask(values: &[&str]) -> Result<Version, u16> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                HEADER,
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
            );
        }
        VOLUME.negotiate(&h).map_err(|e| e.status.as_u16())
    }

    #[test]
    fn negotiation_follows_cinder() {
        assert_eq!(ask(&[]), Ok(Version::new(3, 0)));
        assert_eq!(ask(&["volume 3.27"]), Ok(Version::new(3, 27)));
        assert_eq!(ask(&["block-storage 3.40"]), Ok(Version::new(3, 40)));
        assert_eq!(ask(&["volume latest"]), Ok(VOLUME.max));
        assert_eq!(ask(&["compute 2.1, volume 3.44"]), Ok(Version::new(3, 44)));
        // Another service's version only: the default.
        assert_eq!(ask(&["compute 2.90"]), Ok(Version::new(3, 0)));
        assert_eq!(ask(&["volume 3.67"]), Err(406));
        assert_eq!(ask(&["volume 2.0"]), Err(406));
        assert_eq!(ask(&["volume 4.1"]), Err(406));
        for bad in [
            "volume",
            "volume 3",
            "volume 3.x",
            "volume .1",
            "volume 3.1.2",
            "volume 3.1 x",
            "volume 99999.1",
        ] {
            assert_eq!(ask(&[bad]), Err(400), "{bad}");
        }
        assert!(Version::new(3, 40).at_least(3, 27));
        assert!(!Version::new(3, 0).at_least(3, 27));
        assert_eq!(VOLUME.header_value(Version::new(3, 5)), "volume 3.5");
    }
}
