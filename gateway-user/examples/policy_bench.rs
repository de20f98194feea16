//! Policy benchmark (`cargo xtask bench policy`): decision time and reload
//! time of a generated policy set of 100 resources and 500 rules, next to a
//! one-rule set, plus the destination-matching path (`match_static`,
//! `Resolver::lookup`). Prints a table, or with `--json` one JSON object.
//!
//! Targets (from the issue): a decision under 20 µs at p99 and a reload
//! (load + validate of the whole set) under 50 ms. Each is reported as PASS
//! or MISS; the exit status is 0 either way (it is non-zero only when the
//! benchmark itself cannot run).
//!
//! The generated set mixes permits with `when` conditions on the context,
//! forbids (some with `unless`, a few unscoped by resource), `@approval`
//! permits and rules scoped by action group (`action in Action::"postgres"`)
//! over 8 identities and resources of every protocol. Requests are built the
//! way protocol handlers build them (the context shapes of the generated
//! Cedar schema) and cover allow, deny and hold outcomes.

mod bench_common;

use std::{
    fs,
    hint::black_box,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use bench_common::{nanos, Machine, Summary};
use clap::Parser;
use portcullis::policy::{Decision, DecisionRequest, PolicySet, Resolver};
use serde::Serialize;
use serde_json::{json, Value};

/// Decision p99 target, microseconds.
const DECISION_P99_TARGET_US: f64 = 20.0;
/// Reload (median) target, milliseconds.
const RELOAD_TARGET_MS: f64 = 50.0;
/// Resources in the generated set.
const RESOURCES: usize = 100;
/// Rules in the generated set.
const RULES: usize = 500;
/// Identities in the generated set.
const IDENTITIES: usize = 8;
/// Cedar files the rules are spread over.
const RULE_FILES: usize = 5;
/// Distinct requests the decision loop cycles through.
const REQUESTS: usize = 256;
/// Lookups per timed batch (a single lookup is too short to time alone).
const LOOKUP_BATCH: usize = 1000;
/// Calls per part in the decision breakdown (at most --decisions).
const BREAKDOWN_CALLS: usize = 5000;

/// Policy benchmark: decision and reload time.
#[derive(Parser, Debug)]
#[command(name = "policy_bench")]
struct Args {
    /// Decisions to time per policy set (bounded by --time-limit).
    #[arg(long, default_value_t = 200_000)]
    decisions: usize,
    /// Time bound of each decision run, seconds.
    #[arg(long, default_value_t = 20.0)]
    time_limit: f64,
    /// Loads of each set for the reload time.
    #[arg(long, default_value_t = 20)]
    reloads: usize,
    /// Batches of 1000 lookups per lookup case.
    #[arg(long, default_value_t = 1000)]
    lookup_batches: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the generated policy directories (printed) instead of removing
    /// them.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("policy_bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Protocol-level shape of a generated resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Postgres,
    Tcp,
    Ssh,
    Http,
    Kubernetes,
}

impl Kind {
    /// The kind of resource `i` (40% postgres, 20% each tcp and ssh, 10%
    /// each plain http and Kubernetes API).
    fn of(i: usize) -> Self {
        match i % 10 {
            0 | 1 | 5 | 6 => Self::Postgres,
            2 | 7 => Self::Tcp,
            3 | 8 => Self::Ssh,
            4 => Self::Http,
            _ => Self::Kubernetes,
        }
    }

    /// The action group (`action in Action::"<group>"`).
    fn group(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Tcp => "tcp",
            Self::Ssh => "ssh",
            Self::Http => "http",
            Self::Kubernetes => "k8s",
        }
    }

    fn port(self) -> u16 {
        match self {
            Self::Postgres => 5432,
            Self::Tcp => 7000,
            Self::Ssh => 22,
            Self::Http | Self::Kubernetes => 443,
        }
    }

    /// Actions requests use, cycled through.
    fn actions(self) -> &'static [&'static str] {
        match self {
            Self::Postgres => &[
                "postgres:select",
                "postgres:insert",
                "postgres:update",
                "postgres:delete",
                "postgres:show",
            ],
            Self::Tcp => &["tcp:connect"],
            Self::Ssh => &["ssh:exec", "ssh:shell", "ssh:forward", "ssh:sftp"],
            Self::Http => &["http:get", "http:post", "http:delete", "http:head"],
            Self::Kubernetes => &["k8s:get", "k8s:list", "k8s:delete", "k8s:exec"],
        }
    }
}

fn resource_name(i: usize) -> String {
    format!("res-{i:03}")
}

fn identity_name(i: usize) -> String {
    format!("agent-{i}")
}

/// The literal address resource `i` matches.
fn resource_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, i as u8, 1], Kind::of(i).port()))
}

/// The hostname match every tenth resource also has (resolves to loopback).
fn resource_host_port(i: usize) -> Option<u16> {
    i.is_multiple_of(10).then(|| 20_000 + i as u16)
}

