//! A command's decision context: what Cedar reads as `context`.
//!
//! Every action carries who is connecting, from where and to what
//! (`client`, `destination`: fixed for the flow, built once per flow in a
//! [`FlowContext`]) and when (`time`, the second the command was seen);
//! handlers add their action's own attributes (`database`, `statement`,
//! `path`, ...). [`Context`] keeps the three apart, so that a command whose
//! decision comes from a memo ([`super::decisions`]) never builds the whole
//! JSON record: it is assembled ([`Context::to_map`]) only when Cedar
//! evaluates it or a hold shows it to a reviewer.
//!
//! Owns the attributes' names and values. It must not decide anything or
//! know the memo's key format beyond handing out the parts.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{session, FlowInfo};

/// The context attributes every action carries, in their order in the
/// record.
pub(super) const BASE_NAMES: [&str; 3] = ["client", "time", "destination"];

/// The attributes a flow fixes (`client`, `destination`), as values and
/// as the compact JSON `serde_json` writes for them.
#[derive(Debug)]
pub struct FlowContext {
    client: Value,
    destination: Value,
    client_json: Box<[u8]>,
    destination_json: Box<[u8]>,
}

impl FlowContext {
    /// The attributes of the flow `info` describes.
    pub fn of(info: &FlowInfo) -> Self {
        Self::from_values(
            serde_json::json!({
                "pid": info.pid,
                "cgroup": info.cgroup,
                "address": info.client.to_string(),
            }),
            Value::String(info.original_dst.to_string()),
        )
    }

    /// From the attributes' values.
    pub(super) fn from_values(client: Value, destination: Value) -> Self {
        // A `Value` always serializes (its map keys are strings).
        let json = |v: &Value| serde_json::to_vec(v).unwrap_or_default().into_boxed_slice();
        Self {
            client_json: json(&client),
            destination_json: json(&destination),
            client,
            destination,
        }
    }
}

/// `context.time`: the second a command was seen, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextTime {
    /// Seconds since the Unix epoch.
    pub unix: i64,
    /// Hour of the day, 0-23.
    pub hour: i64,
    /// Day of the week, 0 = Monday.
    pub weekday: i64,
}

impl ContextTime {
    /// Now.
    pub fn now() -> Self {
        Self::at((session::now_ms() / 1000) as i64)
    }

    /// At `unix` seconds since the epoch.
    pub fn at(unix: i64) -> Self {
        Self {
            unix,
            hour: unix.rem_euclid(86_400) / 3600,
            // 1970-01-01 was a Thursday.
            weekday: (unix.div_euclid(86_400) + 3).rem_euclid(7),
        }
    }

    /// The Cedar record.
    pub fn value(&self) -> Value {
        serde_json::json!({ "unix": self.unix, "hour": self.hour, "weekday": self.weekday })
    }

    /// [`ContextTime::value`] as compact JSON, written into `out`.
    pub(super) fn write_json(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        write!(
            out,
            "{{\"unix\":{},\"hour\":{},\"weekday\":{}}}",
            self.unix, self.hour, self.weekday
        )
    }
}

/// A command's decision context: the flow's attributes, the time and the
/// action's own attributes. As a record ([`Context::to_map`]) it is
/// `client`, `time`, `destination`, then the action's attributes in the
/// order they were added; an action attribute of the same name as one of
/// the first three takes its place.
#[derive(Debug, Clone)]
pub struct Context {
    flow: Arc<FlowContext>,
    time: ContextTime,
    own: Map<String, Value>,
}

impl Context {
    /// The context of a command on a flow with `flow`'s attributes, seen at
    /// `time`, with no action attribute yet.
    pub fn new(flow: Arc<FlowContext>, time: ContextTime) -> Self {
        Self {
            flow,
            time,
            own: Map::new(),
        }
    }

    /// Adds (or replaces) an action attribute.
    pub fn insert(&mut self, name: String, value: Value) {
        self.own.insert(name, value);
    }

