//! Pictures drawn with the terminal's own graphics where it has them (kitty's, sixel,
//! iTerm2's), over the half blocks every terminal can show: the half blocks hold the
//! picture's place in the conversation, so a message list lays out the same whatever
//! the terminal, and a terminal without graphics shows them as they are.
//!
//! Only pixels this client decoded itself (under the bounds of
//! [`crate::files::picture::pixels`]) reach the terminal, encoded here: nothing a
//! contact sent is passed through.

use std::fmt;
use std::sync::{Arc, OnceLock};

use image::{DynamicImage, RgbImage};
use ratatui::buffer::Buffer;
use ratatui::layout::{Rect, Size};
use ratatui::widgets::Widget;
use ratatui_image::Resize;
use ratatui_image::picker::{Picker, ProtocolType};
use ratatui_image::sliced::{SignedPosition, SlicedImage, SlicedProtocol};

/// Names the graphics to draw pictures with, instead of asking the terminal.
pub const GRAPHICS_ENV: &str = "KKACHI_GRAPHICS";

/// How this terminal draws pictures, found once when the UI starts.
static PICKER: OnceLock<Picker> = OnceLock::new();

/// The graphics a `KKACHI_GRAPHICS` value names, or why it names none.
pub fn parse(value: &str) -> Result<ProtocolType, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "kitty" => Ok(ProtocolType::Kitty),
        "sixel" => Ok(ProtocolType::Sixel),
        "iterm2" | "iterm" => Ok(ProtocolType::Iterm2),
        "halfblocks" | "half-blocks" | "blocks" | "off" | "none" => Ok(ProtocolType::Halfblocks),
        other => Err(format!(
            "{GRAPHICS_ENV}={other:?} names no graphics: use kitty, sixel, iterm2 or halfblocks"
        )),
    }
}

/// Finds how this terminal draws pictures, once: as `KKACHI_GRAPHICS` says if set
/// (`halfblocks` asks the terminal nothing), else by asking a terminal that says it
/// may draw pictures (its answer also gives the size of a cell in pixels); any other
/// gets half blocks without being asked. Must run after the UI has taken the screen
/// and before anything reads keys: the answer comes in as input. A terminal that does
/// not answer gets half blocks. Returns what was chosen.
pub fn detect() -> ProtocolType {
    let forced = std::env::var(GRAPHICS_ENV).ok().map(|v| parse(&v));
    let picker = match forced {
        Some(Ok(ProtocolType::Halfblocks)) => Picker::halfblocks(),
        Some(Ok(kind)) => {
            // Asked for the cell size only where an answer can come back.
            let mut picker = if inside_tmux_without_passthrough() {
                Picker::halfblocks()
            } else {
                Picker::from_query_stdio().unwrap_or_else(|_| Picker::halfblocks())
            };
            picker.set_protocol_type(kind);
            picker
        }
        Some(Err(why)) => {
            tracing::warn!("{why}; drawing pictures with half blocks");
            Picker::halfblocks()
        }
        // Only a terminal that says it may draw pictures is asked: one that does not
        // answer would leave the question's reader waiting for input, taking the
        // first keys. tmux passes the question on only when allowed to.
        None if !may_draw_pictures() || inside_tmux_without_passthrough() => Picker::halfblocks(),
        None => Picker::from_query_stdio().unwrap_or_else(|e| {
            tracing::info!(error = %e, "the terminal did not say how it draws pictures");
            Picker::halfblocks()
        }),
    };
    let kind = picker.protocol_type();
    tracing::info!(graphics = ?kind, font = ?picker.font_size(), "pictures");
    let _ = PICKER.set(picker);
    kind
}

/// Whether the environment names a terminal that draws pictures (kitty, WezTerm,
/// iTerm2, foot, Ghostty, Konsole, mlterm, contour, mintty, VS Code's): only those are
/// asked which graphics they have.
fn may_draw_pictures() -> bool {
    let var = |name: &str| std::env::var(name).unwrap_or_default().to_ascii_lowercase();
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let term = var("TERM");
    let program = var("TERM_PROGRAM");
    set("KITTY_WINDOW_ID")
        || set("WEZTERM_EXECUTABLE")
        || set("KONSOLE_VERSION")
        || set("GHOSTTY_RESOURCES_DIR")
        || var("LC_TERMINAL") == "iterm2"
        || ["kitty", "foot", "wezterm", "ghostty", "mlterm", "contour"]
            .iter()
            .any(|t| term.contains(t))
        || ["iterm.app", "wezterm", "ghostty", "mintty", "vscode"].contains(&program.as_str())
}