/// The TOML half of the generated set.
fn generated_toml() -> (String, String) {
    let mut identities = String::from(
        "[issuer.corp]\nurl = \"https://oidc.bench.test\"\n\
         jwks_file = \"/nonexistent/jwks.json\"\naudience = \"portcullis\"\n",
    );
    for i in 0..IDENTITIES {
        identities.push_str(&format!(
            "\n[identity.{}]\nissuer = \"corp\"\nsubject = \"system:serviceaccount:agents:{}\"\n",
            identity_name(i),
            identity_name(i)
        ));
    }
    let mut resources = String::new();
    for i in 0..RESOURCES {
        let kind = Kind::of(i);
        let mut matches = format!("\"{}\"", resource_addr(i));
        if let Some(port) = resource_host_port(i) {
            matches.push_str(&format!(", \"localhost:{port}\""));
        }
        let protocol = match kind {
            Kind::Kubernetes => "http",
            other => other.group(),
        };
        resources.push_str(&format!(
            "\n[resource.{}]\nprotocol = \"{protocol}\"\nmatch = [{matches}]\n",
            resource_name(i)
        ));
        if kind == Kind::Kubernetes {
            resources.push_str("kind = \"kubernetes\"\n");
        }
        match kind {
            Kind::Postgres => resources.push_str(
                "credentials = { user = \"agent_ro\", password_file = \"/etc/pw\" }\n\
                 record = \"full\"\napproval_timeout = \"5m\"\n",
            ),
            Kind::Http | Kind::Kubernetes => resources.push_str("tls = \"intercept\"\n"),
            Kind::Ssh => resources.push_str(
                "credentials = { user = \"deploy\", private_key_file = \"/etc/deploy_ed25519\" }\n\
                 known_hosts = \"/etc/known_hosts\"\n",
            ),
            Kind::Tcp => {}
        }
        if kind == Kind::Postgres && i % 20 == 0 {
            resources.push_str(&format!(
                "\n[[mask]]\nresource = \"{}\"\ncolumns = [\"ssn\"]\ndetectors = [\"credit_card\", \"email\"]\n",
                resource_name(i)
            ));
        }
    }
    (identities, resources)
}

/// How many rules of each sort the generator made.
#[derive(Debug, Default, Serialize)]
struct RuleMix {
    conditional_permits: usize,
    group_scoped: usize,
    forbids: usize,
    unscoped_forbids: usize,
    approval_permits: usize,
}

/// Rule `r` of the generated set (with its `@id`), counted in `mix`.
fn generated_rule(r: usize, mix: &mut RuleMix) -> String {
    // 7 is coprime with 100: every resource gets exactly 5 rules.
    let res_i = (r * 7) % RESOURCES;
    let kind = Kind::of(res_i);
    let id = identity_name((r / 3) % IDENTITIES);
    let res = resource_name(res_i);
    let who = format!("principal == Identity::\"{id}\"");
    let on = format!("resource == Resource::\"{res}\"");
    let head = format!("@id(\"r{r:03}\")\n");
    let body = match r % 10 {
        // Permits with a `when` condition on the context.
        0..=3 => {
            mix.conditional_permits += 1;
            match kind {
                Kind::Postgres => format!(
                    "permit({who}, action in [Action::\"postgres:select\", Action::\"postgres:show\", Action::\"postgres:explain\"], {on})\n  when {{ context.database == \"app\" && !context.statement.tables.contains(\"secrets\") }};"
                ),
                Kind::Tcp => format!(
                    "permit({who}, action == Action::\"tcp:connect\", {on})\n  when {{ context.time.weekday < 5 || context.client.cgroup like \"/agents/*\" }};"
                ),
                Kind::Ssh => format!(
                    "permit({who}, action == Action::\"ssh:exec\", {on})\n  when {{ (context.program == \"make\" && [\"build\", \"deploy\"].containsAll(context.args)) || context.command == \"git pull\" }};"
                ),
                Kind::Http => format!(
                    "permit({who}, action in [Action::\"http:get\", Action::\"http:head\"], {on})\n  when {{ context.path like \"/v1/*\" && context.query != \"debug=1\" }};"
                ),
                Kind::Kubernetes => format!(
                    "permit({who}, action in [Action::\"k8s:get\", Action::\"k8s:list\", Action::\"k8s:watch\"], {on})\n  when {{ context.namespace == \"agents\" }};"
                ),
            }
        }
        // Rules scoped to a whole protocol: `action in Action::"<group>"`.
        4 | 5 => {
            mix.group_scoped += 1;
            let group = kind.group();
            let permit = r % 10 == 4;
            match (kind, permit) {
                (Kind::Postgres, true) => format!(
                    "permit({who}, action in Action::\"{group}\", {on})\n  when {{ context.user == \"agent_ro\" && context.statement.has_where && context.time.hour >= 6 }};"
                ),
                (Kind::Postgres, false) => format!(
                    "forbid(principal, action in Action::\"{group}\", {on})\n  when {{ context.statement.tables.contains(\"cards\") && context.time.hour < 6 }};"
                ),
                (Kind::Tcp, _) => format!(
                    "permit({who}, action in Action::\"{group}\", {on})\n  when {{ context.destination like \"10.*\" }};"
                ),
                (Kind::Ssh, _) => format!(
                    "permit({who}, action in Action::\"{group}\", {on})\n  when {{ context.subsystem == \"sftp\" }};"
                ),
                (Kind::Http, _) => format!(
                    "permit({who}, action in Action::\"{group}\", {on})\n  when {{ context.host == \"api.internal\" && !(context.path like \"/admin*\") }};"
                ),
                (Kind::Kubernetes, _) => format!(
                    "permit({who}, action in Action::\"{group}\", {on})\n  when {{ context.namespace == \"sandbox\" && context.resource != \"secrets\" }};"
                ),
            }
        }
        // Forbids; every 50th one is not scoped to a resource.
        6 | 7 => {
            mix.forbids += 1;
            let on = if r % 50 == 6 {
                mix.unscoped_forbids += 1;
                "resource".to_string()
            } else {
                on
            };
            match kind {
                Kind::Postgres => format!(
                    "@reason(\"DELETE and UPDATE need a WHERE clause\")\nforbid(principal, action in [Action::\"postgres:delete\", Action::\"postgres:update\"], {on})\n  unless {{ context.statement.has_where }};"
                ),
                Kind::Tcp => format!(
                    "forbid(principal, action == Action::\"tcp:connect\", {on})\n  when {{ context.client.pid == 1 }};"
                ),
                Kind::Ssh => format!(
                    "forbid(principal, action == Action::\"ssh:forward\", {on})\n  unless {{ context.port == 443 }};"
                ),
                Kind::Http => format!(
                    "forbid(principal, action in Action::\"http\", {on})\n  when {{ context.path like \"/admin*\" }};"
                ),
                Kind::Kubernetes => format!(
                    "@reason(\"agents never read Secrets\")\nforbid(principal, action in Action::\"k8s\", {on})\n  when {{ context.resource == \"secrets\" }};"
                ),
            }
        }
        // Permits that need a human's approval.
        _ => {
            mix.approval_permits += 1;
            let rule = match kind {
                Kind::Postgres => format!(
                    "permit({who}, action in [Action::\"postgres:insert\", Action::\"postgres:update\", Action::\"postgres:delete\"], {on})\n  when {{ context.client.cgroup like \"/agents/*\" }};"
                ),
                Kind::Tcp => format!("permit({who}, action == Action::\"tcp:connect\", {on});"),
                Kind::Ssh => format!("permit({who}, action == Action::\"ssh:shell\", {on});"),
                Kind::Http => format!(
                    "permit({who}, action in [Action::\"http:post\", Action::\"http:put\", Action::\"http:delete\"], {on})\n  when {{ context.path like \"/v1/*\" }};"
                ),
                Kind::Kubernetes => format!(
                    "permit({who}, action in [Action::\"k8s:delete\", Action::\"k8s:exec\"], {on})\n  when {{ context.resource == \"pods\" && context.namespace == \"agents\" }};"
                ),
            };
            format!("@approval(\"required\")\n{rule}")
        }
    };
    format!("{head}{body}\n")
}

