//! Built-in architectures as [`Graph`]s of hvp's primitives, with named, shaped
//! parameters in PyTorch's `state_dict` naming, weights read from and written to
//! safetensors, and parameter-space vectors.
//!
//! ```
//! use hvp_model::{Architecture, Model, Weights};
//! let arch: Architecture = "mlp:4,8,3".parse().unwrap();
//! let model = Model::new(&arch, 1).unwrap();
//! assert_eq!(model.param_names(), vec!["0.weight", "0.bias", "2.weight", "2.bias"]);
//! let w = Weights::init(&model, 0);
//! assert_eq!(w.params[0].shape(), &[8, 4]);
//! ```

mod arch;
mod error;
pub mod io;
pub mod setting;
mod vector;
mod weights;

pub use arch::{Architecture, Init, Model, ParamSpec, MAX_BUILTIN_PARAMS};
pub use error::ModelError;
pub use setting::{render_settings, Setting};
pub use vector::ParamVector;
pub use weights::Weights;
