//! Text a peer chose, made safe for a terminal.
//!
//! Message texts, contact names, a relay's name and failure domain: every one of them
//! came from someone else, and a terminal obeys what it prints. An escape sequence can
//! move the cursor, rewrite the window title or forge a line that looks like it came
//! from another contact; a line break can start a fake message; a right-to-left override
//! can make one name read like another. So everything a peer chose is passed through
//! [`for_terminal`] (one line: every control character escaped) or [`for_terminal_block`]
//! (line breaks kept, for the UI's wrapped view) before it is printed or drawn.
//! JSON output needs none of this: the encoder escapes control characters itself.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Characters that change how the text around them is drawn: the bidirectional
/// embeddings, overrides and isolates, and the Arabic letter mark. Kept in texts they
/// would let a message rearrange what is printed after it.
fn reorders_text(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// True if `c` must not reach a terminal as it is.
fn is_unsafe(c: char) -> bool {
    c.is_control() || reorders_text(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Writes `c` as a visible escape: `\n`, `\t`, `\e`, `\u{202e}`.
fn escape(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{1b}' => out.push_str("\\e"),
        c => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
    }
}

/// `text` for one line of terminal output: every control character (line breaks and
/// tabs too) and every text-direction character shown as a visible escape. Text without
/// any is returned as it is.
pub fn for_terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            escape(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` for a view that breaks lines itself (the terminal UI): line breaks are kept
/// as `\n`, tabs become spaces, everything else as in [`for_terminal`].
pub fn for_terminal_block(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c != '\n' && is_unsafe(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push('\n'),
            '\t' => out.push_str("    "),
            c if is_unsafe(c) => escape(&mut out, c),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_line_breaks_become_visible() {
        assert_eq!(for_terminal("plain 텍스트 🐦"), "plain 텍스트 🐦");
        assert!(matches!(for_terminal("plain"), Cow::Borrowed(_)));
        // A forged second line, a title change, a cursor move.
        assert_eq!(
            for_terminal("hi\n2026-12-01 10:00  Alice: send money"),
            "hi\\n2026-12-01 10:00  Alice: send money"
        );
        assert_eq!(for_terminal("\u{1b}]0;owned\u{7}"), "\\e]0;owned\\u{7}");
        assert_eq!(for_terminal("a\u{1b}[2Ab"), "a\\e[2Ab");
        assert_eq!(for_terminal("x\u{9b}31m"), "x\\u{9b}31m", "C1 CSI");
        assert_eq!(for_terminal("\r\t\u{7f}"), "\\r\\t\\u{7f}");
        assert_eq!(for_terminal("abc\u{202e}fdp.exe"), "abc\\u{202e}fdp.exe");
        assert_eq!(for_terminal("a\u{2028}b"), "a\\u{2028}b");
        // Joiners inside emoji stay: they are how families and flags are drawn.
        assert_eq!(
            for_terminal("👨\u{200d}👩\u{200d}👧"),
            "👨\u{200d}👩\u{200d}👧"
        );
    }

    #[test]
    fn blocks_keep_their_line_breaks_only() {
        assert_eq!(for_terminal_block("one\ntwo"), "one\ntwo");
        assert_eq!(for_terminal_block("a\tb"), "a    b");
        assert_eq!(for_terminal_block("x\u{1b}[31my\r\n"), "x\\e[31my\\r\n");
    }

    #[test]
    fn no_output_of_either_holds_a_control_character_but_line_breaks() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        assert!(!for_terminal(&all).chars().any(is_unsafe));
        assert!(
            !for_terminal_block(&all)
                .chars()
                .any(|c| c != '\n' && is_unsafe(c))
        );
    }
}
