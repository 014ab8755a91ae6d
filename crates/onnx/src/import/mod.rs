//! Translation of an ONNX graph into an hvp [`Graph`], node by node, with every
//! shape inferred symbolically (the batch size as [`Dim::Batch`]) so that all
//! shape errors surface at load time, naming the node. The operators themselves are
//! in `plumbing` (shape plumbing) and `layers` (arithmetic and layers).

mod indexing;
mod layers;
mod plumbing;

use crate::constant::{Constant, Scalar};
use crate::proto::{attribute_type, data_type, AttributeProto, ModelProto, NodeProto, TensorProto};
use crate::{ImportOptions, Imported, OnnxError};
use hvp_autodiff::primitives::nd::{Arith, Pointwise};
use hvp_autodiff::{op, Dim, Graph, NodeId, Op};
use hvp_model::{Architecture, Init, Model, ParamSpec, Weights};
use hvp_tensor::conv::{ConvGeometry, Grouping};
use hvp_tensor::nd::MaxPoolGeometry;
use hvp_tensor::pool::out_size;
use hvp_tensor::Tensor;
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Operators hvp imports (default ONNX domain, opsets 13–21).
pub const SUPPORTED_OPS: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Div",
    "Dropout",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Gather",
    "Gelu",
    "Gemm",
    "GroupNormalization",
    "GlobalAveragePool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "MatMul",
    "MaxPool",
    "Mod",
    "Mul",
    "Neg",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceMean",
    "ReduceSum",
    "Relu",
    "Reshape",
    "SequenceAt",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Softplus",
    "Split",
    "SplitToSequence",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
];

/// What an ONNX value name stands for during the import.
#[derive(Clone, Debug)]
enum Entry {
    /// Computed per batch by graph node `node`, of symbolic `shape`.
    Runtime { node: NodeId, shape: Vec<Dim> },
    /// Known at load time.
    Static(Constant),
    /// Trainable parameter `index`.
    Param(usize),
}

type Res<T> = Result<T, OnnxError>;

/// How an operator uses one of its inputs, for deciding what an initializer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputUse {
    /// The output depends smoothly on it: a float initializer here is trainable.
    Differentiable,
    /// A running statistic (BatchNorm mean and variance): a buffer, not trained.
    Statistic,
    /// Read for its value at load time only (shapes, axes, indices, exponents,
    /// bounds) or for its type: a constant.
    LoadTime,
}

/// The folder external data is read from: the model's own (a bare file name
/// has the empty path as its parent, which is the current folder).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Refuses a graph with operators hvp cannot import, naming every one of
/// them (with how many nodes use it and which) in one error, so a user sees
/// the whole list at once instead of one operator per attempt.
fn check_all_supported(path: &Path, nodes: &[NodeProto], roles: &[InitializerInfo]) -> Res<()> {
    let mut unsupported: Vec<(String, Vec<String>)> = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let foreign = !(node.domain.is_empty() || node.domain == "ai.onnx");
        if !foreign && SUPPORTED_OPS.contains(&node.op_type.as_str()) {
            continue;
        }
        let op = if foreign {
            format!("{}::{}", node.domain, node.op_type)
        } else {
            node.op_type.clone()
        };
        let name = if node.name.is_empty() {
            node.output.first().cloned().unwrap_or_else(|| format!("#{k}"))
        } else {
            node.name.clone()
        };
        match unsupported.iter_mut().find(|(o, _)| *o == op) {
            Some((_, names)) => names.push(name),
            None => unsupported.push((op, vec![name])),
        }
    }
    if unsupported.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 3;
    let ops = unsupported
        .iter()
        .map(|(op, names)| {
            let more = names.len().saturating_sub(SHOWN);
            let listed = names[..names.len().min(SHOWN)].join("', '");
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!("{op} ×{} ('{listed}'{tail})", names.len())
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(OnnxError::UnsupportedOps {
        path: path.to_path_buf(),
        count: unsupported.len(),
        ops,
        supported: SUPPORTED_OPS.join(", "),
        initializers: roles.to_vec(),
    })
}

/// The use of input `slot` of operator `op`.
fn input_use(op: &str, slot: usize) -> InputUse {
    match (op, slot) {
        ("BatchNormalization", 3 | 4) => InputUse::Statistic,
        ("Reshape" | "Expand" | "Squeeze" | "Unsqueeze" | "Tile" | "Gather" | "GatherElements", 1)
        | ("ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "Split" | "TopK" | "CastLike", 1)
        | ("Pow", 1)
        | ("Slice", 1..)
        | ("Pad" | "Dropout" | "Clip" | "Resize" | "Range" | "OneHot" | "Upsample", 1..)
        | ("Shape" | "Size" | "ConstantOfShape" | "Range" | "EyeLike" | "Where", 0)
        | ("SplitToSequence" | "SequenceAt" | "Trilu", 1)
        | ("Equal" | "Mod" | "Greater" | "Less", _) => InputUse::LoadTime,
        _ => InputUse::Differentiable,
    }
}

/// What an initializer is to hvp, and why (for `hvp params`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Trainable: a float tensor the loss depends on through differentiable ops.
    Parameter,
    /// Excluded from the parameters by `--params`.
    Frozen,
    /// BatchNorm running statistics.
    Buffer,
    /// Integer tensors, and floats read only at load time.
    Constant,
}

/// One initializer of the model with its role.
#[derive(Clone, Debug)]
pub struct InitializerInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
    pub reason: String,
}

