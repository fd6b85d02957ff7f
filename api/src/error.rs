//! Errors in Cinder's body shape: `{"itemNotFound": {"code": 404, "message": "..."}}`,
//! with kiln's error kinds mapped to the status codes Cinder uses for the same cases.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_core::{Error, ErrorKind};

/// An error answer: a status, Cinder's fault name for it and a one-line message.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The message the client prints.
    pub message: String,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: no such object (or not the caller's).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 403: the caller may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// Cinder's fault name for the status (`badRequest`, `itemNotFound`, ...).
    pub fn fault_name(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "badRequest",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "itemNotFound",
            StatusCode::METHOD_NOT_ALLOWED => "badMethod",
            StatusCode::NOT_ACCEPTABLE => "notAcceptable",
            StatusCode::CONFLICT => "conflictingRequest",
            StatusCode::PAYLOAD_TOO_LARGE => "overLimit",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "badMediaType",
            StatusCode::NOT_IMPLEMENTED => "notImplemented",
            StatusCode::SERVICE_UNAVAILABLE => "serviceUnavailable",
            _ => "computeFault",
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match e.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            // Cinder answers Invalid* (bad values, wrong statuses, unsupported requests) 400.
            ErrorKind::InvalidInput | ErrorKind::WrongState | ErrorKind::Unsupported => {
                StatusCode::BAD_REQUEST
            }
            ErrorKind::Busy => StatusCode::CONFLICT,
            ErrorKind::OverLimit => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let name = self.fault_name();
        let mut fault = serde_json::json!({
            "code": self.status.as_u16(),
            "message": self.message,
        });
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // Cinder's overLimit carries retryAfter; a quota does not free itself.
            fault["retryAfter"] = "0".into();
        }
        let body = serde_json::json!({ name: fault });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Keystone uri=\"\""),
            );
        }
        resp
    }
}

/// Handler results.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_cinder_codes() {
        let cases = [
            (Error::not_found("volume", "x"), 404, "itemNotFound"),
            (Error::invalid("size", "too big"), 400, "badRequest"),
            (Error::wrong_state("in-use"), 400, "badRequest"),
            (Error::busy("clones", vec![]), 409, "conflictingRequest"),
            (Error::new(ErrorKind::OverLimit, "quota"), 413, "overLimit"),
            (Error::store("disk"), 500, "computeFault"),
        ];
        for (e, code, name) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), code);
            assert_eq!(a.fault_name(), name);
        }
    }
}
