use crate::ModelError;
use hvp_autodiff::{op, Graph, NodeId, Op};
use hvp_tensor::conv::ConvGeometry;
use std::fmt;
use std::str::FromStr;

/// A built-in architecture, parsed from `--arch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `resnet-cifar:A,B,C`: CIFAR ResNet with A, B, C basic blocks at 16/32/64
    /// channels; `resnet-cifar-tanh:…` uses tanh (smooth, for finite differences).
    ResNetCifar { blocks: [usize; 3], tanh: bool },
    /// `mlp:D,H1,…,C` (ReLU) — also `logreg:D,C`; `mlp-tanh:…` uses tanh (smooth,
    /// for finite-difference checks).
    Mlp { sizes: Vec<usize>, tanh: bool },
    /// A graph imported from an ONNX file (`--model`), named after the file;
    /// `input_shape` is one example's shape (without the batch dimension).
    /// `token_vocab`: the input holds integer token ids, valid below this bound
    /// (the rows of the smallest embedding table they index).
    Onnx {
        name: String,
        input_shape: Vec<usize>,
        token_vocab: Option<usize>,
    },
}

fn parse_list(spec: &str, list: &str) -> Result<Vec<usize>, ModelError> {
    list.split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| ModelError::BadArch {
                    spec: spec.to_string(),
                    reason: format!("'{s}' is not a positive integer"),
                })
        })
        .collect()
}

impl FromStr for Architecture {
    type Err = ModelError;
    fn from_str(spec: &str) -> Result<Self, ModelError> {
        let (kind, list) = spec
            .split_once(':')
            .ok_or_else(|| ModelError::UnknownArch(spec.to_string()))?;
        let nums = parse_list(spec, list)?;
        let bad = |reason: &str| ModelError::BadArch {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        match kind {
            "resnet-cifar" | "resnet-cifar-tanh" => {
                let blocks: [usize; 3] = nums
                    .try_into()
                    .map_err(|_| bad("give three block counts, e.g. resnet-cifar:2,2,2"))?;
                if let Some(&b) = blocks.iter().find(|&&b| b > MAX_BLOCKS) {
                    return Err(bad(&format!(
                        "{b} blocks in a stage; at most {MAX_BLOCKS} are supported"
                    )));
                }
                Ok(Architecture::ResNetCifar {
                    blocks,
                    tanh: kind == "resnet-cifar-tanh",
                })
            }
            "mlp" | "mlp-tanh" => {
                if nums.len() < 2 {
                    return Err(bad("give at least the input size and the number of classes"));
                }
                check_mlp_size(&nums).map_err(|r| bad(&r))?;
                Ok(Architecture::Mlp {
                    sizes: nums,
                    tanh: kind == "mlp-tanh",
                })
            }
            "logreg" => {
                if nums.len() != 2 {
                    return Err(bad("give the input size and the number of classes, e.g. logreg:784,10"));
                }
                check_mlp_size(&nums).map_err(|r| bad(&r))?;
                Ok(Architecture::Mlp {
                    sizes: nums,
                    tanh: false,
                })
            }
            _ => Err(ModelError::UnknownArch(spec.to_string())),
        }
    }
}

/// Most residual blocks per stage of `resnet-cifar`.
const MAX_BLOCKS: usize = 1000;

/// Most parameters of a built-in architecture (8 GB as f64 weights, before the
/// vectors and activations a run needs besides).
pub const MAX_BUILTIN_PARAMS: usize = 1 << 30;

/// Checks an MLP's layer sizes with checked arithmetic: its parameter count
/// must exist and stay below [`MAX_BUILTIN_PARAMS`].
fn check_mlp_size(sizes: &[usize]) -> Result<(), String> {
    let mut total = 0usize;
    for w in sizes.windows(2) {
        let layer = w[0]
            .checked_mul(w[1])
            .and_then(|m| m.checked_add(w[1]))
            .ok_or_else(|| format!("a {}x{} layer overflows", w[1], w[0]))?;
        total = total.checked_add(layer).ok_or("the parameter count overflows")?;
    }
    if total > MAX_BUILTIN_PARAMS {
        return Err(format!(
            "{total} parameters; built-in architectures are limited to {MAX_BUILTIN_PARAMS}"
        ));
    }
    Ok(())
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        match self {
            Architecture::ResNetCifar { blocks, tanh } => {
                write!(
                    f,
                    "{}:{}",
                    if *tanh { "resnet-cifar-tanh" } else { "resnet-cifar" },
                    join(blocks)
                )
            }
            Architecture::Mlp { sizes, tanh } => {
                write!(f, "{}:{}", if *tanh { "mlp-tanh" } else { "mlp" }, join(sizes))
            }
            Architecture::Onnx { name, .. } => write!(f, "onnx:{name}"),
        }
    }
}