    /// Adds (or replaces) action attributes.
    pub fn extend(&mut self, attributes: impl IntoIterator<Item = (String, Value)>) {
        self.own.extend(attributes);
    }

    /// The whole record, as Cedar reads it.
    pub fn to_map(&self) -> Map<String, Value> {
        let mut m = Map::with_capacity(BASE_NAMES.len() + self.own.len());
        m.insert("client".into(), self.flow.client.clone());
        m.insert("time".into(), self.time.value());
        m.insert("destination".into(), self.flow.destination.clone());
        for (k, v) in &self.own {
            m.insert(k.clone(), v.clone());
        }
        m
    }

    /// [`Context::to_map`] as a JSON value.
    pub fn to_value(&self) -> Value {
        Value::Object(self.to_map())
    }

    /// The action's own attributes.
    pub(super) fn own(&self) -> &Map<String, Value> {
        &self.own
    }

    /// The time.
    pub(super) fn time(&self) -> ContextTime {
        self.time
    }

    /// The flow's attribute `name` (`client` or `destination`): its value
    /// and its compact JSON.
    pub(super) fn flow_attribute(&self, name: &str) -> Option<(&Value, &[u8])> {
        match name {
            "client" => Some((&self.flow.client, &self.flow.client_json)),
            "destination" => Some((&self.flow.destination, &self.flow.destination_json)),
            _ => None,
        }
    }
}

/// The context every action carries (who is connecting, from where, when,
/// to what), built afresh: for decisions made outside a command (a
/// connect, what a list may show).
pub fn base_context(info: &FlowInfo) -> Map<String, Value> {
    Context::new(Arc::new(FlowContext::of(info)), ContextTime::now()).to_map()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn flow() -> Arc<FlowContext> {
        Arc::new(FlowContext::from_values(
            json!({"pid": 7, "cgroup": "/a \"b\"", "address": "127.0.0.1:1"}),
            json!("127.0.0.1:5432"),
        ))
    }

    #[test]
    fn the_record_is_the_base_then_the_actions_attributes() {
        let mut c = Context::new(flow(), ContextTime::at(1_700_000_000));
        c.insert("database".into(), json!("postgres"));
        c.insert("statement".into(), json!({"text": "select 1"}));
        assert_eq!(
            serde_json::to_string(&c.to_map()).unwrap(),
            r#"{"client":{"pid":7,"cgroup":"/a \"b\"","address":"127.0.0.1:1"},"time":{"unix":1700000000,"hour":22,"weekday":1},"destination":"127.0.0.1:5432","database":"postgres","statement":{"text":"select 1"}}"#
        );
        // An action attribute named as a base one takes its place.
        c.insert("destination".into(), json!("elsewhere"));
        let m = c.to_map();
        assert_eq!(m.keys().nth(2).map(String::as_str), Some("destination"));
        assert_eq!(m["destination"], json!("elsewhere"));
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn the_time_is_utc_and_its_json_is_serde_jsons() {
        // 2023-11-14 22:13:20 UTC, a Tuesday (weekday 1).
        let t = ContextTime::at(1_700_000_000);
        assert_eq!((t.hour, t.weekday), (22, 1));
        // 1969-12-31 23:00:00 UTC, a Wednesday.
        let before = ContextTime::at(-3600);
        assert_eq!((before.hour, before.weekday), (23, 2));
        for t in [t, before, ContextTime::at(0)] {
            let mut out = Vec::new();
            t.write_json(&mut out).unwrap();
            assert_eq!(out, serde_json::to_vec(&t.value()).unwrap());
        }
    }

    #[test]
    fn the_flows_json_is_serde_jsons() {
        let f = flow();
        let c = Context::new(f.clone(), ContextTime::at(0));
        for name in ["client", "destination"] {
            let (v, json) = c.flow_attribute(name).unwrap();
            assert_eq!(json, serde_json::to_vec(v).unwrap().as_slice());
        }
        assert!(c.flow_attribute("time").is_none());
    }
}