fn is_float_type(t: i32) -> bool {
    // FLOAT, FLOAT16, DOUBLE, BFLOAT16
    matches!(t, 1 | 10 | 11 | 16)
}

fn fixed(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&d| Dim::Fixed(d)).collect()
}

fn show(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape
        .iter()
        .map(|d| match d {
            Dim::Batch => "batch".to_string(),
            Dim::Batched { outer, inner } => format!("{outer}×batch×{inner}"),
            Dim::Fixed(n) => n.to_string(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Numpy broadcasting of symbolic shapes; the batch size only meets itself or 1.
fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    let n = a.len().max(b.len());
    let at = |s: &[Dim], i: usize| {
        if i + s.len() >= n {
            s[i + s.len() - n]
        } else {
            Dim::Fixed(1)
        }
    };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (Dim::Fixed(1), y) => Some(y),
            (x, Dim::Fixed(1)) => Some(x),
            _ => None,
        })
        .collect()
}

fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn attr<'n>(node: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

/// A float attribute. ONNX stores them in float32, which turns PyTorch's
/// `negative_slope=0.1` into 0.10000000149…; the shortest decimal that rounds
/// to the same float32 (`0.1`) is what the model was written with.
fn attr_f(node: &NodeProto, name: &str, default: f64) -> f64 {
    attr(node, name).map_or(default, |a| a.f.to_string().parse::<f64>().unwrap_or(a.f as f64))
}

fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

fn attr_s(node: &NodeProto, name: &str) -> Option<String> {
    attr(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

struct Importer<'a> {
    path: &'a Path,
    model_dir: &'a Path,
    opset: i64,
    graph: Graph,
    params: Vec<ParamSpec>,
    param_values: Vec<Tensor<f64>>,
    buffers: Vec<ParamSpec>,
    buffer_values: Vec<Tensor<f64>>,
    param_nodes: HashMap<usize, NodeId>,
    constant_nodes: HashMap<String, NodeId>,
    values: HashMap<String, Entry>,
    /// The batch size the graph was exported with, when its input fixes one.
    export_batch: Option<usize>,
    node: String,
    op: String,
    /// Elements of every node's value for one example (the activations kept).
    example_elements: usize,
    /// Why the last node's output is too large, if it is.
    oversized: Option<String>,
    /// Nodes holding the integer token-id input (or a reshaping of it).
    id_nodes: HashSet<NodeId>,
    /// Rows of the smallest embedding table the token ids index.
    vocab: Option<usize>,
    /// The parts of each SplitToSequence output, for SequenceAt.
    sequences: HashMap<String, Vec<Entry>>,
    /// Transposes of 2-D parameters (a Linear weight as MatMul's right side).
    transposed_params: HashMap<NodeId, usize>,
    /// Every node of the file, and which nodes read each value, to fuse a
    /// Linear layer's bias `Add` into its MatMul.
    all_nodes: &'a [NodeProto],
    readers: HashMap<String, Vec<usize>>,
    /// Nodes already imported as part of an earlier one.
    fused: HashSet<usize>,
}

/// Operators that pass token ids on unchanged (reshaping them).
const ID_PASSTHROUGH: &[&str] = &[
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Identity",
    "Cast",
    "CastLike",
];

/// Most elements of one node's value per example (512 MB in f64).
const MAX_NODE_ELEMENTS: usize = 1 << 26;

/// Most elements of all nodes' values per example (4 GB in f64).
const MAX_EXAMPLE_ELEMENTS: usize = 1 << 29;

pub fn import(path: &Path, bytes: &[u8], options: &ImportOptions) -> Res<Imported> {
    let model = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let model_err = |reason: String| OnnxError::Model {
        path: path.to_path_buf(),
        reason,
    };
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| model_err("the file holds no graph".into()))?;
    if graph.node.is_empty() {
        return Err(model_err("the graph has no nodes".into()));
    }
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(13, |o| o.version);
    let model_dir = folder_of(path);

    // Initializers, plus a separate copy for each Identity of one: the legacy
    // exporter merges equal-valued initializers (e.g. two BatchNorm biases that
    // are both zero) behind Identity nodes, and PyTorch's parameters are distinct.
    let mut initializers: Vec<TensorProto> = graph.initializer.clone();
    let mut init_index: HashMap<String, usize> = initializers
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    for node in &graph.node {
        if node.op_type == "Identity" && node.domain.is_empty() {
            if let (Some(src), Some(out)) = (node.input.first(), node.output.first()) {
                if let Some(&i) = init_index.get(src) {
                    let mut copy = initializers[i].clone();
                    copy.name = out.clone();
                    init_index.insert(out.clone(), initializers.len());
                    initializers.push(copy);
                }
            }
        }
    }

    // Trainable candidates: float initializers that some operator differentiates
    // through, in order of first use (PyTorch's state_dict order). Identity
    // nodes that copy an initializer were turned into initializers above.
    let is_copy = |node: &NodeProto| {
        node.op_type == "Identity" && node.output.first().is_some_and(|o| init_index.contains_key(o))
    };
    let mut candidates: Vec<String> = Vec::new();
    let mut first_use: HashMap<String, (InputUse, String)> = HashMap::new();
    for node in graph.node.iter().filter(|n| !is_copy(n)) {
        for (slot, name) in node.input.iter().enumerate().filter(|(_, n)| !n.is_empty()) {
            let Some(&i) = init_index.get(name) else { continue };
            let usage = input_use(&node.op_type, slot);
            let label = if node.name.is_empty() {
                node.op_type.clone()
            } else {
                format!("{} '{}'", node.op_type, node.name)
            };
            let how = format!("input {slot} of {label}");
            match first_use.get(name) {
                Some((InputUse::Differentiable, _)) => {}
                Some((InputUse::Statistic, _)) if usage != InputUse::Differentiable => {}
                _ => {
                    first_use.insert(name.clone(), (usage, how));
                }
            }
            let float = matches!(initializers[i].data_type, data_type::FLOAT | data_type::DOUBLE);
            if float && usage == InputUse::Differentiable && !candidates.contains(name) {
                candidates.push(name.clone());
            }
        }
    }
    let selected: Vec<String> = match &options.params_glob {
        None => candidates.clone(),
        Some(glob) => {
            let selection = ParamSelection::parse(glob)?;
            let s: Vec<String> = candidates.iter().filter(|c| selection.selects(c)).cloned().collect();
            if s.is_empty() {
                return Err(OnnxError::NoParams {
                    glob: glob.clone(),
                    available: candidates.join(", "),
                });
            }
            s
        }
    };

    let mut imp = Importer {
        path,
        model_dir,
        opset,
        graph: Graph::new(),
        params: vec![],
        param_values: vec![],
        buffers: vec![],
        buffer_values: vec![],
        param_nodes: HashMap::new(),
        constant_nodes: HashMap::new(),
        values: HashMap::new(),
        export_batch: None,
        node: String::new(),
        op: String::new(),
        example_elements: 0,
        oversized: None,
        id_nodes: HashSet::new(),
        vocab: None,
        sequences: HashMap::new(),
        transposed_params: HashMap::new(),
        all_nodes: &graph.node,
        readers: HashMap::new(),
        fused: HashSet::new(),
    };
    for (k, node) in graph.node.iter().enumerate() {
        for name in node.input.iter().filter(|n| !n.is_empty()) {
            imp.readers.entry(name.clone()).or_default().push(k);
        }
    }
    let mut candidate_shapes = Vec::new();
    let mut roles = Vec::new();
    for t in &initializers {
        let c = Constant::from_proto(t, model_dir).map_err(|reason| model_err(format!("initializer: {reason}")))?;
        if candidates.contains(&t.name) {
            candidate_shapes.push((t.name.clone(), c.shape.clone()));
        }
        let (usage, how) = first_use
            .get(&t.name)
            .cloned()
            .unwrap_or((InputUse::LoadTime, "used by no operator".into()));
        let (role, reason) = if selected.contains(&t.name) {
            (Role::Parameter, format!("float, differentiated through ({how})"))
        } else if candidates.contains(&t.name) {
            (
                Role::Frozen,
                format!("excluded by `params`; would be trainable ({how})"),
            )
        } else if usage == InputUse::Statistic {
            (Role::Buffer, format!("running statistic ({how})"))
        } else if !c.float {
            (Role::Constant, format!("integer tensor ({how})"))
        } else {
            (Role::Constant, format!("read at load time only ({how})"))
        };
        roles.push(InitializerInfo {
            name: t.name.clone(),
            shape: c.shape.clone(),
            role,
            reason,
        });
        let entry = if selected.contains(&t.name) {
            if c.to_f64().is_some_and(|v| v.iter().any(|x| !x.is_finite())) {
                return Err(model_err(format!(
                    "parameter '{}' contains infinite values; a trainable tensor must be finite",
                    t.name
                )));
            }
            imp.params.push(ParamSpec {
                name: t.name.clone(),
                shape: c.shape.clone(),
                init: Init::Zeros,
            });
            let values = c.to_f64().expect("float initializer");
            imp.param_values
                .push(Tensor::new(c.shape.clone(), values).expect("decoded length checked"));
            Entry::Param(imp.params.len() - 1)
        } else {
            Entry::Static(c)
        };
        imp.values.insert(t.name.clone(), entry);
    }
    // Parameters in order of use, as PyTorch's state_dict lists them.
    candidate_shapes.sort_by_key(|(n, _)| candidates.iter().position(|c| c == n));

    // The data input: the one graph input that is not an initializer.
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !init_index.contains_key(&i.name))
        .collect();
    let [input] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(model_err(format!(
            "the graph has {} data inputs ({}); hvp feeds exactly one (the batch of examples)",
            names.len(),
            names.join(", ")
        )));
    };
    let tensor_type = input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| model_err(format!("input '{}' is not a tensor", input.name)))?;
    let token_ids = matches!(tensor_type.elem_type, data_type::INT64 | data_type::INT32);
    if !is_float_type(tensor_type.elem_type) && !token_ids {
        return Err(model_err(format!(
            "input '{}' has ONNX element type {}; hvp feeds float tensors, or int64/int32 token ids",
            input.name, tensor_type.elem_type
        )));
    }
    let dims = tensor_type
        .shape
        .as_ref()
        .map(|s| s.dim.clone())
        .ok_or_else(|| model_err(format!("input '{}' has no declared shape", input.name)))?;
    if dims.len() < 2 - usize::from(token_ids) {
        return Err(model_err(format!(
            "input '{}' has rank {}; hvp needs [batch, ...] with at least one feature dimension",
            input.name,
            dims.len()
        )));
    }
    imp.export_batch = dims[0].dim_value.filter(|&v| v > 0).map(|v| v as usize);
    let mut sample_shape = Vec::new();
    for (k, d) in dims.iter().enumerate().skip(1) {
        match d.dim_value {
            Some(v) if v > 0 => sample_shape.push(v as usize),
            _ => {
                return Err(OnnxError::Dynamic {
                    path: path.to_path_buf(),
                    node: input.name.clone(),
                    op: "graph input".into(),
                    reason: format!(
                        "dimension {k} of the input is '{}', not a number",
                        d.dim_param.clone().unwrap_or_default()
                    ),
                })
            }
        }
    }
    let x = imp.graph.input();
    if token_ids {
        imp.id_nodes.insert(x);
    }
    let mut shape = vec![Dim::Batch];
    shape.extend(fixed(&sample_shape));
    imp.values.insert(input.name.clone(), Entry::Runtime { node: x, shape });

    check_all_supported(path, &graph.node, &roles)?;
    for (k, node) in graph.node.iter().enumerate() {
        if imp.fused.contains(&k) {
            continue;
        }
        imp.node = if node.name.is_empty() {
            node.output.first().cloned().unwrap_or_default()
        } else {
            node.name.clone()
        };
        imp.op = node.op_type.clone();
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(imp.unsupported(&format!(" (domain '{}')", node.domain)));
        }
        // Identity outputs of initializers were made initializers of their own above.
        if node.op_type == "Identity" && node.output.first().is_some_and(|o| init_index.contains_key(o)) {
            continue;
        }
        imp.node_op(node)?;
        if let Some(reason) = imp.oversized.take() {
            return Err(imp.err(reason));
        }
        if imp.example_elements > MAX_EXAMPLE_ELEMENTS {
            return Err(imp.err(format!(
                "the activations of one example would exceed {MAX_EXAMPLE_ELEMENTS} elements"
            )));
        }
    }

    let [output] = graph.output.as_slice() else {
        return Err(model_err(format!(
            "the graph has {} outputs; hvp needs exactly one (the logits)",
            graph.output.len()
        )));
    };
    let (out_node, out_shape) = match imp.values.get(&output.name) {
        Some(Entry::Runtime { node, shape }) => (*node, shape.clone()),
        Some(_) => {
            return Err(model_err(format!(
                "output '{}' does not depend on the input",
                output.name
            )))
        }
        None => return Err(model_err(format!("output '{}' is computed by no node", output.name))),
    };
    let num_classes = match out_shape.as_slice() {
        [Dim::Batch, Dim::Fixed(c)] => *c,
        _ => {
            return Err(model_err(format!(
                "output '{}' has shape {}; hvp needs logits [batch, classes] (apply the loss in hvp, not in the graph)",
                output.name,
                show(&out_shape)
            )))
        }
    };
    if out_node != imp.graph.nodes().len() - 1 {
        // The graph's last node is its output.
        imp.graph.push(op::Reshape {
            input: out_node,
            shape: out_shape.clone(),
        });
    }

    let token_vocab = match (token_ids, imp.vocab) {
        (false, _) => None,
        (true, Some(v)) => Some(v),
        (true, None) => {
            return Err(model_err(format!(
                "input '{}' holds integers but reaches no embedding lookup (Gather); hvp differentiates token ids \
                 only through embeddings",
                input.name
            )))
        }
    };
    imp.graph.set_example_elements(imp.example_elements);
    let warnings = folded_batchnorm_warning(&graph.node).into_iter().collect();
    let name = path
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let model = Model {
        arch: Architecture::Onnx {
            name,
            input_shape: sample_shape.clone(),
            token_vocab,
        },
        graph: imp.graph,
        params: imp.params,
        buffers: imp.buffers,
        input_channels: if sample_shape.len() == 3 { sample_shape[0] } else { 1 },
        num_classes,
    };
    let weights = Weights {
        params: imp.param_values,
        buffers: imp.buffer_values,
    };
    Ok(Imported {
        model,
        weights,
        warnings,
        candidates: candidate_shapes,
        initializers: roles,
    })
}

