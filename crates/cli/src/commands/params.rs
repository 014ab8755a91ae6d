//! `hvp params`: the trainable parameters of an ONNX model, and which ones a
//! `--params` glob selects.

use anyhow::Result;
use clap::Args;
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
        eprintln!("warning: {}: {w}", a.model.display());
    }
    let selected: Vec<&str> = imported.model.param_names();
    println!("| parameter | shape | elements | trainable |");
    println!("|---|---|---|---|");
    let (mut total, mut chosen) = (0usize, 0usize);
    for (name, shape) in &imported.candidates {
        let n: usize = shape.iter().product();
        let on = selected.contains(&name.as_str());
        total += n;
        if on {
            chosen += n;
        }
        println!("| {name} | {shape:?} | {n} | {} |", if on { "yes" } else { "no" });
    }
    println!(
        "{} of {} parameter tensors trainable: {chosen} of {total} scalars; {} constant buffers (running statistics, shape constants, frozen weights)",
        selected.len(),
        imported.candidates.len(),
        imported.model.buffers.len()
    );
    Ok(())
}
