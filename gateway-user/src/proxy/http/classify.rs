//! What an HTTP request is, as policy sees it: `http:<method>` with host,
//! path and query, or for Kubernetes API servers `k8s:<verb>` with the API
//! group, resource, subresource, namespace and name read from the URL.
//!
//! Owns URL → action mapping only. It must not decide, forward or audit.

use serde_json::{json, Map, Value};

use crate::policy::actions;

/// A request classified for the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// The action, e.g. `http:get`, `k8s:list`.
    pub action: String,
    /// The action's own context attributes (merged into the base context).
    pub context: Map<String, Value>,
    /// The Kubernetes request, for kubernetes resources.
    pub k8s: Option<K8sRequest>,
}

/// Why a request cannot be classified (answered with 400 or 405).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// A method the action catalog does not know.
    #[error("method {0} is not supported")]
    Method(String),
    /// A path that is not origin-form.
    #[error("request path {0:?} is not an absolute path")]
    Path(String),
}

/// A Kubernetes API request, as its URL says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sRequest {
    /// get, list, watch, create, update, patch, delete, deletecollection,
    /// exec, attach, portforward, proxy, log.
    pub verb: String,
    /// API group (`""` for the core group, `apps`, ...).
    pub api_group: String,
    /// API version (`v1`).
    pub api_version: String,
    /// Resource (`pods`, `secrets`); empty for non-resource URLs.
    pub resource: String,
    /// Subresource (`status`, `exec`, `log`); empty when none.
    pub subresource: String,
    /// Namespace; empty for cluster-scoped requests.
    pub namespace: String,
    /// Object name; empty for collections.
    pub name: String,
}

impl K8sRequest {
    /// Whether the response carries Secret objects (masked by default).
    pub fn is_secret(&self) -> bool {
        self.api_group.is_empty() && self.resource == "secrets"
    }
}

/// Classifies a request to a generic HTTP resource.
pub fn http(
    method: &str,
    host: &str,
    path: &str,
    query: &str,
) -> Result<Classified, ClassifyError> {
    let m = method.to_ascii_lowercase();
    if !actions::HTTP.contains(&m.as_str()) {
        return Err(ClassifyError::Method(method.to_string()));
    }
    check_path(path)?;
    let mut context = Map::new();
    context.insert("method".into(), json!(method));
    context.insert("host".into(), json!(host));
    context.insert("path".into(), json!(path));
    context.insert("query".into(), json!(query));
    Ok(Classified {
        action: format!("http:{m}"),
        context,
        k8s: None,
    })
}

/// Classifies a request to a Kubernetes API server
/// (<https://kubernetes.io/docs/reference/using-api/api-concepts/>).
pub fn kubernetes(method: &str, path: &str, query: &str) -> Result<Classified, ClassifyError> {
    check_path(path)?;
    let k = k8s_request(method, path, query)?;
    let mut context = Map::new();
    context.insert("verb".into(), json!(k.verb));
    context.insert("api_group".into(), json!(k.api_group));
    context.insert("resource".into(), json!(k.resource));
    context.insert("subresource".into(), json!(k.subresource));
    context.insert("namespace".into(), json!(k.namespace));
    context.insert("name".into(), json!(k.name));
    context.insert("path".into(), json!(path));
    Ok(Classified {
        action: format!("k8s:{}", k.verb),
        context,
        k8s: Some(k),
    })
}

fn check_path(path: &str) -> Result<(), ClassifyError> {
    if !path.starts_with('/') {
        return Err(ClassifyError::Path(path.to_string()));
    }
    Ok(())
}

fn query_flag(query: &str, key: &str) -> bool {
    query.split('&').any(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        k == key && (v == "true" || v == "1")
    })
}