/// A policy directory removed on drop (unless kept).
struct PolicyDir {
    path: PathBuf,
    keep: bool,
}

impl PolicyDir {
    /// A fresh directory under the system temp dir holding `files`.
    fn create(tag: &str, files: &[(String, String)], keep: bool) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "portcullis-policy-bench-{tag}-{}",
            std::process::id()
        ));
        if path.exists() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot clear {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        for (name, text) in files {
            fs::write(path.join(name), text)
                .with_context(|| format!("cannot write {}/{name}", path.display()))?;
        }
        Ok(Self { path, keep })
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("policy_bench: kept {}", self.path.display());
        } else {
            // Best effort: a leftover temp dir is harmless.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The generated 100-resource, 500-rule set's files, and its rule mix.
fn generated_files() -> (Vec<(String, String)>, RuleMix) {
    let (identities, resources) = generated_toml();
    let mut files = vec![
        ("identities.toml".to_string(), identities),
        ("resources.toml".to_string(), resources),
    ];
    let mut mix = RuleMix::default();
    let per_file = RULES / RULE_FILES;
    for f in 0..RULE_FILES {
        let mut text = format!(
            "// Generated by policy_bench: rules {}..{}.\n\n",
            f * per_file,
            (f + 1) * per_file
        );
        for r in f * per_file..(f + 1) * per_file {
            text.push_str(&generated_rule(r, &mut mix));
            text.push('\n');
        }
        files.push((format!("rules-{f}.cedar"), text));
    }
    (files, mix)
}

/// The one-rule comparison set.
fn simple_files() -> Vec<(String, String)> {
    vec![
        (
            "simple.toml".to_string(),
            "[issuer.corp]\nurl = \"https://oidc.bench.test\"\njwks_file = \"/nonexistent/jwks.json\"\naudience = \"portcullis\"\n\n\
             [identity.agent-0]\nissuer = \"corp\"\nsubject = \"system:serviceaccount:agents:agent-0\"\n\n\
             [resource.res-000]\nprotocol = \"tcp\"\nmatch = [\"10.0.0.1:7000\"]\n"
                .to_string(),
        ),
        (
            "simple.cedar".to_string(),
            "@id(\"only\")\npermit(principal == Identity::\"agent-0\", action == Action::\"tcp:connect\", resource == Resource::\"res-000\");\n"
                .to_string(),
        ),
    ]
}

/// A request's context, shaped like the generated schema's context type of
/// `kind`; `variant` picks values that match different rules.
fn context(kind: Kind, action: &str, identity: &str, res_i: usize, variant: usize) -> Value {
    let v4 = variant % 4;
    let verb = action.split_once(':').map_or("", |(_, v)| v);
    let cgroup = if v4 == 3 {
        format!("/other/{identity}")
    } else {
        format!("/agents/{identity}")
    };
    let hour = [10, 3, 14, 22][v4];
    let weekday = [2, 6, 0, 4][v4];
    let mut ctx = json!({
        "client": { "pid": 4000 + variant as i64, "cgroup": cgroup, "address": "10.1.0.2:40000" },
        "time": { "unix": 1_764_151_200i64, "hour": hour, "weekday": weekday },
        "destination": resource_addr(res_i).to_string(),
    });
    let extra = match kind {
        Kind::Postgres => {
            let tables = if variant % 3 == 2 {
                json!(["orders", "cards"])
            } else {
                json!(["orders"])
            };
            json!({
                "database": if variant % 5 == 4 { "reporting" } else { "app" },
                "user": "agent_ro",
                "statement": {
                    "text": "SELECT id, total FROM orders WHERE customer_id = $1",
                    "fingerprint": "a1b2c3d4e5f60718",
                    "tables": tables,
                    "functions": [],
                    "has_where": variant.is_multiple_of(2),
                    "volatile_functions": [],
                },
            })
        }
        Kind::Tcp => json!({}),
        Kind::Ssh => {
            let command = ["make deploy", "git pull", "rm -rf /tmp/x", ""][v4];
            // The words of the plain command, as the ssh handler sets them.
            let argv: Vec<&str> = command.split_whitespace().collect();
            json!({
                "command": command,
                "argv": argv,
                "program": argv.first().copied().unwrap_or(""),
                "args": argv.get(1..).unwrap_or_default(),
                "subsystem": if v4 == 3 { "sftp" } else { "" },
                "host": "127.0.0.1",
                "port": if variant.is_multiple_of(2) { 443 } else { 5432 },
            })
        }
        Kind::Http => {
            let path = ["/v1/invoices/42", "/admin/users", "/v2/x", "/v1/orders"][v4];
            json!({
                "method": verb.to_ascii_uppercase(),
                "host": "api.internal",
                "path": path,
                "query": if variant % 5 == 1 { "debug=1" } else { "" },
            })
        }
        Kind::Kubernetes => {
            let resource = ["pods", "secrets", "configmaps", "pods"][v4];
            let namespace = ["agents", "agents", "sandbox", "kube-system"][v4];
            json!({
                "verb": verb,
                "api_group": "",
                "resource": resource,
                "subresource": "",
                "namespace": namespace,
                "name": "worker-1",
                "path": "/api/v1/namespaces/agents/pods/worker-1",
            })
        }
    };
    if let (Some(ctx), Value::Object(extra)) = (ctx.as_object_mut(), extra) {
        ctx.extend(extra);
    }
    ctx
}

/// An owned request (a [`DecisionRequest`] borrows its names).
struct OwnedRequest {
    identity: String,
    resource: String,
    action: &'static str,
    context: Value,
    approved: bool,
}

impl OwnedRequest {
    fn as_request(&self) -> DecisionRequest<'_> {
        DecisionRequest {
            identity: &self.identity,
            resource: &self.resource,
            action: self.action,
            context: self.context.clone(),
            approved: self.approved,
        }
    }
}

