//! `hvp`: exact, streamed Hessian-vector products of a network's training loss.

mod allocator;
mod args;
mod checks;
mod commands;
mod output;
mod picture;
mod report;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exact Hessian-vector products (forward-over-reverse), GGN products and gradients
/// of a neural network's training loss, streamed over the data in batches.
///
/// The loss is softmax cross-entropy, averaged over all N examples. BatchNorm
/// always uses its running statistics (eval mode): with batch statistics the loss
/// of one example would depend on its batch-mates, so the Hessian would depend on
/// how the data is batched and a streamed sum would not be the full-batch Hessian.
#[derive(Parser)]
#[command(name = "hvp", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write PyTorch-like initial weights, or a random N(0,1) direction vector.
    Init(commands::init::InitArgs),
    /// Gradient of the mean training loss.
    Grad(commands::grad::GradArgs),
    /// Curvature-vector product: Hessian (exact) or GGN, over the whole dataset.
    ///
    /// M·v for M the Hessian (forward-over-reverse), the GGN Jᵀ H_out J or the empirical
    /// Fisher of the mean softmax cross-entropy over all N examples, streamed in
    /// batches and summed in f64. BatchNorm uses its running statistics (eval mode), so
    /// the loss is a sum over examples and the streamed product is the full-batch one.
    Product(commands::product::ProductArgs),
    /// Inverse curvature product x = (M + λI)⁻¹ g by direct, cg, lissa, arnoldi, kfac, ekfac or pcg.
    Solve(commands::solve::SolveArgs),
    /// K-FAC / EK-FAC factors, computed once and saved for the kfac, ekfac and pcg solvers.
    Factors(commands::factors::FactorsArgs),
    /// Every solver on one problem against CG run to convergence.
    CompareSolvers(commands::compare_solvers::CompareArgs),
    /// Extreme eigenvalues and trace of the curvature.
    Spectrum(commands::spectrum::SpectrumArgs),
    /// Error of curvature products (and inverse products) on random subsets.
    SubsampleError(commands::subsample_error::SubsampleArgs),
    /// Train a built-in architecture (BatchNorm in train mode while training).
    Train(commands::train::TrainArgs),
    /// Influence of every training example on test predictions (positive = helpful).
    ///
    /// Convention: score(i, t) = ∇ℓ(z_t)ᵀ (M + λI)⁻¹ ∇ℓ(z_i) / N, the predicted increase
    /// of test example t's loss if training example i is removed and the model
    /// retrained. Positive = helpful (removing it hurts), negative = harmful. M is the
    /// Hessian (or GGN/Fisher, --curvature) of the mean training loss plus w·I for
    /// --weight-decay w; s_test = (M + λI)⁻¹ ∇ℓ(z_t) comes from --solver, and the
    /// scores of all training examples from one forward-mode pass per test point.
    Influence(commands::influence::InfluenceArgs),
    /// Self-influence of every training example (finds mislabelled examples).
    SelfInfluence(commands::self_influence::SelfInfluenceArgs),
    /// Predicted against actual leave-one-out changes of a test loss.
    Validate(commands::validate::ValidateArgs),
    /// The bundled Fashion-MNIST experiment: HVP cost against N, subset accuracy.
    Demo(commands::demo::DemoArgs),
    /// Benchmark gradient, HVP and GGN on the seed ResNet with CIFAR-shaped data.
    Bench(commands::bench::BenchArgs),
    /// List the trainable parameters of an ONNX model (and what --params selects).
    Params(commands::params::ParamsArgs),
}

fn main() -> ExitCode {
    allocator::keep_freed_pages();
    let _mpi = hvp_dist::init();
    let cli = Cli::parse();
    // Load the GEMM library now, while this is the only thread: loading sets
    // OpenMP's wait policy in the environment.
    let _ = hvp_tensor::onednn::gemm_backend();
    if let Err(e) = hvp_tensor::onednn::check_requested_backend() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Init(a) => commands::init::run(a),
        Command::Grad(a) => commands::grad::run(a),
        Command::Product(a) => commands::product::run(a),
        Command::Solve(a) => commands::solve::run(a),
        Command::Factors(a) => commands::factors::run(a),
        Command::CompareSolvers(a) => commands::compare_solvers::run(a),
        Command::Spectrum(a) => commands::spectrum::run(a),
        Command::SubsampleError(a) => commands::subsample_error::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Influence(a) => commands::influence::run(a),
        Command::SelfInfluence(a) => commands::self_influence::run(a),
        Command::Validate(a) => commands::validate::run(a),
        Command::Demo(a) => commands::demo::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Params(a) => commands::params::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // In a multi-process job an error on any rank aborts them all.
        Err(e) if hvp_dist::is_distributed() => hvp_dist::fail(&output::as_flags(&format!("error: {e:#}")), 1),
        Err(e) => {
            eprintln!("error: {}", output::as_flags(&error_chain(&e)));
            let solver_failed = matches!(
                e.downcast_ref::<hvp_solvers::SolverError>(),
                Some(hvp_solvers::SolverError::Diverged(_) | hvp_solvers::SolverError::Dense(_))
            );
            if solver_failed || e.downcast_ref::<commands::solve::SolveFailed>().is_some() {
                ExitCode::from(commands::solve::EXIT_SOLVE_FAILED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, each cause once: library errors often
/// quote their source in their own message already.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
