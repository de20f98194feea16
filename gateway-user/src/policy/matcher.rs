//! Matching original destinations to resources.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
};

use arc_swap::ArcSwap;

use super::{PolicySet, Resource};

/// A destination named in a policy: a literal socket address or a hostname
/// and port (resolved by [`Resolver`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// `10.0.0.5:5432`, `[fd00::1]:22`.
    Addr(SocketAddr),
    /// `orders.internal:5432`.
    Host {
        /// DNS name.
        host: String,
        /// Port.
        port: u16,
    },
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self::Addr(normalize(addr)));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("destination {s:?} needs a port: HOST:PORT or IP:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("destination {s:?} has an invalid port"))?;
        if port == 0 {
            return Err(format!("destination {s:?} has port 0"));
        }
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !host_ok || host.parse::<IpAddr>().is_ok() || host.contains(':') {
            return Err(format!(
                "destination {s:?} is neither IP:PORT, [IPv6]:PORT nor HOSTNAME:PORT"
            ));
        }
        Ok(Self::Host {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Index of literal-address matches; two resources may not claim one address.
pub(super) fn static_index(
    resources: &BTreeMap<String, Arc<Resource>>,
) -> Result<HashMap<SocketAddr, Arc<Resource>>, String> {
    let mut index: HashMap<SocketAddr, Arc<Resource>> = HashMap::new();
    for r in resources.values() {
        for m in &r.matches {
            if let Destination::Addr(a) = m {
                if let Some(other) = index.insert(*a, r.clone()) {
                    if other.name != r.name {
                        return Err(format!(
                            "destination {a} is matched by both resource `{}` and `{}`",
                            other.name, r.name
                        ));
                    }
                }
            }
        }
    }
    Ok(index)
}

/// Hostname matches, resolved off the data path and swapped in atomically.
#[derive(Default)]
pub struct Resolver {
    table: ArcSwap<HashMap<SocketAddr, Arc<Resource>>>,
}

impl Resolver {
    /// Resolves every hostname match of `policy` and replaces the table.
    /// A name that does not resolve keeps no addresses (flows to it are
    /// refused as unmatched) and is reported in the returned list.
    pub async fn refresh(&self, policy: &PolicySet) -> Vec<String> {
        let mut table = HashMap::new();
        let mut failures = Vec::new();
        for r in policy.resources.values() {
            for m in &r.matches {
                let Destination::Host { host, port } = m else {
                    continue;
                };
                let lookup = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    tokio::net::lookup_host((host.as_str(), *port)),
                )
                .await;
                match lookup {
                    Ok(Ok(addrs)) => {
                        for a in addrs {
                            let a = normalize(a);
                            // A literal match always wins over a resolved name.
                            if policy.match_static(&a).is_none() {
                                table.entry(a).or_insert_with(|| r.clone());
                            }
                        }
                    }
                    Ok(Err(e)) => failures.push(format!("{host}:{port} ({}): {e}", r.name)),
                    Err(_) => failures.push(format!("{host}:{port} ({}): timed out", r.name)),
                }
            }
        }
        self.table.store(Arc::new(table));
        failures
    }

    /// The resource `dst` selects: literal matches first, then resolved names.
    pub fn lookup(&self, policy: &PolicySet, dst: &SocketAddr) -> Option<Arc<Resource>> {
        let dst = normalize(*dst);
        policy
            .match_static(&dst)
            .cloned()
            .or_else(|| self.table.load().get(&dst).cloned())
    }
}