/// Requests against the generated set: mostly (identity, resource) pairs a
/// rule names, with varied actions and contexts; every eighth one has an
/// identity no rule of that resource names (default deny).
fn generated_requests() -> Vec<OwnedRequest> {
    (0..REQUESTS)
        .map(|j| {
            let r = (j * 37) % RULES;
            let res_i = (r * 7) % RESOURCES;
            let kind = Kind::of(res_i);
            let ident = if j % 8 == 7 {
                (r / 3 + 1 + j) % IDENTITIES
            } else {
                (r / 3) % IDENTITIES
            };
            let identity = identity_name(ident);
            let actions = kind.actions();
            let action = actions[(j / 3) % actions.len()];
            OwnedRequest {
                context: context(kind, action, &identity, res_i, j),
                identity,
                resource: resource_name(res_i),
                action,
                approved: j % 16 == 5,
            }
        })
        .collect()
}

/// The one request of the simple set (allowed).
fn simple_requests() -> Vec<OwnedRequest> {
    vec![OwnedRequest {
        identity: identity_name(0),
        resource: resource_name(0),
        action: "tcp:connect",
        context: context(Kind::Tcp, "tcp:connect", &identity_name(0), 0, 0),
        approved: false,
    }]
}

/// Decision timings of one set.
#[derive(Debug, Serialize)]
struct DecisionResult {
    #[serde(flatten)]
    latency: Summary,
    seconds: f64,
    per_second: f64,
    allow: u64,
    deny: u64,
    hold: u64,
    /// Denials for a malformed request or an evaluation error (should be 0:
    /// a bug in the benchmark's requests otherwise).
    invalid: u64,
}

