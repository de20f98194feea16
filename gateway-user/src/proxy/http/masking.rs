//! What the http handler masks in a response and how: the resource's
//! compiled rules (JSON paths, detectors), Kubernetes Secret values by
//! default, and the choice of JSON or text masker and content decoder by
//! the response's headers.
//!
//! Owns that choice only; the streaming is [`super::body`]'s and the rules
//! are the `mask` module's.

use std::sync::Arc;

use hyper::header::{self, HeaderMap};

use super::{
    body::{self, Pipeline},
    classify::K8sRequest,
};
use crate::mask::Masker;

/// JSON paths of Kubernetes Secret values, masked by default in responses
/// about secrets: a Secret, a SecretList, watch events, and server-side
/// printed Tables that include whole objects.
pub const K8S_SECRET_PATHS: &[&str] = &[
    "data.*",
    "stringData.*",
    "items.*.data.*",
    "items.*.stringData.*",
    "object.data.*",
    "object.stringData.*",
    "rows.*.object.data.*",
    "rows.*.object.stringData.*",
];

/// What masking a response needs: the resource's masker and extra paths.
pub(super) struct MaskPlan {
    masker: Arc<Masker>,
    extra: &'static [&'static str],
    /// Only JSON may pass (Kubernetes Secrets): anything else is refused
    /// rather than forwarded uninspected.
    json_only: bool,
}

impl MaskPlan {
    fn json(&self) -> Box<dyn body::Rewrite> {
        Box::new(JsonRewrite(self.masker.json(self.extra)))
    }
    fn text(&self) -> Box<dyn body::Rewrite> {
        Box::new(TextRewrite(self.masker.stream().eager()))
    }
}

/// A masker with no rules of its own: Kubernetes Secret defaults only.
fn k8s_default_masker() -> Option<Arc<Masker>> {
    static DEFAULT: std::sync::OnceLock<Option<Arc<Masker>>> = std::sync::OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            let rule = crate::policy::MaskRule {
                resource: "kubernetes-secrets".into(),
                columns: Vec::new(),
                json_paths: Vec::new(),
                detectors: Vec::new(),
                style: "redact".into(),
                binary: "pass".into(),
            };
            // Only `redact` is used, so the hash key does not matter.
            Masker::compile("kubernetes-secrets", &[rule], [0; 32])
                .ok()
                .flatten()
        })
        .clone()
}

struct JsonRewrite(crate::mask::JsonMasker);

impl body::Rewrite for JsonRewrite {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.0.push(chunk, out).map_err(|e| e.to_string())
    }
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        self.0.finish(out).map_err(|e| e.to_string())
    }
    fn counts(&self) -> serde_json::Value {
        self.0.counts().to_json()
    }
}

struct TextRewrite(crate::mask::StreamMasker);

impl body::Rewrite for TextRewrite {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.0.push(chunk, out);
        Ok(())
    }
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        self.0.finish(out);
        Ok(())
    }
    fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        self.0.flush(out);
        Ok(())
    }
    fn held(&self) -> usize {
        self.0.held()
    }
    fn counts(&self) -> serde_json::Value {
        self.0.counts().to_json()
    }
}

/// The decode-and-mask pipeline for a response, by its headers.
pub(super) fn pipeline(plan: &MaskPlan, h: &HeaderMap) -> Result<Option<Pipeline>, String> {
    let ctype = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mime = ctype.split(';').next().unwrap_or("").trim();
    let is_json = mime.ends_with("json")
        || mime == "application/x-ndjson"
        || mime == "application/jsonl"
        || mime.contains("json-seq");
    if plan.json_only && !is_json {
        return Err(format!(
            "a {} body about Secrets cannot be masked (JSON only)",
            if mime.is_empty() { "untyped" } else { mime }
        ));
    }
    let rewrite = if is_json {
        Some(plan.json())
    } else if mime.starts_with("text/")
        || mime.ends_with("xml")
        || mime.ends_with("yaml")
        || mime == "application/x-www-form-urlencoded"
        || mime.is_empty()
    {
        Some(plan.text())
    } else {
        // Binary types (images, archives) pass: detectors read text.
        None
    };
    let enc = h
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if rewrite.is_none() {
        return Ok(None);
    }
    let decoder = body::Decoder::for_encoding(enc)?;
    Ok(Some(Pipeline::new(decoder, rewrite)))
}

/// The masking plan for a request: the resource's own masker (`own`), and
/// for Kubernetes Secrets the default paths (JSON only).
pub(super) fn plan(
    own: Option<Arc<Masker>>,
    k8s: Option<&K8sRequest>,
) -> Result<Option<MaskPlan>, String> {
    let secrets = k8s.is_some_and(K8sRequest::is_secret);
    Ok(match (own, secrets) {
        (Some(masker), true) => Some(MaskPlan {
            masker,
            extra: K8S_SECRET_PATHS,
            json_only: true,
        }),
        (Some(masker), false) => Some(MaskPlan {
            masker,
            extra: &[],
            json_only: false,
        }),
        (None, true) => Some(MaskPlan {
            masker: k8s_default_masker().ok_or("the default Secret masker is unavailable")?,
            extra: K8S_SECRET_PATHS,
            json_only: true,
        }),
        (None, false) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn secret_responses_must_be_json_and_decodable() {
        let plan = MaskPlan {
            masker: k8s_default_masker().unwrap(),
            extra: K8S_SECRET_PATHS,
            json_only: true,
        };
        let h = |ct: &'static str, enc: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            if let Some(e) = enc {
                h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(e));
            }
            h
        };
        assert!(pipeline(&plan, &h("application/json", None))
            .unwrap()
            .is_some());
        assert!(pipeline(&plan, &h("application/json", Some("gzip")))
            .unwrap()
            .is_some());
        assert!(pipeline(&plan, &h("application/json", Some("br")))
            .unwrap()
            .is_some());
        assert!(pipeline(&plan, &h("application/json", Some("zstd"))).is_err());
        assert!(pipeline(&plan, &h("application/vnd.kubernetes.protobuf", None)).is_err());
        let loose = MaskPlan {
            json_only: false,
            ..plan
        };
        assert!(pipeline(&loose, &h("image/png", None)).unwrap().is_none());
        assert!(pipeline(&loose, &h("text/plain; charset=utf-8", None))
            .unwrap()
            .is_some());
    }

    #[test]
    fn only_secrets_and_masked_resources_get_a_plan() {
        let secret = K8sRequest {
            resource: "secrets".into(),
            ..Default::default()
        };
        let pods = K8sRequest {
            resource: "pods".into(),
            ..Default::default()
        };
        assert!(plan(None, Some(&pods)).unwrap().is_none());
        assert!(plan(None, None).unwrap().is_none());
        let p = plan(None, Some(&secret)).unwrap().unwrap();
        assert!(p.json_only);
        let own = k8s_default_masker();
        let p = plan(own, Some(&pods)).unwrap().unwrap();
        assert!(!p.json_only && p.extra.is_empty());
    }
}
