//! `hvp params`: the trainable parameters of an ONNX model, and which ones a
//! `--params` glob selects.

use anyhow::Result;
use clap::Args;
use hvp_onnx::Role;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ParamsArgs {
    /// The ONNX model.
    #[arg(long)]
    pub model: PathBuf,
    /// Show which parameters this glob selects (as --params does in other commands).
    #[arg(long)]
    pub params: Option<String>,
}

pub fn run(a: ParamsArgs) -> Result<()> {
    let options = hvp_onnx::ImportOptions {
        params_glob: a.params.clone(),
    };
    let imported = match hvp_onnx::load(&a.model, &options) {
        // The initializers are classified before the operators are read:
        // show what would be differentiated, then why the model cannot be used yet.
        Err(e @ hvp_onnx::OnnxError::UnsupportedOps { .. }) => {
            if let hvp_onnx::OnnxError::UnsupportedOps { initializers, .. } = &e {
                print_table(initializers, &|info| info.role == Role::Parameter);
                println!(
                    "(the roles the initializers would have; the model cannot be imported until its operators are)"
                );
            }
            return Err(e.into());
        }
        other => other?,
    };
    for w in &imported.warnings {
        eprintln!("warning: {}: {}", a.model.display(), crate::output::as_flags(w));
    }
    let selected: Vec<&str> = imported.model.param_names();
    let (total, chosen) = print_table(&imported.initializers, &|info| selected.contains(&info.name.as_str()));
    println!(
        "{} of {} parameter tensors trainable: {chosen} of {total} scalars; {} constant buffers (running statistics, shape constants, frozen weights)",
        selected.len(),
        imported.candidates.len(),
        imported.model.buffers.len()
    );
    Ok(())
}

/// The initializers as a Markdown table; returns (parameter scalars, trainable scalars).
fn print_table(
    initializers: &[hvp_onnx::InitializerInfo],
    trainable: &dyn Fn(&hvp_onnx::InitializerInfo) -> bool,
) -> (usize, usize) {
    println!("| initializer | shape | elements | trainable | role | why |");
    println!("|---|---|---|---|---|---|");
    let (mut total, mut chosen) = (0usize, 0usize);
    for info in initializers {
        let n: usize = info.shape.iter().product();
        let on = trainable(info);
        if matches!(info.role, Role::Parameter | Role::Frozen) {
            total += n;
        }
        if on {
            chosen += n;
        }
        let role = match info.role {
            Role::Parameter => "parameter",
            Role::Frozen => "frozen",
            Role::Buffer => "buffer",
            Role::Constant => "constant",
        };
        println!(
            "| {} | {:?} | {n} | {} | {role} | {} |",
            info.name,
            info.shape,
            if on { "yes" } else { "no" },
            info.reason
        );
    }
    (total, chosen)
}
