//! The one-time sign-in for demos (`[console] demo_sign_in`): a random
//! single-use token, made at start from the kernel's RNG, that signs its
//! holder in as one configured reviewer, for demos with no OIDC provider.
//!
//! Owns the token, its expiry, its use and the link file given to the
//! operator (`<state>/console-sign-in`, mode 0600, root's like the state
//! dir). It must not create sessions or decide anything itself: the
//! console turns a successful [`OneTime::redeem`] into an ordinary session
//! whose reviewer is still governed by Cedar.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
    time::{Duration, Instant},
};

/// How long the link works after the daemon started.
pub const ONE_TIME_TTL: Duration = Duration::from_secs(15 * 60);

/// The `Reviewer`'s `issuer` attribute for a one-time sign-in: no OIDC
/// issuer's URL can be it, so rules can tell such reviewers apart.
pub const ONE_TIME_ISSUER: &str = "urn:portcullis:one-time-sign-in";

/// The file in the state dir holding the one-time link.
pub const LINK_FILE: &str = "console-sign-in";

/// Why a one-time sign-in was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OnceError {
    /// The token is not the daemon's.
    #[error("the one-time sign-in token is wrong")]
    Wrong,
    /// The token was already used.
    #[error("the one-time sign-in link was already used")]
    Used,
    /// The token's time ran out.
    #[error(
        "the one-time sign-in link has expired (it works for 15 minutes after the daemon starts)"
    )]
    Expired,
}

/// The daemon's one-time sign-in token.
pub struct OneTime {
    token: String,
    expires: Instant,
    used: bool,
}

impl OneTime {
    /// A fresh token of 256 bits from getrandom(2), valid for `ttl`.
    pub fn generate(ttl: Duration) -> std::io::Result<Self> {
        let raw = crate::audit::random_seed()?;
        let token = raw.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self::with_token(token, Instant::now() + ttl))
    }

    fn with_token(token: String, expires: Instant) -> Self {
        Self {
            token,
            expires,
            used: false,
        }
    }

    /// The token, for the link given to the operator.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Spends the token when `presented` is it, unused and in time. A wrong
    /// token does not spend it; the comparison takes the same time whatever
    /// the presented token shares with the real one.
    pub fn redeem(&mut self, presented: &str, now: Instant) -> Result<(), OnceError> {
        if !super::web::same_secret(presented, &self.token) {
            return Err(OnceError::Wrong);
        }
        if self.used {
            return Err(OnceError::Used);
        }
        // Spent even when late: an expired link stays dead.
        self.used = true;
        if now >= self.expires {
            return Err(OnceError::Expired);
        }
        Ok(())
    }
}

/// Writes `link` to `<dir>/console-sign-in`, readable by the owner only
/// (an earlier file, or a link planted there, is replaced, never followed).
pub fn write_link(dir: &Path, link: &str) -> std::io::Result<std::path::PathBuf> {
    let path = dir.join(LINK_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(format!("{link}\n").as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_token_works_once() {
        let mut t = OneTime::generate(ONE_TIME_TTL).unwrap();
        let token = t.token().to_string();
        assert_eq!(token.len(), 64, "256 bits, hex");
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(t.redeem(&token, Instant::now()), Ok(()));
        assert_eq!(t.redeem(&token, Instant::now()), Err(OnceError::Used));
    }

    #[test]
    fn tokens_differ_between_starts() {
        let a = OneTime::generate(ONE_TIME_TTL).unwrap();
        let b = OneTime::generate(ONE_TIME_TTL).unwrap();
        assert_ne!(a.token(), b.token());
    }

    #[test]
    fn an_expired_token_is_refused_and_stays_dead() {
        let start = Instant::now();
        let mut t = OneTime::with_token("ab".repeat(32), start + Duration::from_secs(60));
        let late = start + Duration::from_secs(61);
        assert_eq!(t.redeem(&"ab".repeat(32), late), Err(OnceError::Expired));
        assert_eq!(t.redeem(&"ab".repeat(32), start), Err(OnceError::Used));
    }

    #[test]
    fn a_wrong_token_is_refused_and_does_not_spend_the_right_one() {
        let start = Instant::now();
        let real = "0123456789abcdef".repeat(4);
        let mut t = OneTime::with_token(real.clone(), start + ONE_TIME_TTL);
        // Same length differing in the last character, a prefix, longer,
        // empty, and another case of the same hex.
        let mut last = real.clone();
        last.pop();
        last.push('0');
        for wrong in [
            last.as_str(),
            &real[..63],
            &format!("{real}0"),
            "",
            &real.to_uppercase(),
        ] {
            assert_eq!(t.redeem(wrong, start), Err(OnceError::Wrong), "{wrong:?}");
        }
        assert_eq!(t.redeem(&real, start), Ok(()));
        // Once used, a wrong token is still just wrong (no oracle on use).
        assert_eq!(t.redeem(&last, start), Err(OnceError::Wrong));
    }

    #[test]
    fn the_comparison_looks_at_every_byte() {
        // `same_secret` folds every byte pair, so a mismatch at the first or
        // the last position is found alike (no early return on the first
        // differing byte: its running time depends only on the length).
        let real = "f".repeat(64);
        let first = format!("0{}", &real[1..]);
        let last = format!("{}0", &real[..63]);
        assert!(!super::super::web::same_secret(&first, &real));
        assert!(!super::super::web::same_secret(&last, &real));
        assert!(super::super::web::same_secret(&real.clone(), &real));
    }

    #[test]
    fn demo_sign_in_is_off_by_default_and_loopback_only() {
        let table = |listen: &str, extra: &str| -> super::super::ConsoleConfig {
            toml::from_str(&format!(
                "listen = \"{listen}\"\nissuer = \"corp\"\nclient_id = \"c\"\n\
                 redirect_url = \"https://127.0.0.1:15030/auth/callback\"\n{extra}"
            ))
            .unwrap()
        };
        let off = table("0.0.0.0:15030", "");
        assert_eq!(off.demo_sign_in, None);
        assert_eq!(off.check(), Ok(()));
        let on = "demo_sign_in = \"demo-reviewer\"";
        assert_eq!(table("127.0.0.1:15030", on).check(), Ok(()));
        assert_eq!(table("[::1]:15030", on).check(), Ok(()));
        for listen in ["0.0.0.0:15030", "192.0.2.7:15030", "[::]:15030"] {
            let err = table(listen, on).check().unwrap_err();
            assert!(err.contains("loopback"), "{listen}: {err}");
        }
        let err = table("127.0.0.1:15030", "demo_sign_in = \" \"")
            .check()
            .unwrap_err();
        assert!(err.contains("reviewer"), "{err}");
    }

    #[test]
    fn the_link_file_is_owner_only_and_replaced() {
        let dir = std::env::temp_dir().join(format!("pc-once-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let planted = dir.join("elsewhere");
        std::fs::write(&planted, "keep").unwrap();
        std::os::unix::fs::symlink(&planted, dir.join(LINK_FILE)).unwrap();
        let path = write_link(&dir, "https://127.0.0.1:15030/login/once?token=x").unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "https://127.0.0.1:15030/login/once?token=x\n"
        );
        assert_eq!(std::fs::read_to_string(&planted).unwrap(), "keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