/// Kind of initialisation a parameter gets (PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// U(−1/√fan_in, 1/√fan_in): Linear/Conv weight and bias.
    FanIn(usize),
    Ones,
    Zeros,
}

/// A named tensor of the model (parameter or buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An architecture instantiated: its graph, trainable parameters (the Hessian's
/// variables, in `state_dict` order) and buffers (BatchNorm running statistics).
#[derive(Clone, Debug)]
pub struct Model {
    pub arch: Architecture,
    pub graph: Graph,
    pub params: Vec<ParamSpec>,
    pub buffers: Vec<ParamSpec>,
    /// Shape of one example (without the batch dimension), where fixed.
    pub input_channels: usize,
    pub num_classes: usize,
}

struct Builder {
    graph: Graph,
    params: Vec<ParamSpec>,
    buffers: Vec<ParamSpec>,
}

impl Builder {
    fn param(&mut self, name: String, shape: Vec<usize>, init: Init) -> usize {
        self.params.push(ParamSpec { name, shape, init });
        self.params.len() - 1
    }

    fn buffer(&mut self, name: String, shape: Vec<usize>, init: Init) -> usize {
        self.buffers.push(ParamSpec { name, shape, init });
        self.buffers.len() - 1
    }

    fn conv(&mut self, name: &str, x: NodeId, cin: usize, cout: usize, stride: usize) -> NodeId {
        let weight = self.param(format!("{name}.weight"), vec![cout, cin, 3, 3], Init::FanIn(cin * 9));
        self.graph.push(op::Conv2d {
            input: x,
            weight,
            bias: None,
            geometry: ConvGeometry { stride, padding: 1 },
        })
    }

    fn bn(&mut self, name: &str, x: NodeId, c: usize) -> NodeId {
        let weight = self.param(format!("{name}.weight"), vec![c], Init::Ones);
        let bias = self.param(format!("{name}.bias"), vec![c], Init::Zeros);
        let mean = self.buffer(format!("{name}.running_mean"), vec![c], Init::Zeros);
        let var = self.buffer(format!("{name}.running_var"), vec![c], Init::Ones);
        self.graph.push(op::BatchNorm {
            input: x,
            weight,
            bias,
            stats: op::BatchNormStats { mean, var, eps: 1e-5 },
        })
    }

    fn dense(&mut self, name: &str, x: NodeId, din: usize, dout: usize) -> NodeId {
        let weight = self.param(format!("{name}.weight"), vec![dout, din], Init::FanIn(din));
        let bias = self.param(format!("{name}.bias"), vec![dout], Init::FanIn(din));
        self.graph.push(op::Dense {
            input: x,
            weight,
            bias: Some(bias),
        })
    }
}

