//! Invite codes as QR codes drawn with Unicode half blocks (two rows per line).

use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;

/// The QR code of `text`, as lines of text.
pub fn render(text: &str) -> Result<String, qrcode::types::QrError> {
    let code = QrCode::new(text.as_bytes())?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_a_square_of_half_blocks() {
        let out = super::render("kk1example").unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.len() > 10);
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() == lines[0].chars().count())
        );
        assert!(out.contains('█') || out.contains('▀') || out.contains('▄'));
    }
}
