//! The terminal UI.

use std::path::Path;

use crate::commands::UserError;

/// Runs the terminal UI for `home`.
pub async fn run(home: &Path) -> Result<(), UserError> {
    Err(UserError(format!(
        "the terminal UI is not part of this build yet; use `kkachi --home {} daemon` to stay online and the other commands to chat",
        home.display()
    )))
}