impl Model {
    /// Builds the model; `input_channels` is used by `resnet-cifar` (1 for MNIST,
    /// 3 for CIFAR) and ignored by MLPs, whose input size is in the spec.
    pub fn new(arch: &Architecture, input_channels: usize) -> Result<Self, ModelError> {
        let mut b = Builder {
            graph: Graph::new(),
            params: vec![],
            buffers: vec![],
        };
        let x = b.graph.input();
        let (channels, classes) = match arch {
            Architecture::ResNetCifar { blocks, tanh } => {
                let act = |input| -> Op {
                    if *tanh {
                        op::Tanh { input }.into()
                    } else {
                        op::Relu { input }.into()
                    }
                };
                let mut h = b.conv("conv", x, input_channels, 16, 1);
                h = b.bn("bn", h, 16);
                h = b.graph.push(act(h));
                let mut cin = 16;
                for (stage, (&n, cout)) in blocks.iter().zip([16, 32, 64]).enumerate() {
                    for j in 0..n {
                        let stride = if stage > 0 && j == 0 { 2 } else { 1 };
                        let p = format!("layer{}.{j}", stage + 1);
                        let mut y = b.conv(&format!("{p}.conv1"), h, cin, cout, stride);
                        y = b.bn(&format!("{p}.bn1"), y, cout);
                        y = b.graph.push(act(y));
                        y = b.conv(&format!("{p}.conv2"), y, cout, cout, 1);
                        y = b.bn(&format!("{p}.bn2"), y, cout);
                        let shortcut = if stride != 1 || cin != cout {
                            let s = b.conv(&format!("{p}.downsample.0"), h, cin, cout, stride);
                            b.bn(&format!("{p}.downsample.1"), s, cout)
                        } else {
                            h
                        };
                        let sum = b.graph.push(op::Add { a: y, b: shortcut });
                        h = b.graph.push(act(sum));
                        cin = cout;
                    }
                }
                h = b.graph.push(op::GlobalAvgPool { input: h });
                b.dense("fc", h, 64, 10);
                (input_channels, 10)
            }
            Architecture::Mlp { sizes, tanh } => {
                let mut h = b.graph.push(op::Flatten { input: x });
                let layers = sizes.len() - 1;
                for i in 0..layers {
                    h = b.dense(&(2 * i).to_string(), h, sizes[i], sizes[i + 1]);
                    if i + 1 < layers {
                        h = b.graph.push(if *tanh {
                            Op::from(op::Tanh { input: h })
                        } else {
                            Op::from(op::Relu { input: h })
                        });
                    }
                }
                (1, sizes[sizes.len() - 1])
            }
            Architecture::Onnx { .. } => {
                return Err(ModelError::BadArch {
                    spec: arch.to_string(),
                    reason: "an ONNX model is built by the importer from its file (`model`)".into(),
                })
            }
        };
        Ok(Model {
            arch: arch.clone(),
            graph: b.graph,
            params: b.params,
            buffers: b.buffers,
            input_channels: channels,
            num_classes: classes,
        })
    }

    pub fn param_names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// Total number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(ParamSpec::numel).sum()
    }

    /// Elements per example the model accepts, when fixed (`mlp`: D).
    pub fn input_features(&self) -> Option<usize> {
        match &self.arch {
            Architecture::Mlp { sizes, .. } => Some(sizes[0]),
            Architecture::ResNetCifar { .. } => None,
            Architecture::Onnx { input_shape, .. } => (input_shape.len() == 1).then(|| input_shape[0]),
        }
    }

    /// The bound token ids must stay below, when the input holds token ids.
    pub fn token_vocab(&self) -> Option<usize> {
        match &self.arch {
            Architecture::Onnx { token_vocab, .. } => *token_vocab,
            _ => None,
        }
    }

    /// Checks that examples of `sample_shape` fit the model, with a message naming the mismatch.
    pub fn check_input(&self, sample_shape: &[usize]) -> Result<(), String> {
        let numel: usize = sample_shape.iter().product();
        match &self.arch {
            Architecture::Mlp { sizes, .. } if numel != sizes[0] => Err(format!(
                "examples of shape {sample_shape:?} have {numel} features but {} expects {}",
                self.arch, sizes[0]
            )),
            Architecture::ResNetCifar { .. } if sample_shape.len() != 3 => Err(format!(
                "{} needs images [C, H, W], got examples of shape {sample_shape:?}",
                self.arch
            )),
            Architecture::ResNetCifar { .. } if sample_shape[0] != self.input_channels => Err(format!(
                "images have {} channels but the weights' conv.weight expects {}",
                sample_shape[0], self.input_channels
            )),
            Architecture::ResNetCifar { .. } if sample_shape[1] < 4 || sample_shape[2] < 4 => Err(format!(
                "images of {}x{} are too small for three stages with stride 2 (need at least 4x4)",
                sample_shape[1], sample_shape[2]
            )),
            Architecture::Onnx { input_shape, .. } if sample_shape != input_shape.as_slice() => Err(format!(
                "examples of shape {sample_shape:?} do not fit {}, whose input is [batch, {}]",
                self.arch,
                input_shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
            )),
            _ => Ok(()),
        }
    }
}