/// Times `decide` over `requests`, cycling, up to `count` or `limit`.
fn time_decisions(
    set: &PolicySet,
    requests: &[OwnedRequest],
    count: usize,
    limit: Duration,
) -> DecisionResult {
    let prepared: Vec<DecisionRequest<'_>> =
        requests.iter().map(OwnedRequest::as_request).collect();
    // Warm caches and the allocator.
    for req in prepared.iter().cycle().take(2_000.min(count.max(1) * 2)) {
        black_box(set.decide(req));
    }
    let mut samples = Vec::with_capacity(count);
    let (mut allow, mut deny, mut hold, mut invalid) = (0, 0, 0, 0);
    let start = Instant::now();
    for req in prepared.iter().cycle().take(count) {
        let t = Instant::now();
        let decision = black_box(set.decide(req));
        samples.push(nanos(t.elapsed()));
        match &decision {
            Decision::Allow { .. } => allow += 1,
            Decision::Hold { .. } => hold += 1,
            Decision::Deny { reason, .. } => {
                deny += 1;
                if ["invalid", "unknown action", "evaluation error"]
                    .iter()
                    .any(|p| reason.starts_with(p))
                {
                    invalid += 1;
                }
            }
        }
        if samples.len() % 1024 == 0 && start.elapsed() >= limit {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let latency = Summary::of_nanos(&mut samples);
    DecisionResult {
        per_second: latency.count as f64 / seconds.max(1e-9),
        latency,
        seconds,
        allow,
        deny,
        hold,
        invalid,
    }
}

/// Reload timings of one set, milliseconds.
#[derive(Debug, Serialize)]
struct ReloadResult {
    count: usize,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    files: usize,
    rules: usize,
    resources: usize,
}

/// Loads the set in `dir` `count` times. With `edit`, one rule file is
/// changed before each load (a comment appended, the files taken in turn):
/// the reload the file watcher makes after an edit, where the rules of the
/// files that did not change are already known to validate. Without, the
/// files are loaded as they are.
fn time_reloads(dir: &Path, count: usize, edit: bool) -> Result<ReloadResult> {
    let mut rule_files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
        .collect();
    rule_files.sort();
    let mut samples = Vec::with_capacity(count);
    let mut last = None;
    for i in 0..count.max(1) {
        if edit && !rule_files.is_empty() {
            let file = &rule_files[i % rule_files.len()];
            let mut text = fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            text.push_str(&format!("// edit {i} {}\n", std::process::id()));
            fs::write(file, text).with_context(|| format!("cannot write {}", file.display()))?;
        }
        let t = Instant::now();
        let set = PolicySet::load(dir)
            .map_err(|e| anyhow::anyhow!("the set in {} is invalid:\n{e}", dir.display()))?;
        samples.push(nanos(t.elapsed()));
        last = Some(set);
    }
    let set = last.context("no load ran")?;
    samples.sort_unstable();
    let ms = |ns: u64| ns as f64 / 1e6;
    Ok(ReloadResult {
        count: samples.len(),
        median_ms: ms(bench_common::percentile(&samples, 0.5)),
        min_ms: ms(samples[0]),
        max_ms: ms(samples[samples.len() - 1]),
        files: set.files.len(),
        rules: set.rules().len(),
        resources: set.resources.len(),
    })
}

/// One lookup case: nanoseconds per call over batches.
#[derive(Debug, Serialize)]
struct LookupResult {
    case: &'static str,
    destination: String,
    found: Option<String>,
    p50_ns: f64,
    p99_ns: f64,
    mean_ns: f64,
}

/// Times `f(dst)` in batches of [`LOOKUP_BATCH`] calls.
fn time_lookup<F>(case: &'static str, dst: SocketAddr, batches: usize, f: F) -> LookupResult
where
    F: Fn(&SocketAddr) -> Option<String>,
{
    let found = f(&dst);
    let mut per_call = Vec::with_capacity(batches);
    for _ in 0..batches.max(1) {
        let t = Instant::now();
        for _ in 0..LOOKUP_BATCH {
            black_box(f(black_box(&dst)));
        }
        // Tenths of a nanosecond per call, to keep the precision.
        per_call.push(nanos(t.elapsed()) * 10 / LOOKUP_BATCH as u64);
    }
    per_call.sort_unstable();
    let mean = per_call.iter().sum::<u64>() as f64 / per_call.len() as f64 / 10.0;
    LookupResult {
        case,
        destination: dst.to_string(),
        found,
        p50_ns: bench_common::percentile(&per_call, 0.5) as f64 / 10.0,
        p99_ns: bench_common::percentile(&per_call, 0.99) as f64 / 10.0,
        mean_ns: mean,
    }
}

/// The lookup cases against the generated set (after resolving its
/// hostname matches).
fn time_lookups(set: &PolicySet, batches: usize) -> Result<(Vec<LookupResult>, Vec<String>)> {
    let resolver = Resolver::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime for Resolver::refresh")?;
    let failures = runtime.block_on(resolver.refresh(set));
    let name = |r: Option<&std::sync::Arc<portcullis::policy::Resource>>| r.map(|r| r.name.clone());
    let literal = resource_addr(42);
    let mapped: SocketAddr = format!("[::ffff:{}]:{}", literal.ip(), literal.port())
        .parse()
        .context("IPv4-mapped address")?;
    let resolved: SocketAddr = match resource_host_port(30) {
        Some(port) => SocketAddr::from(([127, 0, 0, 1], port)),
        None => bail!("resource 30 has no hostname match"),
    };
    let miss = SocketAddr::from(([192, 0, 2, 1], 9));
    let results = vec![
        time_lookup("match_static, hit", literal, batches, |d| {
            name(set.match_static(d))
        }),
        time_lookup("match_static, miss", miss, batches, |d| {
            name(set.match_static(d))
        }),
        time_lookup("Resolver::lookup, literal hit", literal, batches, |d| {
            name(resolver.lookup(set, d).as_ref())
        }),
        time_lookup("Resolver::lookup, v4-mapped v6 hit", mapped, batches, |d| {
            name(resolver.lookup(set, d).as_ref())
        }),
        time_lookup(
            "Resolver::lookup, resolved name hit",
            resolved,
            batches,
            |d| name(resolver.lookup(set, d).as_ref()),
        ),
        time_lookup("Resolver::lookup, miss", miss, batches, |d| {
            name(resolver.lookup(set, d).as_ref())
        }),
    ];
    Ok((results, failures))
}

/// Where one decision's time goes, from the same Cedar calls
/// `PolicySet::decide` makes (re-created here with the same generated schema,
/// rules and entities; indicative, not a replacement for the `decide()` row).
#[derive(Debug, Serialize)]
struct DecideBreakdown {
    /// `Context::from_json_value` with the schema (context validated).
    context_from_json: Summary,
    /// `Request::new` with the schema.
    request_new: Summary,
    /// `Authorizer::is_authorized` over every rule of the set.
    is_authorized: Summary,
}

/// Where one reload's time goes (one pass each, milliseconds).
#[derive(Debug, Serialize)]
struct ReloadBreakdown {
    /// Parsing the generated Cedar schema.
    schema_ms: f64,
    /// Parsing every `*.cedar` file into one policy set.
    parse_ms: f64,
    /// Strict validation of the set against the schema.
    validate_ms: f64,
}

/// Times `f` once per item of `count` calls.
fn time_each(count: usize, mut f: impl FnMut(usize)) -> Summary {
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        f(i);
        samples.push(nanos(t.elapsed()));
    }
    Summary::of_nanos(&mut samples)
}

/// Milliseconds `f` takes, with its result.
fn time_once<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64() * 1e3, out)
}

