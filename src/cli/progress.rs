//! Progress of long `apply` and `diff` runs: a bar on stderr (indicatif) with the phase
//! (observe, dry-run, apply, certificates), the objects done of the phase's total and the
//! environments it covers. Drawn only when stderr is a terminal and the output is not JSON;
//! otherwise nothing at all is printed.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::PlanFormat;
use crate::vocab::{Phase, Progress, ProgressHandle};

struct Bar(Mutex<Option<ProgressBar>>);

fn style(total: u64) -> ProgressStyle {
    let template = if total == 0 {
        "{spinner} {msg} ({elapsed})"
    } else {
        "{spinner} {msg} [{bar:30}] {pos}/{len} objects ({elapsed}, {eta} left)"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Progress for Bar {
    fn phase(&self, phase: Phase, environments: usize, total: u64) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bar = slot.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        bar.set_style(style(total));
        bar.set_length(total);
        bar.set_position(0);
        bar.set_message(format!("{}: {environments} environment(s)", phase.as_str()));
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            bar.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

/// A progress bar for a run whose output is `format`, or `None` when nothing may be drawn.
pub fn bar(format: PlanFormat) -> Option<ProgressHandle> {
    (format == PlanFormat::Text && std::io::stderr().is_terminal())
        .then(|| ProgressHandle(Arc::new(Bar(Mutex::new(None)))))
}
