//! Progress bars for long work: drawn on a terminal, silent in pipes and logs.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// A bar over `total` units with `template` (indicatif syntax; `{rate}` is units/s as a whole
/// number, followed by `unit`).
pub fn bar(total: u64, template: &str, unit: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").with_key(
        "rate",
        move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0} {unit}/s", state.per_sec());
        },
    ));
    bar
}