/// Whether we run inside tmux with its `allow-passthrough` off (as by default), when
/// no graphics reach the terminal and no question about them is answered.
fn inside_tmux_without_passthrough() -> bool {
    if std::env::var_os("TMUX").is_none() {
        return false;
    }
    let mut tmux = std::process::Command::new("tmux");
    tmux.args(["show-options", "-A", "-p", "-v"]);
    if let Ok(pane) = std::env::var("TMUX_PANE") {
        tmux.args(["-t", &pane]);
    }
    match tmux.arg("allow-passthrough").output() {
        Ok(o) if o.status.success() => {
            !matches!(String::from_utf8_lossy(&o.stdout).trim(), "on" | "all")
        }
        _ => true,
    }
}

/// A picture encoded for the terminal's graphics, to be drawn over its half blocks.
#[derive(Clone)]
pub struct Graphic(Arc<SlicedProtocol>);

impl fmt::Debug for Graphic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = self.size();
        write!(f, "Graphic({}x{} cells)", size.width, size.height)
    }
}

/// The same graphic, not another one that looks alike.
impl PartialEq for Graphic {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Graphic {}

impl Graphic {
    /// `picture` for this terminal's graphics, in the place its half blocks take
    /// (`cells`: columns and rows); `None` where the terminal has no graphics (found
    /// by [`detect`]; never before it ran, as in tests).
    pub fn new(picture: &RgbImage, cells: Size) -> Option<Graphic> {
        Graphic::with(PICKER.get()?, picture, cells)
    }

    /// As [`Graphic::new`], with the graphics `picker` chose.
    pub fn with(picker: &Picker, picture: &RgbImage, cells: Size) -> Option<Graphic> {
        if picker.protocol_type() == ProtocolType::Halfblocks
            || cells.width == 0
            || cells.height == 0
        {
            return None;
        }
        // Scaled to fill the place (a preview is small; the terminal's pixels are many).
        let resize = Resize::Scale(Some(image::imageops::FilterType::Triangle));
        let image = DynamicImage::ImageRgb8(picture.clone());
        match SlicedProtocol::new_with_resize(picker, image, cells, resize) {
            Ok(p) => Some(Graphic(Arc::new(p))),
            Err(e) => {
                tracing::warn!(error = %e, "a picture could not be encoded for the terminal");
                None
            }
        }
    }

    /// The columns and rows it covers.
    pub fn size(&self) -> Size {
        self.0.size()
    }

    /// Draws it into `area` at `x` columns from its left and `y` rows from its top,
    /// `y` negative when its upper rows are scrolled out; only the rows inside
    /// `area` are drawn.
    pub fn draw(&self, buf: &mut Buffer, area: Rect, x: u16, y: i32) {
        let clamp = |v: i32| v.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16;
        let at = SignedPosition::from((clamp(i32::from(x)), clamp(y)));
        SlicedImage::new(&self.0, at).render(area, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_names_each_kind_and_refuses_the_rest_saying_what_works() {
        assert_eq!(parse("kitty"), Ok(ProtocolType::Kitty));
        assert_eq!(parse(" Sixel "), Ok(ProtocolType::Sixel));
        assert_eq!(parse("iterm2"), Ok(ProtocolType::Iterm2));
        assert_eq!(parse("off"), Ok(ProtocolType::Halfblocks));
        let why = parse("png").unwrap_err();
        assert!(why.contains("kitty, sixel, iterm2 or halfblocks"), "{why}");
    }

    #[test]
    fn half_blocks_need_no_graphic() {
        let picture = RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]));
        assert!(Graphic::with(&Picker::halfblocks(), &picture, Size::new(4, 2)).is_none());
        // And before the terminal was asked, there is none either.
        assert!(PICKER.get().is_none() && Graphic::new(&picture, Size::new(4, 2)).is_none());
    }
}
