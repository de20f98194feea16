//! Answers the proxy itself gives an agent: denials (403), bad requests
//! (400/405) and upstream failures (502), as JSON, or as a Kubernetes
//! `Status` object for Kubernetes resources so kubectl prints them.
//!
//! Owns the wording and shape of those bodies only.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Response, StatusCode};
use serde_json::{json, Value};

use super::{classify::K8sRequest, upstream::BoxBody};

/// Header naming the access request of a held request.
pub const REQUEST_HEADER: &str = "x-portcullis-request";

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> BoxBody {
    full(Bytes::new())
}

fn k8s_reason(status: StatusCode) -> &'static str {
    match status {
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        _ => "InternalError",
    }
}

/// The JSON body for an answer of `status` with `message`.
/// `k8s`: `Some` for Kubernetes resources (a `Status` object);
/// `request`: the access request id, when there is one.
pub fn body_json(
    status: StatusCode,
    message: &str,
    k8s: Option<&K8sRequest>,
    kube: bool,
    request: Option<&str>,
) -> Value {
    if kube {
        let mut details = serde_json::Map::new();
        if let Some(k) = k8s {
            if !k.name.is_empty() {
                details.insert("name".into(), json!(k.name));
            }
            if !k.resource.is_empty() {
                details.insert("kind".into(), json!(k.resource));
            }
            details.insert("group".into(), json!(k.api_group));
        }
        if let Some(r) = request {
            details.insert(
                "causes".into(),
                json!([{"reason": "AccessRequest", "message": format!("access request {r}"), "field": "portcullis.request"}]),
            );
        }
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": k8s_reason(status),
            "details": details,
            "code": status.as_u16(),
        })
    } else {
        let mut v = json!({
            "error": status.canonical_reason().unwrap_or("error").to_ascii_lowercase(),
            "message": message,
            "status": status.as_u16(),
        });
        if let (Some(r), Some(o)) = (request, v.as_object_mut()) {
            o.insert("request".into(), json!(r));
        }
        v
    }
}

/// A complete JSON answer.
pub fn json_response(status: StatusCode, body: &Value, request: Option<&str>) -> Response<BoxBody> {
    let text = body.to_string();
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if let Some(v) = request.and_then(|r| header::HeaderValue::from_str(r).ok()) {
        h.insert(REQUEST_HEADER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_denials_are_status_objects() {
        let k = K8sRequest {
            verb: "delete".into(),
            resource: "pods".into(),
            name: "web".into(),
            namespace: "default".into(),
            ..Default::default()
        };
        let v = body_json(StatusCode::FORBIDDEN, "no", Some(&k), true, Some("r-1"));
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["reason"], "Forbidden");
        assert_eq!(v["code"], 403);
        assert_eq!(v["details"]["name"], "web");
        assert_eq!(v["details"]["causes"][0]["message"], "access request r-1");
        let v = body_json(StatusCode::FORBIDDEN, "no", None, false, Some("r-1"));
        assert_eq!(v["error"], "forbidden");
        assert_eq!(v["request"], "r-1");
        let r = json_response(StatusCode::FORBIDDEN, &v, Some("r-1"));
        assert_eq!(r.headers()[REQUEST_HEADER], "r-1");
    }
}