/// Maps method and URL to a Kubernetes request.
pub fn k8s_request(method: &str, path: &str, query: &str) -> Result<K8sRequest, ClassifyError> {
    let method = method.to_ascii_uppercase();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut req = K8sRequest::default();
    // `/api/v1/...` is the core group; `/apis/<group>/<version>/...` the rest.
    let rest: &[&str] = match segs.as_slice() {
        ["api", version, rest @ ..] => {
            req.api_version = (*version).to_string();
            rest
        }
        ["apis", group, version, rest @ ..] => {
            req.api_group = (*group).to_string();
            req.api_version = (*version).to_string();
            rest
        }
        // Discovery, /version, /healthz, /openapi: non-resource URLs.
        _ => {
            req.verb = nonresource_verb(&method)?;
            return Ok(req);
        }
    };
    // Deprecated `/watch/` prefix.
    let (legacy_watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let rest: &[&str] = match rest {
        // `/namespaces/<ns>` alone is the namespace object itself.
        ["namespaces", ns] => {
            req.resource = "namespaces".into();
            req.name = (*ns).to_string();
            &[]
        }
        ["namespaces", ns, "finalize" | "status"] => {
            req.resource = "namespaces".into();
            req.name = (*ns).to_string();
            req.subresource = rest.get(2).copied().unwrap_or_default().to_string();
            &[]
        }
        ["namespaces", ns, rest @ ..] => {
            req.namespace = (*ns).to_string();
            rest
        }
        _ => rest,
    };
    match rest {
        [] => {}
        [resource] => req.resource = (*resource).to_string(),
        [resource, name] => {
            req.resource = (*resource).to_string();
            req.name = (*name).to_string();
        }
        [resource, name, sub, ..] => {
            req.resource = (*resource).to_string();
            req.name = (*name).to_string();
            req.subresource = (*sub).to_string();
        }
    }
    if req.resource.is_empty() {
        // `/api/v1`, `/apis/apps/v1`: resource discovery.
        req.verb = nonresource_verb(&method)?;
        return Ok(req);
    }
    let watch = legacy_watch || query_flag(query, "watch");
    let named = !req.name.is_empty();
    req.verb = match (req.subresource.as_str(), method.as_str()) {
        ("exec", "GET" | "POST") => "exec",
        ("attach", "GET" | "POST") => "attach",
        ("portforward", "GET" | "POST") => "portforward",
        ("proxy", _) => "proxy",
        ("log", "GET") => "log",
        (_, "GET" | "HEAD") if watch => "watch",
        (_, "GET" | "HEAD") if named => "get",
        (_, "GET" | "HEAD") => "list",
        (_, "POST") => "create",
        (_, "PUT") => "update",
        (_, "PATCH") => "patch",
        (_, "DELETE") if named => "delete",
        (_, "DELETE") => "deletecollection",
        (_, other) => return Err(ClassifyError::Method(other.to_string())),
    }
    .to_string();
    Ok(req)
}

fn nonresource_verb(method: &str) -> Result<String, ClassifyError> {
    match method {
        "GET" | "HEAD" => Ok("get".into()),
        "POST" => Ok("create".into()),
        "PUT" => Ok("update".into()),
        "PATCH" => Ok("patch".into()),
        "DELETE" => Ok("delete".into()),
        other => Err(ClassifyError::Method(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(m: &str, p: &str, q: &str) -> (String, String, String, String, String, String) {
        let r = k8s_request(m, p, q).unwrap();
        (
            r.verb,
            r.api_group,
            r.resource,
            r.subresource,
            r.namespace,
            r.name,
        )
    }

    fn t(
        v: &str,
        g: &str,
        r: &str,
        s: &str,
        ns: &str,
        n: &str,
    ) -> (String, String, String, String, String, String) {
        (v.into(), g.into(), r.into(), s.into(), ns.into(), n.into())
    }

    #[test]
    fn kubernetes_urls_map_to_verbs() {
        assert_eq!(
            k("GET", "/api/v1/namespaces/default/pods", "limit=500"),
            t("list", "", "pods", "", "default", "")
        );
        assert_eq!(
            k("GET", "/api/v1/namespaces/default/pods/web", ""),
            t("get", "", "pods", "", "default", "web")
        );
        assert_eq!(
            k("GET", "/api/v1/namespaces/default/pods", "watch=true"),
            t("watch", "", "pods", "", "default", "")
        );
        assert_eq!(
            k("GET", "/api/v1/watch/namespaces/default/pods", ""),
            t("watch", "", "pods", "", "default", "")
        );
        assert_eq!(
            k("DELETE", "/api/v1/namespaces/default/pods/web", ""),
            t("delete", "", "pods", "", "default", "web")
        );
        assert_eq!(
            k("DELETE", "/api/v1/namespaces/default/pods", ""),
            t("deletecollection", "", "pods", "", "default", "")
        );
        assert_eq!(
            k(
                "POST",
                "/api/v1/namespaces/default/pods/web/exec",
                "command=ls"
            ),
            t("exec", "", "pods", "exec", "default", "web")
        );
        assert_eq!(
            k("GET", "/api/v1/namespaces/default/pods/web/log", ""),
            t("log", "", "pods", "log", "default", "web")
        );
        assert_eq!(
            k(
                "PUT",
                "/apis/apps/v1/namespaces/prod/deployments/api/scale",
                ""
            ),
            t("update", "apps", "deployments", "scale", "prod", "api")
        );
        assert_eq!(
            k("PATCH", "/apis/apps/v1/namespaces/prod/deployments/api", ""),
            t("patch", "apps", "deployments", "", "prod", "api")
        );
        assert_eq!(
            k("POST", "/apis/apps/v1/namespaces/prod/deployments", ""),
            t("create", "apps", "deployments", "", "prod", "")
        );
        assert_eq!(
            k("GET", "/api/v1/nodes", ""),
            t("list", "", "nodes", "", "", "")
        );
        assert_eq!(
            k("GET", "/api/v1/namespaces/kube-system", ""),
            t("get", "", "namespaces", "", "", "kube-system")
        );
        assert_eq!(
            k("GET", "/api/v1/namespaces", ""),
            t("list", "", "namespaces", "", "", "")
        );
        assert_eq!(k("GET", "/api", ""), t("get", "", "", "", "", ""));
        assert_eq!(
            k("GET", "/apis/apps/v1", ""),
            t("get", "apps", "", "", "", "")
        );
        assert_eq!(k("GET", "/version", ""), t("get", "", "", "", "", ""));
        assert!(k8s_request("BREW", "/api/v1/pods", "").is_err());
        let c = kubernetes("GET", "/api/v1/namespaces/default/secrets/db", "").unwrap();
        assert_eq!(c.action, "k8s:get");
        assert!(c.k8s.unwrap().is_secret());
        assert_eq!(c.context["path"], "/api/v1/namespaces/default/secrets/db");
    }

    #[test]
    fn http_methods_map_to_actions() {
        let c = http("DELETE", "api.example.com", "/v1/x", "a=1").unwrap();
        assert_eq!(c.action, "http:delete");
        assert_eq!(c.context["host"], "api.example.com");
        assert_eq!(c.context["query"], "a=1");
        assert!(matches!(
            http("PROPFIND", "h", "/", ""),
            Err(ClassifyError::Method(_))
        ));
        assert!(matches!(
            http("GET", "h", "*", ""),
            Err(ClassifyError::Path(_))
        ));
    }
}
