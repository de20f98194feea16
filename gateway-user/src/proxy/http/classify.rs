//! What an HTTP request is, as policy sees it: `http:<method>` with host,
//! path and query, or for Kubernetes API servers `k8s:<verb>` with the API
//! group, resource, subresource, namespace and name read from the URL.
//!
//! Owns URL → action mapping only. It must not decide, forward or audit.

use serde_json::{json, Map, Value};

use super::target::{self, TargetError};
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
    /// The normalised path ([`target::normalize_path`]): what was decided
    /// on, and what must be forwarded.
    pub path: String,
}

/// Why a request cannot be classified (answered with 400 or 405).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// A method the action catalog does not know.
    #[error("method {0} is not supported")]
    Method(String),
    /// A path or query that cannot be read unambiguously.
    #[error("{0}")]
    Target(#[from] TargetError),
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
    let path = target::normalize_path(path)?;
    let mut context = Map::with_capacity(8);
    context.insert("method".into(), json!(method));
    context.insert("host".into(), json!(host));
    context.insert("path".into(), json!(path));
    context.insert("query".into(), json!(query));
    Ok(Classified {
        action: format!("http:{m}"),
        context,
        k8s: None,
        path,
    })
}

/// Classifies a request to a Kubernetes API server
/// (<https://kubernetes.io/docs/reference/using-api/api-concepts/>).
pub fn kubernetes(method: &str, path: &str, query: &str) -> Result<Classified, ClassifyError> {
    let path = target::normalize_path(path)?;
    let k = k8s_request(method, &path, query)?;
    let mut context = Map::with_capacity(8);
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
        path,
    })
}

/// The query parameters the API server's request-info reads, as it reads
/// them (`k8s.io/apiserver` `RequestInfoFactory`): `watch` is true unless
/// its first value is `0` or `false` in any case (so `watch`, `watch=`,
/// `watch=t`, `watch=yes` are watches), and an exact `metadata.name`
/// field selector names the object.
struct K8sQuery {
    watch: bool,
    selected_name: Option<String>,
}

fn k8s_query(query: &str) -> Result<K8sQuery, ClassifyError> {
    let pairs = target::query_pairs(query)?;
    let mut watch = None;
    let mut selector = None;
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "watch" => &mut watch,
            "fieldSelector" => &mut selector,
            _ => continue,
        };
        // Go takes the first value; a second is refused rather than
        // trusted to be read the same way by everything on the path.
        if slot.replace(v).is_some() {
            return Err(TargetError::DuplicateParameter(k).into());
        }
    }
    let watch = watch.is_some_and(|v| !(v == "0" || v.eq_ignore_ascii_case("false")));
    let selected_name = match selector {
        Some(s) => {
            if s.contains('\\') {
                return Err(TargetError::FieldSelector.into());
            }
            s.split(',').find_map(|term| {
                let (k, v) = term.split_once("==").or_else(|| term.split_once('='))?;
                // `a!=b` splits at `=` with a key ending in `!`.
                (k.trim() == "metadata.name").then(|| v.trim().to_string())
            })
        }
        None => None,
    };
    Ok(K8sQuery {
        watch,
        selected_name,
    })
}

/// Maps method and URL to a Kubernetes request.
pub fn k8s_request(method: &str, path: &str, query: &str) -> Result<K8sRequest, ClassifyError> {
    let method = method.to_ascii_uppercase();
    // The API server routes on the fully decoded path (Go's `URL.Path`).
    let path = target::normalize_path(path)?;
    let decoded = target::decoded_segments(&path)?;
    let segs: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let q = k8s_query(query)?;
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
    // Deprecated `/watch/` and `/proxy/` prefixes: the API server takes
    // the verb from them whatever the method.
    let (special, rest) = match rest {
        ["watch", rest @ ..] => (Some("watch"), rest),
        ["proxy", rest @ ..] => (Some("proxy"), rest),
        _ => (None, rest),
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
    let named = !req.name.is_empty();
    req.verb = match (special, req.subresource.as_str(), method.as_str()) {
        (Some(v), _, _) => v,
        (None, sub, m) => verb(sub, m, named, q.watch)?,
    }
    .to_string();
    // A list or watch of exactly one name is authorized by the API server
    // as that name: rules see it the same way.
    if !named && matches!(req.verb.as_str(), "list" | "watch") {
        if let Some(n) = q
            .selected_name
            .filter(|n| !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '%']))
        {
            req.name = n;
        }
    }
    Ok(req)
}