/// PyTorch's exporters fold eval-mode BatchNorm into the preceding convolution
/// unless told not to, which changes the parameters the Hessian is taken in.
fn folded_batchnorm_warning(nodes: &[NodeProto]) -> Option<String> {
    if nodes.iter().any(|n| n.op_type == "BatchNormalization") {
        return None;
    }
    let folded = nodes.iter().filter(|n| n.op_type == "Conv").any(|n| {
        n.metadata_props
            .iter()
            .any(|p| p.value.contains("FuseBatchNorm") || p.value.contains("batch_norm"))
            || n.input.iter().any(|i| i.starts_with("onnx::Conv"))
            || n.input
                .iter()
                .chain(&n.output)
                .any(|i| i.contains(".bn") || i.starts_with("bn"))
    });
    folded.then(|| {
        "the graph has convolutions but no BatchNormalization and its names suggest BatchNorm was folded into \
         them by the exporter: the Hessian is then taken with respect to the folded weights. Export with \
         torch.onnx.export(model.eval(), (x,), path, optimize=False, do_constant_folding=False) (or dynamo=False, \
         do_constant_folding=False) to keep BatchNorm"
            .to_string()
    })
}

impl Importer<'_> {
    fn err(&self, reason: impl Into<String>) -> OnnxError {
        OnnxError::Node {
            path: self.path.to_path_buf(),
            node: self.node.clone(),
            op: self.op.clone(),
            reason: reason.into(),
        }
    }

    fn dynamic(&self, reason: impl Into<String>) -> OnnxError {
        OnnxError::Dynamic {
            path: self.path.to_path_buf(),
            node: self.node.clone(),
            op: self.op.clone(),
            reason: reason.into(),
        }
    }

    fn unsupported(&self, domain: &str) -> OnnxError {
        OnnxError::Unsupported {
            path: self.path.to_path_buf(),
            node: self.node.clone(),
            op: self.op.clone(),
            domain: domain.to_string(),
            supported: SUPPORTED_OPS.join(", "),
        }
    }

    fn entry(&self, name: &str) -> Res<Entry> {
        self.values.get(name).cloned().ok_or_else(|| OnnxError::MissingValue {
            path: self.path.to_path_buf(),
            node: self.node.clone(),
            op: self.op.clone(),
            name: name.to_string(),
        })
    }

    /// Input `k` of `node`, when present (ONNX marks omitted optional inputs with "").
    fn input<'n>(&self, node: &'n NodeProto, k: usize) -> Option<&'n str> {
        node.input.get(k).map(String::as_str).filter(|s| !s.is_empty())
    }

    fn required(&self, node: &NodeProto, k: usize) -> Res<Entry> {
        match self.input(node, k) {
            Some(name) => self.entry(name),
            None => Err(self.err(format!("input {k} is required"))),
        }
    }

    fn set_output(&mut self, node: &NodeProto, entry: Entry) -> Res<()> {
        let out = node.output.first().ok_or_else(|| self.err("the node has no output"))?;
        self.values.insert(out.clone(), entry);
        Ok(())
    }

    fn push(&mut self, op: impl Into<Op>, shape: Vec<Dim>) -> Entry {
        let op = op.into();
        // Sizes per example, checked here so that evaluation never allocates
        // beyond them; the import stops after the node that broke them.
        let numel = shape
            .iter()
            .map(|d| match d {
                Dim::Batch => 1,
                d @ Dim::Batched { .. } => d.factor(),
                Dim::Fixed(n) => *n,
            })
            .try_fold(1usize, |a, d| a.checked_mul(d));
        match numel {
            Some(n) if n <= MAX_NODE_ELEMENTS => {
                self.example_elements = self.example_elements.saturating_add(n);
            }
            _ => {
                self.oversized.get_or_insert_with(|| {
                    format!(
                        "its output of shape {} per example exceeds {MAX_NODE_ELEMENTS} elements",
                        show(&shape)
                    )
                });
            }
        }
        Entry::Runtime {
            node: self.graph.push(op),
            shape,
        }
    }

    /// A constant as a graph node (a buffer named `name`), created once per name.
    fn constant_node(&mut self, name: &str, c: &Constant) -> Res<(NodeId, Vec<Dim>)> {
        if !c.float {
            return Err(self.err(format!("integer tensor '{name}' is used as data")));
        }
        if let Some(&n) = self.constant_nodes.get(name) {
            return Ok((n, fixed(&c.shape)));
        }
        let values = c
            .to_f64()
            .ok_or_else(|| self.dynamic(format!("'{name}' holds the batch size as data")))?;
        let buffer = self.add_buffer(name, c.shape.clone(), values);
        let n = self.graph.push(op::Constant { buffer });
        self.constant_nodes.insert(name.to_string(), n);
        Ok((n, fixed(&c.shape)))
    }

    fn add_buffer(&mut self, name: &str, shape: Vec<usize>, values: Vec<f64>) -> usize {
        let mut unique = name.to_string();
        let mut k = 1;
        while self.buffers.iter().any(|b| b.name == unique) {
            unique = format!("{name}#{k}");
            k += 1;
        }
        self.buffers.push(ParamSpec {
            name: unique,
            shape: shape.clone(),
            init: Init::Zeros,
        });
        self.buffer_values
            .push(Tensor::new(shape, values).expect("constant length matches its shape"));
        self.buffers.len() - 1
    }

    /// Any value as a graph node.
    fn runtime(&mut self, name: &str, e: &Entry) -> Res<(NodeId, Vec<Dim>)> {
        match e {
            Entry::Runtime { node, .. }
                if self.id_nodes.contains(node) && !ID_PASSTHROUGH.contains(&self.op.as_str()) =>
            {
                Err(self.err(format!(
                    "the token ids '{name}' are used as data; hvp differentiates integer inputs only through \
                     embedding lookups (Gather from a table)"
                )))
            }
            Entry::Runtime { node, shape } => Ok((*node, shape.clone())),
            Entry::Param(i) => {
                let shape = fixed(&self.params[*i].shape);
                let index = *i;
                let n = *self
                    .param_nodes
                    .entry(index)
                    .or_insert_with(|| self.graph.push(op::Param { index }));
                Ok((n, shape))
            }
            Entry::Static(c) => self.constant_node(name, c),
        }
    }

    fn runtime_input(&mut self, node: &NodeProto, k: usize) -> Res<(NodeId, Vec<Dim>)> {
        let e = self.required(node, k)?;
        self.runtime(&node.input[k], &e)
    }

    /// Input `k` as one number fixed at load time (an exponent, a bound).
    fn static_scalar(&self, node: &NodeProto, k: usize, what: &str) -> Res<f64> {
        let c = self.static_input(node, k, what)?;
        match c.values.as_slice() {
            [v] => v
                .as_f64()
                .ok_or_else(|| self.err(format!("{what} (input {k}) is not a number"))),
            _ => Err(self.err(format!(
                "{what} (input {k}) must be a single number, got shape {:?}",
                c.shape
            ))),
        }
    }

    fn static_input(&self, node: &NodeProto, k: usize, what: &str) -> Res<Constant> {
        match self.required(node, k)? {
            Entry::Static(c) => Ok(c),
            Entry::Param(i) => Err(self.err(format!(
                "{what} (input {k}) is the trainable initializer '{}', but hvp cannot differentiate {} with respect \
                 to it; exclude it from the parameters with a `params` glob that does not match it",
                self.params[i].name, self.op
            ))),
            _ => Err(self.dynamic(format!(
                "{what} (input {k}) is computed per batch; hvp needs it fixed at load time"
            ))),
        }
    }

    fn known_ints_input(&self, node: &NodeProto, k: usize, what: &str) -> Res<Vec<i64>> {
        self.static_input(node, k, what)?
            .known_ints()
            .ok_or_else(|| self.dynamic(format!("{what} depends on the batch size")))
    }

    /// Axes from the attribute (older opsets) or input `k` (newer ones).
    fn axes(&self, node: &NodeProto, k: usize) -> Res<Option<Vec<i64>>> {
        if let Some(a) = attr_ints(node, "axes") {
            return Ok(Some(a));
        }
        match self.input(node, k) {
            Some(_) => Ok(Some(self.known_ints_input(node, k, "axes")?)),
            None => Ok(None),
        }
    }

    fn shape_of(&self, e: &Entry) -> Vec<Dim> {
        match e {
            Entry::Runtime { shape, .. } => shape.clone(),
            Entry::Param(i) => fixed(&self.params[*i].shape),
            Entry::Static(c) => fixed(&c.shape),
        }
    }

    fn all_static(&self, node: &NodeProto) -> Res<Option<Vec<Constant>>> {
        let mut out = Vec::new();
        for k in 0..node.input.len() {
            match self.input(node, k) {
                None => continue,
                Some(name) => match self.entry(name)? {
                    Entry::Static(c) => out.push(c),
                    _ => return Ok(None),
                },
            }
        }
        Ok(Some(out))
    }

    fn node_op(&mut self, node: &NodeProto) -> Res<()> {
        let op = node.op_type.as_str();
        let entry = match op {
            "Identity" | "Dropout" => {
                if op == "Dropout" && node.output.get(1).is_some_and(|m| !m.is_empty()) {
                    return Err(self.err("the dropout mask output is not supported (export in eval mode)"));
                }
                self.required(node, 0)?
            }
            "Constant" => Entry::Static(self.constant(node)?),
            "Shape" => self.shape_op(node)?,
            "Gather" => self.gather(node)?,
            "Slice" => self.slice(node)?,
            "Split" => return self.split(node),
            "SplitToSequence" => return self.split_to_sequence(node),
            "SequenceAt" => self.sequence_at(node)?,
            "Where" => self.where_op(node)?,
            "Equal" | "Mod" | "Range" | "ConstantOfShape" | "Trilu" => self.load_time(node)?,
            "Cast" | "CastLike" => {
                let to_float = if op == "Cast" {
                    is_float_type(attr_i(node, "to", 1) as i32)
                } else {
                    match self.required(node, 1)? {
                        Entry::Static(c) => c.float,
                        _ => true,
                    }
                };
                match self.required(node, 0)? {
                    Entry::Static(c) => Entry::Static(c.cast(to_float).map_err(|r| self.dynamic(r))?),
                    e if to_float => e,
                    Entry::Runtime { node: n, shape } if self.id_nodes.contains(&n) => {
                        Entry::Runtime { node: n, shape }
                    }
                    _ => return Err(self.err("casting data computed per batch to integers is not differentiable")),
                }
            }
            "Unsqueeze" | "Squeeze" => self.squeeze(node, op == "Unsqueeze")?,
            "Reshape" => self.reshape(node)?,
            "Flatten" => self.flatten(node)?,
            "Concat" => self.concat(node)?,
            "Expand" => self.expand(node)?,
            "Transpose" => self.transpose(node)?,
            "Add" | "Sub" | "Mul" | "Div" => self.arith(node)?,
            "Relu" | "Tanh" | "Sigmoid" | "LeakyRelu" | "Erf" | "Gelu" | "Sqrt" | "Reciprocal" | "Exp" | "Log"
            | "Neg" | "Softplus" | "Elu" | "HardSigmoid" | "HardSwish" | "Clip" | "Pow" => {
                let (x, shape) = self.runtime_input(node, 0)?;
                let func = match op {
                    "Relu" => None,
                    "Tanh" => None,
                    "Sigmoid" => Some(Pointwise::Sigmoid),
                    "LeakyRelu" => Some(Pointwise::LeakyRelu {
                        alpha: attr_f(node, "alpha", 0.01),
                    }),
                    "Erf" => Some(Pointwise::Erf),
                    "Sqrt" => Some(Pointwise::Sqrt),
                    "Reciprocal" => Some(Pointwise::Reciprocal),
                    "Exp" => Some(Pointwise::Exp),
                    "Log" => Some(Pointwise::Log),
                    "Neg" => Some(Pointwise::Neg),
                    "Softplus" => Some(Pointwise::Softplus),
                    "Elu" => Some(Pointwise::Elu {
                        alpha: attr_f(node, "alpha", 1.0),
                    }),
                    "HardSigmoid" => Some(Pointwise::HardSigmoid {
                        alpha: attr_f(node, "alpha", 0.2),
                        beta: attr_f(node, "beta", 0.5),
                    }),
                    "HardSwish" => Some(Pointwise::HardSwish),
                    "Clip" => {
                        // Bounds are inputs from opset 11, attributes before.
                        let bound = |k: usize, attr: &str, default: f64| -> Res<f64> {
                            if self.input(node, k).is_some() {
                                self.static_scalar(node, k, attr)
                            } else {
                                Ok(attr_f(node, attr, default))
                            }
                        };
                        Some(Pointwise::Clip {
                            min: bound(1, "min", f64::NEG_INFINITY)?,
                            max: bound(2, "max", f64::INFINITY)?,
                        })
                    }
                    "Pow" => Some(Pointwise::Pow {
                        p: self.static_scalar(node, 1, "the exponent")?,
                    }),
                    _ => match attr_s(node, "approximate").as_deref().unwrap_or("none") {
                        "none" => Some(Pointwise::Gelu),
                        "tanh" => Some(Pointwise::GeluTanh),
                        other => return Err(self.err(format!("approximate='{other}' is not a GELU variant"))),
                    },
                };
                let graph_op = match (op, func) {
                    ("Relu", _) => Op::from(op::Relu { input: x }),
                    ("Tanh", _) => op::Tanh { input: x }.into(),
                    (_, Some(func)) => op::Pointwise { input: x, func }.into(),
                    _ => unreachable!("every pointwise operator maps to an op"),
                };
                self.push(graph_op, shape)
            }
            "Softmax" | "LogSoftmax" => {
                let (x, shape) = self.runtime_input(node, 0)?;
                let default = if self.opset >= 13 { -1 } else { 1 };
                let axis = normalize_axis(attr_i(node, "axis", default), shape.len())
                    .ok_or_else(|| self.err("axis out of range"))?;
                if self.opset < 13 && axis != shape.len() - 1 {
                    return Err(
                        self.err("opset < 13 Softmax over several axes is not supported; export with opset >= 13")
                    );
                }
                if shape[axis].has_batch() {
                    return Err(self.err("a softmax over the batch mixes examples"));
                }
                self.push(
                    op::Softmax {
                        input: x,
                        axis,
                        log: op == "LogSoftmax",
                    },
                    shape,
                )
            }
            "MatMul" => self.matmul(node)?,
            "Gemm" => self.gemm(node)?,
            "Conv" => self.conv(node)?,
            "ConvTranspose" => self.conv_transpose(node)?,
            "BatchNormalization" => self.batchnorm(node)?,
            "AveragePool" | "MaxPool" => self.pool(node, op == "MaxPool")?,
            "GlobalAveragePool" => {
                let (x, shape) = self.runtime_input(node, 0)?;
                if shape.len() != 4 {
                    return Err(self.err(format!("input of shape {} is not NCHW", show(&shape))));
                }
                let pooled = self.graph.push(op::GlobalAvgPool { input: x });
                let out = vec![shape[0], shape[1], Dim::Fixed(1), Dim::Fixed(1)];
                self.push(
                    op::Reshape {
                        input: pooled,
                        shape: out.clone(),
                    },
                    out,
                )
            }
            "ReduceMean" => self.reduce_mean(node)?,
            "ReduceSum" => self.reduce_sum(node)?,
            "LayerNormalization" => self.layer_norm(node)?,
            "InstanceNormalization" => self.instance_norm(node)?,
            "GroupNormalization" => self.group_norm(node)?,
            _ => return Err(self.unsupported("")),
        };
        if ID_PASSTHROUGH.contains(&op) {
            if let (Ok(Entry::Runtime { node: from, .. }), Entry::Runtime { node: to, .. }) =
                (self.required(node, 0), &entry)
            {
                if self.id_nodes.contains(&from) {
                    self.id_nodes.insert(*to);
                }
            }
        }
        self.set_output(node, entry)
    }

    fn constant(&self, node: &NodeProto) -> Res<Constant> {
        let a = node
            .attribute
            .first()
            .ok_or_else(|| self.err("a Constant needs a value attribute"))?;
        Ok(match (a.name.as_str(), a.r#type) {
            ("value", attribute_type::TENSOR) | ("value", _) if a.t.is_some() => {
                let t = a.t.as_ref().expect("checked");
                Constant::from_proto(t, self.model_dir).map_err(|r| self.err(r))?
            }
            ("value_float", attribute_type::FLOAT) => Constant::floats(vec![], [a.f as f64]),
            ("value_floats", attribute_type::FLOATS) => {
                Constant::floats(vec![a.floats.len()], a.floats.iter().map(|&v| v as f64))
            }
            ("value_int", attribute_type::INT) => Constant::ints(vec![], [Scalar::Int(a.i)]),
            ("value_ints", attribute_type::INTS) => {
                Constant::ints(vec![a.ints.len()], a.ints.iter().map(|&v| Scalar::Int(v)))
            }
            (name, _) => return Err(self.err(format!("Constant attribute '{name}' is not supported"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_data_of_a_bare_file_name_is_read_from_the_current_folder() {
        assert_eq!(folder_of(Path::new("model.onnx")), Path::new("."));
        assert_eq!(folder_of(Path::new("a/model.onnx")), Path::new("a"));
        assert_eq!(folder_of(Path::new("/m.onnx")), Path::new("/"));
    }
}

/// `--params`: comma-separated globs; a name is selected when it matches an
/// including glob (all names, when every glob is an exclusion) and no
/// exclusion (a glob written `!glob`), e.g. `fc.*`, `layer3.*,fc.*` or
/// `!*bn*` (everything but BatchNorm scales and shifts).
struct ParamSelection {
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
}

impl ParamSelection {
    fn parse(text: &str) -> Result<Self, OnnxError> {
        let mut selection = ParamSelection {
            include: Vec::new(),
            exclude: Vec::new(),
        };
        for part in text.split(',').map(str::trim) {
            let (list, pattern) = match part.strip_prefix('!') {
                Some(rest) => (&mut selection.exclude, rest),
                None => (&mut selection.include, part),
            };
            if pattern.is_empty() {
                return Err(OnnxError::BadGlob {
                    glob: text.to_string(),
                    reason: "an empty glob in the comma-separated list".into(),
                });
            }
            list.push(glob::Pattern::new(pattern).map_err(|e| OnnxError::BadGlob {
                glob: text.to_string(),
                reason: format!("'{pattern}': {e}"),
            })?);
        }
        Ok(selection)
    }

    fn selects(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| p.matches(name)))
            && !self.exclude.iter().any(|p| p.matches(name))
    }
}

#[cfg(test)]
mod selection_tests {
    use super::ParamSelection;

    #[test]
    fn globs_combine_as_a_union_minus_exclusions() {
        let names = [
            "conv1.weight",
            "bn1.weight",
            "bn1.bias",
            "layer1.0.conv1.weight",
            "fc.weight",
            "fc.bias",
        ];
        let picked = |glob: &str| {
            let s = ParamSelection::parse(glob).unwrap();
            names.iter().filter(|n| s.selects(n)).copied().collect::<Vec<_>>()
        };
        assert_eq!(picked("fc.*"), ["fc.weight", "fc.bias"]);
        assert_eq!(picked("fc.*, conv1.*"), ["conv1.weight", "fc.weight", "fc.bias"]);
        assert_eq!(
            picked("!*bn*"),
            ["conv1.weight", "layer1.0.conv1.weight", "fc.weight", "fc.bias"]
        );
        assert_eq!(
            picked("*.weight,!bn*"),
            ["conv1.weight", "layer1.0.conv1.weight", "fc.weight"]
        );
        assert!(ParamSelection::parse("fc.*,").is_err());
        assert!(ParamSelection::parse("[fc").is_err());
    }
}