/// Re-creates the Cedar side of `set` (from the files in `dir`) and times
/// the parts of a decision and of a reload.
fn breakdown(
    set: &PolicySet,
    dir: &Path,
    requests: &[OwnedRequest],
    count: usize,
) -> Result<(DecideBreakdown, ReloadBreakdown)> {
    use cedar_policy::{
        Authorizer, Context, Entities, EntityUid, PolicyId, Request, Schema, ValidationMode,
        Validator,
    };
    use std::str::FromStr as _;

    let schema_text = portcullis::policy::actions::cedar_schema();
    let (schema_ms, schema) = time_once(|| {
        Schema::from_cedarschema_str(&schema_text)
            .map_err(|e| anyhow::anyhow!("the generated schema does not parse: {e}"))
    });
    let (schema, _) = schema?;
    let texts: Vec<String> = set
        .files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "cedar"))
        .map(|f| fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display())))
        .collect::<Result<_>>()?;
    let (parse_ms, policies) = time_once(|| -> Result<cedar_policy::PolicySet> {
        let mut all = cedar_policy::PolicySet::new();
        for (n, text) in texts.iter().enumerate() {
            let parsed = cedar_policy::PolicySet::from_str(text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            for p in parsed.policies() {
                all.add(p.new_id(PolicyId::new(format!("f{n}-{}", p.id()))))
                    .context("duplicate policy id")?;
            }
        }
        Ok(all)
    });
    let policies = policies?;
    let (validate_ms, validation) =
        time_once(|| Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict));
    if !validation.validation_passed() {
        bail!("the re-created rules do not validate");
    }

    let entities: Vec<Value> = set
        .identities
        .values()
        .map(|i| {
            let issuer = set.issuers.get(&i.issuer).map_or("", |x| x.url.as_str());
            json!({
                "uid": {"type": "Identity", "id": i.name},
                "attrs": {"name": i.name, "issuer": issuer, "subject": i.subject},
                "parents": [],
            })
        })
        .chain(set.resources.values().map(|r| {
            json!({
                "uid": {"type": "Resource", "id": r.name},
                "attrs": {"name": r.name, "protocol": r.protocol.as_str(), "kind": r.kind},
                "parents": [],
            })
        }))
        .collect();
    let entities = Entities::from_json_value(Value::Array(entities), Some(&schema))
        .context("entities do not fit the schema")?;
    let uid = |kind: &str, id: &str| {
        EntityUid::from_str(&format!("{kind}::{id:?}"))
            .with_context(|| format!("invalid entity {kind}::{id:?}"))
    };
    let mut prepared = Vec::with_capacity(requests.len());
    for r in requests {
        let action = uid("Action", r.action)?;
        let context = Context::from_json_value(r.context.clone(), Some((&schema, &action)))
            .context("a request context does not fit the schema")?;
        prepared.push((
            uid("Identity", &r.identity)?,
            action,
            uid("Resource", &r.resource)?,
            context,
        ));
    }
    let n = prepared.len();
    let context_from_json = time_each(count, |i| {
        let (_, action, _, _) = &prepared[i % n];
        let ctx = requests[i % n].context.clone();
        black_box(Context::from_json_value(ctx, Some((&schema, action))).is_ok());
    });
    let request_new = time_each(count, |i| {
        let (p, a, r, c) = &prepared[i % n];
        black_box(Request::new(p.clone(), a.clone(), r.clone(), c.clone(), Some(&schema)).is_ok());
    });
    let authorizer = Authorizer::new();
    let mut built = Vec::with_capacity(n);
    for (p, a, r, c) in &prepared {
        let request = Request::new(p.clone(), a.clone(), r.clone(), c.clone(), Some(&schema))
            .map_err(|e| anyhow::anyhow!("a request does not fit the schema: {e}"))?;
        built.push(request);
    }
    let is_authorized = time_each(count, |i| {
        black_box(authorizer.is_authorized(&built[i % n], &policies, &entities));
    });
    Ok((
        DecideBreakdown {
            context_from_json,
            request_new,
            is_authorized,
        },
        ReloadBreakdown {
            schema_ms,
            parse_ms,
            validate_ms,
        },
    ))
}