fn verb(sub: &str, method: &str, named: bool, watch: bool) -> Result<&'static str, ClassifyError> {
    Ok(match (sub, method) {
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
    })
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
            Err(ClassifyError::Target(TargetError::NotAbsolute(_)))
        ));
    }

    #[test]
    fn encoded_and_dotted_paths_are_decided_as_the_api_server_routes_them() {
        for p in [
            "/api/v1/namespaces/default/secret%73/db",
            "/api/v1/namespaces/default/%73ecrets/db",
            "/api/v1/namespaces/default/pods/../secrets/db",
            "/api/v1/namespaces/default/pods/%2e%2e/secrets/db",
            "/api/v1/namespaces/default/./secrets/db",
        ] {
            let c = kubernetes("GET", p, "").unwrap();
            assert_eq!(c.action, "k8s:get", "{p}");
            assert_eq!(c.context["resource"], "secrets", "{p}");
            assert_eq!(c.context["name"], "db", "{p}");
            assert!(c.k8s.unwrap().is_secret(), "{p}");
            assert_eq!(c.path, "/api/v1/namespaces/default/secrets/db");
            assert_eq!(c.context["path"], "/api/v1/namespaces/default/secrets/db");
        }
        let c = kubernetes(
            "GET",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/system%3Aadmin",
            "",
        )
        .unwrap();
        assert_eq!(c.context["name"], "system:admin");
        for p in [
            "/api/v1/namespaces/default/secrets%2Fdb",
            "/api/v1/namespaces/default/secrets/db%00",
            "/api/v1/../../../secrets",
            "/api/v1/namespaces//default/secrets",
        ] {
            assert!(
                matches!(kubernetes("GET", p, ""), Err(ClassifyError::Target(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn watch_in_every_spelling_the_api_server_accepts() {
        let pods = "/api/v1/namespaces/default/pods";
        for q in [
            "watch=true",
            "watch=1",
            "watch=t",
            "watch=T",
            "watch=True",
            "watch=TRUE",
            "watch",
            "watch=",
            "watch=yes",
            "watch=on",
            "wat%63h=true",
            "watch=%74rue",
            "limit=1&watch=2",
        ] {
            assert_eq!(k("GET", pods, q).0, "watch", "{q}");
        }
        for q in [
            "watch=false",
            "watch=0",
            "watch=FALSE",
            "watch=False",
            "",
            "watcher=1",
        ] {
            assert_eq!(k("GET", pods, q).0, "list", "{q}");
        }
        assert_eq!(
            k("GET", "/apis/apps/v1/watch/namespaces/x/deployments", "").0,
            "watch"
        );
        assert_eq!(k("POST", "/api/v1/watch/namespaces/x/pods", "").0, "watch");
        assert_eq!(
            k("GET", "/api/v1/proxy/namespaces/x/pods/web", "").0,
            "proxy"
        );
        for q in ["watch=false&watch=true", "watch=1;x=2", "watch=%zz"] {
            assert!(
                matches!(k8s_request("GET", pods, q), Err(ClassifyError::Target(_))),
                "{q}"
            );
        }
    }

    #[test]
    fn field_selector_names_the_object_of_a_list() {
        let s = "/api/v1/namespaces/default/secrets";
        assert_eq!(
            k("GET", s, "fieldSelector=metadata.name%3Ddb"),
            t("list", "", "secrets", "", "default", "db")
        );
        assert_eq!(
            k(
                "GET",
                s,
                "watch=1&fieldSelector=type%3Dx,metadata.name%3D%3Ddb"
            ),
            t("watch", "", "secrets", "", "default", "db")
        );
        assert_eq!(
            k("GET", s, "fieldSelector=metadata.name!%3Ddb"),
            t("list", "", "secrets", "", "default", "")
        );
        assert!(k8s_request("GET", s, "fieldSelector=metadata.name%3Dd%5C,b").is_err());
    }
}
