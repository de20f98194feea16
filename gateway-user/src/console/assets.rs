//! Third-party static assets embedded in the daemon: the asciinema player
//! (SSH replay), vendored unmodified with its licence under
//! `assets/asciinema-player/` (its README says where each file came from).
//!
//! Owns the assets' bytes, their versioned URLs and content types. It must
//! not decide who sees them (the console's router serves them only to a
//! signed-in reviewer, like every other path).

/// The vendored player's version; part of its URLs, so a new version is a
/// new URL and the long cache lifetime is safe.
pub const PLAYER_VERSION: &str = "3.18.0";

/// The player's browser bundle (it defines the global `AsciinemaPlayer`).
pub const PLAYER_JS: &[u8] = include_bytes!("assets/asciinema-player/asciinema-player.min.js");
/// The player's stylesheet.
pub const PLAYER_CSS: &[u8] = include_bytes!("assets/asciinema-player/asciinema-player.css");
/// The player's licence (Apache-2.0), served next to it.
pub const PLAYER_LICENSE: &[u8] = include_bytes!("assets/asciinema-player/LICENSE");

/// The player bundle's path.
pub fn player_js_path() -> String {
    format!("/static/asciinema-player-{PLAYER_VERSION}.min.js")
}

/// The player stylesheet's path.
pub fn player_css_path() -> String {
    format!("/static/asciinema-player-{PLAYER_VERSION}.css")
}

/// The player licence's path.
pub fn player_license_path() -> String {
    format!("/static/asciinema-player-{PLAYER_VERSION}.LICENSE.txt")
}

/// The embedded asset at `path`: its content type and bytes.
pub fn lookup(path: &str) -> Option<(&'static str, &'static [u8])> {
    if path == player_js_path() {
        Some(("text/javascript; charset=utf-8", PLAYER_JS))
    } else if path == player_css_path() {
        Some(("text/css; charset=utf-8", PLAYER_CSS))
    } else if path == player_license_path() {
        Some(("text/plain; charset=utf-8", PLAYER_LICENSE))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_player_is_embedded_whole_with_its_licence() {
        let (ct, js) = lookup(&player_js_path()).unwrap();
        assert!(ct.starts_with("text/javascript"));
        // The bundle is the IIFE that defines the global the page calls.
        assert!(std::str::from_utf8(js)
            .unwrap()
            .contains("var AsciinemaPlayer="));
        let (ct, css) = lookup(&player_css_path()).unwrap();
        assert!(ct.starts_with("text/css"));
        assert!(std::str::from_utf8(css).unwrap().contains(".ap-player"));
        let (_, lic) = lookup(&player_license_path()).unwrap();
        assert!(std::str::from_utf8(lic).unwrap().contains("Apache License"));
        assert!(lookup("/static/asciinema-player-0.0.1.min.js").is_none());
    }
}
