#!/usr/bin/python3
"""The Python kubernetes client as an agent of the http e2e tests.

argv: host (the API server address the agent dials), the CA to trust (the
daemon's). Lists pods, tries to delete one, reads a secret (deserialized and
raw), and prints what it saw as one JSON document for the Rust test to check.
"""
import json, sys
from kubernetes import client
from kubernetes.client.rest import ApiException

host, ca = sys.argv[1], sys.argv[2]
cfg = client.Configuration()
cfg.host = host
cfg.ssl_ca_cert = ca
cfg.verify_ssl = True
# The agent's own token: the daemon must replace it upstream.
cfg.api_key = {"authorization": "agent-own-token"}
cfg.api_key_prefix = {"authorization": "Bearer"}
api_client = client.ApiClient(cfg)
v1 = client.CoreV1Api(api_client)
out = {}

pods = v1.list_namespaced_pod("default", _request_timeout=20)
out["pods"] = [p.metadata.name for p in pods.items]
out["pod_env"] = pods.items[0].spec.containers[0].env[0].value

try:
    v1.delete_namespaced_pod("web-1", "default", _request_timeout=20)
    out["delete"] = {"raised": False}
except ApiException as e:
    out["delete"] = {"raised": True, "status": e.status, "reason": e.reason,
                     "body": e.body.decode() if isinstance(e.body, bytes) else e.body}

secret = v1.read_namespaced_secret("db", "default", _request_timeout=20)
out["secret"] = api_client.sanitize_for_serialization(secret)
raw = v1.read_namespaced_secret("db", "default", _preload_content=False, _request_timeout=20)
out["secret_raw"] = raw.data.decode("utf-8", "replace")
print(json.dumps(out))
