//! Who a flow belongs to: tags (the operator's binding of a cgroup to an
//! identity name and a token source), the cgroup tree they refer to, and
//! OIDC tokens that prove the identity ([`oidc`]).
//!
//! Owns the tag store in the state dir, the mapping between cgroup ids,
//! paths and processes, and token validation. It must not touch BPF maps
//! (the redirect module mirrors tags into the kernel) and does not decide
//! access (policy does).

pub mod autotag;
pub mod binding;
pub mod cgroup;
pub mod container;
pub mod oidc;
pub mod tags;

pub use binding::{IdentityBinder, IdentityError, ProvenIdentity};
pub use cgroup::{CgroupError, CgroupTree};
pub use tags::{Tag, TagError, TagStore};
