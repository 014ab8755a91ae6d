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
    let imported = hvp_onnx::load(
        &a.model,
        &hvp_onnx::ImportOptions {
            params_glob: a.params.clone(),
        },
    )?;
    for w in &imported.warnings {
        eprintln!("warning: {}: {}", a.model.display(), crate::output::as_flags(w));
    }
    let selected: Vec<&str> = imported.model.param_names();
    println!("| initializer | shape | elements | trainable | role | why |");
    println!("|---|---|---|---|---|---|");
    let (mut total, mut chosen) = (0usize, 0usize);
    for info in &imported.initializers {
        let n: usize = info.shape.iter().product();
        let on = selected.contains(&info.name.as_str());
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
    println!(
        "{} of {} parameter tensors trainable: {chosen} of {total} scalars; {} constant buffers (running statistics, shape constants, frozen weights)",
        selected.len(),
        imported.candidates.len(),
        imported.model.buffers.len()
    );
    Ok(())
}
