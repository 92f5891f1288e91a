//! Text a peer chose, made safe for a terminal.
//!
//! Message texts, contact names, a relay's name and failure domain: every one of them
//! came from someone else, and a terminal obeys what it prints. An escape sequence can
//! move the cursor, rewrite the window title or forge a line that looks like it came
//! from another contact; a line break can start a fake message; a right-to-left override
//! can make one name read like another. So everything a peer chose is passed through
//! [`for_terminal`] (one line: every control character escaped) or [`for_terminal_block`]
//! (line breaks kept, for the UI's wrapped view) before it is printed or drawn. A long
//! run of spaces is shortened too: wrapped by the terminal, it would start what looks
//! like a line of its own. JSON output goes through [`json`], which escapes what the
//! JSON encoder leaves raw (DEL, the C1 controls, text-direction characters).

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

/// Runs of white space longer than this are shortened in one-line output.
const LONGEST_SPACE: usize = 16;

/// True if `text` holds a run of more than [`LONGEST_SPACE`] white space characters.
fn has_long_space(text: &str) -> bool {
    let mut run = 0;
    for c in text.chars() {
        run = if c.is_whitespace() { run + 1 } else { 0 };
        if run > LONGEST_SPACE {
            return true;
        }
    }
    false
}

/// `text` for one line of terminal output: every control character (line breaks and
/// tabs too) and every text-direction character shown as a visible escape, and a run
/// of more than 16 spaces shown as `[N spaces]`. Text without any is returned as it is.
pub fn for_terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) && !has_long_space(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut spaces = 0usize;
    let flush = |out: &mut String, spaces: &mut usize| {
        if *spaces > LONGEST_SPACE {
            let _ = write!(out, " [{spaces} spaces] ");
        } else {
            out.extend(std::iter::repeat_n(' ', *spaces));
        }
        *spaces = 0;
    };
    for c in text.chars() {
        if c == ' ' || (c.is_whitespace() && !is_unsafe(c)) {
            spaces += 1;
            continue;
        }
        flush(&mut out, &mut spaces);
        if is_unsafe(c) {
            escape(&mut out, c);
        } else {
            out.push(c);
        }
    }
    flush(&mut out, &mut spaces);
    Cow::Owned(out)
}

/// `value` as one line of JSON in which nothing can steer a terminal: what the encoder
/// leaves raw inside strings (DEL, C1 controls, text-direction characters, line and
/// paragraph separators) is written as `\uXXXX` escapes, which every JSON reader
/// reads back as the same characters. Outside strings JSON is plain ASCII, so every
/// such character met is inside one.
pub fn json(value: &serde_json::Value) -> String {
    let raw = value.to_string();
    if !raw.chars().any(is_unsafe) {
        return raw;
    }
    let mut out = String::with_capacity(raw.len() + 16);
    for c in raw.chars() {
        if is_unsafe(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
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
    fn long_runs_of_spaces_cannot_fake_a_new_line() {
        let padded = format!("hi{}2026-12-01 10:00  Alice: send money", " ".repeat(200));
        assert_eq!(
            for_terminal(&padded),
            "hi [200 spaces] 2026-12-01 10:00  Alice: send money"
        );
        assert_eq!(for_terminal("a    b"), "a    b", "short runs stay");
        assert_eq!(for_terminal(&" ".repeat(16)), " ".repeat(16));
    }

    #[test]
    fn json_escapes_what_the_encoder_leaves_raw_and_reads_back_the_same() {
        let text = "a\u{7f}b\u{9b}31mc\u{202e}d\u{2028}e\u{1b}f 지우";
        let value = serde_json::json!({ "text": text });
        let line = json(&value);
        assert!(!line.chars().any(is_unsafe), "{line}");
        assert!(
            line.contains("\\u009b") && line.contains("\\u202e"),
            "{line}"
        );
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["text"], text);
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
