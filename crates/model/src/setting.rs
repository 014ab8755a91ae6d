//! The settings a user chooses, as library messages name them.
//!
//! A library error or warning that advises changing a setting writes it as
//! `` `damping` `` (the [`Setting`]'s `Display`), never as a command-line flag:
//! the same message reaches the command line, the Python package and other
//! library users, and each front end renders the quoted names its own way with
//! [`render_settings`] (the CLI as `--damping`, Python as `damping=`).

use std::fmt;

/// A user-facing setting named in advice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    Arch,
    BatchSize,
    Curvature,
    Damping,
    Depth,
    Dtype,
    Lr,
    MaxIter,
    Model,
    Params,
    PredictBatches,
    Rank,
    Retrain,
    Scale,
    Sizes,
    Solver,
    Steps,
    Tol,
    WeightDecay,
}

impl Setting {
    pub const ALL: [Setting; 19] = [
        Setting::Arch,
        Setting::BatchSize,
        Setting::Curvature,
        Setting::Damping,
        Setting::Depth,
        Setting::Dtype,
        Setting::Lr,
        Setting::MaxIter,
        Setting::Model,
        Setting::Params,
        Setting::PredictBatches,
        Setting::Rank,
        Setting::Retrain,
        Setting::Scale,
        Setting::Sizes,
        Setting::Solver,
        Setting::Steps,
        Setting::Tol,
        Setting::WeightDecay,
    ];

    /// The setting's name in the library and the Python package (snake case).
    pub fn name(self) -> &'static str {
        match self {
            Setting::Arch => "arch",
            Setting::BatchSize => "batch_size",
            Setting::Curvature => "curvature",
            Setting::Damping => "damping",
            Setting::Depth => "depth",
            Setting::Dtype => "dtype",
            Setting::Lr => "lr",
            Setting::MaxIter => "max_iter",
            Setting::Model => "model",
            Setting::Params => "params",
            Setting::PredictBatches => "predict_batches",
            Setting::Rank => "rank",
            Setting::Retrain => "retrain",
            Setting::Scale => "scale",
            Setting::Sizes => "sizes",
            Setting::Solver => "solver",
            Setting::Steps => "steps",
            Setting::Tol => "tol",
            Setting::WeightDecay => "weight_decay",
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.name())
    }
}

/// `message` with every quoted setting name replaced by `render(setting)`.
pub fn render_settings(message: &str, render: impl Fn(Setting) -> String) -> String {
    let mut out = message.to_string();
    for s in Setting::ALL {
        let quoted = s.to_string();
        if out.contains(&quoted) {
            out = out.replace(&quoted, &render(s));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_render_as_flags_and_unknown_quotes_stay() {
        let msg = format!(
            "raise {} or use {} pcg; `other` stays",
            Setting::MaxIter,
            Setting::Solver
        );
        assert_eq!(msg, "raise `max_iter` or use `solver` pcg; `other` stays");
        let cli = render_settings(&msg, |s| format!("--{}", s.name().replace('_', "-")));
        assert_eq!(cli, "raise --max-iter or use --solver pcg; `other` stays");
    }
}