/// Everything measured for one set.
#[derive(Debug, Serialize)]
struct SetResult {
    name: &'static str,
    decisions: DecisionResult,
    /// Reloads after one rule file was edited (the target's figure).
    reload: ReloadResult,
    /// Reloads of the files as they are.
    reload_unchanged: ReloadResult,
}

fn run(args: &Args) -> Result<()> {
    let machine = Machine::detect();
    let limit = Duration::from_secs_f64(args.time_limit.max(0.1));

    let (files, mix) = generated_files();
    let big_dir = PolicyDir::create("generated", &files, args.keep)?;
    let small_dir = PolicyDir::create("simple", &simple_files(), args.keep)?;

    eprintln!("policy_bench: loading {}", big_dir.path.display());
    // The first load in the process: nothing is cached (the generated
    // schema is parsed, every rule validated), as at the daemon's start or
    // after every file changed at once.
    let (first_load_ms, big) = time_once(|| PolicySet::load(&big_dir.path));
    let big = big.map_err(|e| anyhow::anyhow!("the generated set is invalid:\n{e}"))?;
    let small = PolicySet::load(&small_dir.path)
        .map_err(|e| anyhow::anyhow!("the simple set is invalid:\n{e}"))?;
    if big.rules().len() != RULES || big.resources.len() != RESOURCES {
        bail!(
            "the generated set has {} rules and {} resources, expected {RULES} and {RESOURCES}",
            big.rules().len(),
            big.resources.len()
        );
    }

    let mut sets = Vec::new();
    for (name, set, dir, requests) in [
        (
            "500 rules, 100 resources",
            &big,
            &big_dir,
            generated_requests(),
        ),
        ("1 rule, 1 resource", &small, &small_dir, simple_requests()),
    ] {
        eprintln!(
            "policy_bench: {name}: {} decisions (at most {:.0} s)",
            args.decisions,
            limit.as_secs_f64()
        );
        let decisions = time_decisions(set, &requests, args.decisions.max(1), limit);
        if decisions.invalid > 0 {
            bail!(
                "{name}: {} requests were refused as malformed: the benchmark's contexts do not fit the schema",
                decisions.invalid
            );
        }
        eprintln!("policy_bench: {name}: {} reloads", args.reloads);
        let reload = time_reloads(&dir.path, args.reloads, true)?;
        let reload_unchanged = time_reloads(&dir.path, args.reloads, false)?;
        sets.push(SetResult {
            name,
            decisions,
            reload,
            reload_unchanged,
        });
    }
    eprintln!("policy_bench: breakdown");
    let (decide_parts, reload_parts) = breakdown(
        &big,
        &big_dir.path,
        &generated_requests(),
        BREAKDOWN_CALLS.min(args.decisions.max(1)),
    )?;
    eprintln!("policy_bench: lookups");
    let (lookups, resolve_failures) = time_lookups(&big, args.lookup_batches)?;

    let decision_p99 = sets[0].decisions.latency.p99_us;
    let reload_median = sets[0].reload.median_ms;
    let targets = vec![
        json!({
            "target": "decision p99 < 20 us (500-rule set)",
            "limit": DECISION_P99_TARGET_US,
            "measured": decision_p99,
            "pass": decision_p99 < DECISION_P99_TARGET_US,
        }),
        json!({
            "target": "reload median < 50 ms (500-rule set, one file edited)",
            "limit": RELOAD_TARGET_MS,
            "measured": reload_median,
            "pass": reload_median < RELOAD_TARGET_MS,
        }),
    ];

    if args.json {
        let out = json!({
            "benchmark": "policy",
            "machine": machine,
            "generated_set": {
                "resources": RESOURCES,
                "identities": IDENTITIES,
                "rules": RULES,
                "rule_files": RULE_FILES,
                "mix": mix,
                "distinct_requests": REQUESTS,
            },
            "sets": sets,
            "first_load_ms": first_load_ms,
            "breakdown": { "decide": decide_parts, "reload": reload_parts },
            "lookups": lookups,
            "resolve_failures": resolve_failures,
            "targets": targets,
        });
        println!("{out}");
        return Ok(());
    }

    println!();
    println!("Policy benchmark: {}", machine.line());
    println!(
        "generated set: {RESOURCES} resources (40 postgres, 20 tcp, 20 ssh, 10 http, 10 kubernetes; \
         10 also matched by hostname), {IDENTITIES} identities, {RULES} rules in {RULE_FILES} files:"
    );
    println!(
        "  {} permits with `when`, {} scoped by `action in Action::\"<protocol>\"`, {} forbids ({} not scoped to a resource), {} @approval permits",
        mix.conditional_permits, mix.group_scoped, mix.forbids, mix.unscoped_forbids, mix.approval_permits
    );
    println!();
    println!(
        "{:<28} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10}   allow/deny/hold",
        "decide()", "count", "p50 us", "p99 us", "max us", "mean us", "per s"
    );
    for s in &sets {
        let d = &s.decisions;
        println!(
            "{:<28} {:>8} {:>9.2} {:>9.2} {:>9.1} {:>9.2} {:>10.0}   {}/{}/{}",
            s.name,
            d.latency.count,
            d.latency.p50_us,
            d.latency.p99_us,
            d.latency.max_us,
            d.latency.mean_us,
            d.per_second,
            d.allow,
            d.deny,
            d.hold
        );
    }
    println!();
    println!(
        "{:<28} {:>8} {:>9} {:>9} {:>9}",
        "reload (load + validate)", "count", "median ms", "min ms", "max ms"
    );
    for s in &sets {
        for (how, r) in [
            ("one file edited", &s.reload),
            ("unchanged", &s.reload_unchanged),
        ] {
            println!(
                "{:<28} {:>8} {:>9.2} {:>9.2} {:>9.2}   {how}",
                s.name, r.count, r.median_ms, r.min_ms, r.max_ms
            );
        }
    }
    println!("first load in the process (nothing cached, 500-rule set): {first_load_ms:.2} ms");
    println!();
    println!(
        "{:<38} {:>9} {:>9} {:>9}",
        "where decide() goes (500-rule set)", "p50 us", "p99 us", "mean us"
    );
    for (part, t) in [
        (
            "Context::from_json_value (schema)",
            &decide_parts.context_from_json,
        ),
        ("Request::new (schema)", &decide_parts.request_new),
        ("Authorizer::is_authorized", &decide_parts.is_authorized),
    ] {
        println!(
            "{part:<38} {:>9.2} {:>9.2} {:>9.2}",
            t.p50_us, t.p99_us, t.mean_us
        );
    }
    println!(
        "where a reload goes (500-rule set, one pass): schema {:.1} ms, parse {:.1} ms, strict validation {:.1} ms",
        reload_parts.schema_ms, reload_parts.parse_ms, reload_parts.validate_ms
    );
    println!();
    println!(
        "{:<38} {:>9} {:>9} {:>9}   result",
        "destination lookup (500-rule set)", "p50 ns", "p99 ns", "mean ns"
    );
    for l in &lookups {
        println!(
            "{:<38} {:>9.1} {:>9.1} {:>9.1}   {} -> {}",
            l.case,
            l.p50_ns,
            l.p99_ns,
            l.mean_ns,
            l.destination,
            l.found.as_deref().unwrap_or("(none)")
        );
    }
    if !resolve_failures.is_empty() {
        println!(
            "  hostname matches that did not resolve: {}",
            resolve_failures.join("; ")
        );
    }
    println!();
    println!("targets (issue)");
    for t in &targets {
        let pass = t["pass"].as_bool().unwrap_or(false);
        println!(
            "  {:<40} measured {:>8.2}   {}",
            t["target"].as_str().unwrap_or(""),
            t["measured"].as_f64().unwrap_or(f64::NAN),
            if pass { "PASS" } else { "MISS" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_set_is_valid_and_requests_reach_every_outcome() {
        let (files, mix) = generated_files();
        assert_eq!(
            mix.conditional_permits + mix.group_scoped + mix.forbids + mix.approval_permits,
            RULES
        );
        let dir = PolicyDir::create("test", &files, false).expect("policy dir");
        let set = PolicySet::load(&dir.path).expect("the generated set is valid");
        assert_eq!(set.rules().len(), RULES);
        assert_eq!(set.resources.len(), RESOURCES);
        assert_eq!(set.identities.len(), IDENTITIES);

        // Counts only: the time bound is a safety net, nothing is timed.
        let requests = generated_requests();
        let r = time_decisions(&set, &requests, REQUESTS, Duration::from_secs(600));
        assert_eq!(r.invalid, 0);
        assert!(r.allow > 0 && r.deny > 0 && r.hold > 0, "{r:?}");
        let (decide, _) = breakdown(&set, &dir.path, &requests, 4).expect("breakdown");
        assert_eq!(decide.is_authorized.count, 4);

        let (lookups, failures) = time_lookups(&set, 1).expect("lookups");
        assert!(failures.is_empty(), "{failures:?}");
        let found: Vec<Option<&str>> = lookups.iter().map(|l| l.found.as_deref()).collect();
        assert_eq!(
            found,
            [
                Some("res-042"),
                None,
                Some("res-042"),
                Some("res-042"),
                Some("res-030"),
                None
            ]
        );
    }

    #[test]
    fn the_simple_set_allows_its_one_request() {
        let dir = PolicyDir::create("simple-test", &simple_files(), false).expect("policy dir");
        let set = PolicySet::load(&dir.path).expect("the simple set is valid");
        let r = time_decisions(&set, &simple_requests(), 3, Duration::from_secs(600));
        assert_eq!((r.allow, r.deny, r.hold), (3, 0, 0));
    }
}
