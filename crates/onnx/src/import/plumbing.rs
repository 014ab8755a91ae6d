//! Shape plumbing: Shape, Squeeze/Unsqueeze, Reshape, Flatten, Concat, Expand
//! and Transpose, folded at load time when their inputs are known and turned
//! into graph operations otherwise.

use super::*;

/// The batch size used to tell batch-sized dimensions from fixed ones when a
/// graph computes its shapes symbolically: a prime larger than any dimension,
/// so that no product of fixed dimensions can be mistaken for it.
const SYMBOLIC_BATCH: usize = 1_000_003;

/// The dimensions of a reshape of `from` into `sizes` (numbers for a batch of
/// `b`, at most one `None` to infer). The batch keeps its place in memory: it
/// lies in the output dimension whose leading dimensions divide the elements
/// above the batch and whose trailing ones divide those below it; if none
/// does, the reshape would mix examples.
fn reshape_dims(from: &[Dim], sizes: &[Option<usize>], b: usize) -> Result<Vec<Dim>, String> {
    let total: usize = from.iter().map(|d| d.resolve(b)).product();
    let known: usize = sizes.iter().flatten().product();
    let mut to: Vec<usize> = match sizes.iter().filter(|s| s.is_none()).count() {
        0 if known == total => sizes.iter().flatten().copied().collect(),
        1 if known > 0 && total.is_multiple_of(known) => sizes.iter().map(|s| s.unwrap_or(total / known)).collect(),
        _ => return Err(format!("the sizes do not match {total} elements")),
    };
    let batched: Vec<usize> = (0..from.len()).filter(|&a| from[a].has_batch()).collect();
    let a = match batched.as_slice() {
        [] => return Ok(to.into_iter().map(Dim::Fixed).collect()),
        [a] => *a,
        _ => return Err("the input has two batch-sized dimensions".into()),
    };
    let (own_outer, own_inner) = match from[a] {
        Dim::Batched { outer, inner } => (outer, inner),
        _ => (1, 1),
    };
    let above = from[..a].iter().map(|d| d.resolve(b)).product::<usize>() * own_outer;
    let below = from[a + 1..].iter().map(|d| d.resolve(b)).product::<usize>() * own_inner;
    let fits = |j: usize| {
        let before: usize = to[..j].iter().product();
        let after: usize = to[j + 1..].iter().product();
        (above.is_multiple_of(before) && below.is_multiple_of(after) && to[j] == above / before * b * (below / after))
            .then(|| Dim::batched(above / before, below / after))
    };
    let places: Vec<(usize, Dim)> = (0..to.len()).filter_map(|j| fits(j).map(|d| (j, d))).collect();
    let (j, dim) = match places.as_slice() {
        [] => return Err("the batch would be split or mixed with other dimensions".into()),
        [one] => *one,
        several => *several.iter().find(|(j, _)| *j == a).unwrap_or(&several[0]),
    };
    let mut out: Vec<Dim> = to.drain(..).map(Dim::Fixed).collect();
    out[j] = dim;
    Ok(out)
}

impl Importer<'_> {
    pub(super) fn shape_op(&self, node: &NodeProto) -> Res<Entry> {
        let dims: Vec<Scalar> = self
            .shape_of(&self.required(node, 0)?)
            .iter()
            .map(|d| match d {
                Dim::Batch => Scalar::Batch,
                d @ Dim::Batched { .. } => Scalar::BatchTimes(d.factor()),
                Dim::Fixed(n) => Scalar::Int(*n as i64),
            })
            .collect();
        let rank = dims.len() as i64;
        let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
        let start = clamp(attr_i(node, "start", 0));
        let end = clamp(attr_i(node, "end", rank));
        let picked: Vec<Scalar> = dims[start..end.max(start)].to_vec();
        Ok(Entry::Static(Constant::ints(vec![picked.len()], picked)))
    }

    pub(super) fn squeeze(&mut self, node: &NodeProto, unsqueeze: bool) -> Res<Entry> {
        let e = self.required(node, 0)?;
        let shape = self.shape_of(&e);
        let axes = self.axes(node, 1)?;
        let out: Vec<Dim> = if unsqueeze {
            let axes = axes.ok_or_else(|| self.err("Unsqueeze needs axes"))?;
            let rank = shape.len() + axes.len();
            let mut norm: Vec<usize> = axes
                .iter()
                .map(|&a| normalize_axis(a, rank).ok_or_else(|| self.err(format!("axis {a} out of range"))))
                .collect::<Res<_>>()?;
            norm.sort_unstable();
            let mut rest = shape.iter();
            (0..rank)
                .map(|i| {
                    if norm.contains(&i) {
                        Dim::Fixed(1)
                    } else {
                        *rest.next().expect("rank counted")
                    }
                })
                .collect()
        } else {
            let drop: Vec<usize> = match axes {
                Some(axes) => axes
                    .iter()
                    .map(|&a| normalize_axis(a, shape.len()).ok_or_else(|| self.err(format!("axis {a} out of range"))))
                    .collect::<Res<_>>()?,
                None => (0..shape.len()).filter(|&i| shape[i] == Dim::Fixed(1)).collect(),
            };
            for &d in &drop {
                if shape[d] != Dim::Fixed(1) {
                    return Err(self.err(format!("dimension {d} of {} is not 1", show(&shape))));
                }
            }
            shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, d)| *d)
                .collect()
        };
        self.reshaped(node, e, out)
    }

    /// `e` viewed with `shape` (same elements, same order).
    pub(super) fn reshaped(&mut self, node: &NodeProto, e: Entry, shape: Vec<Dim>) -> Res<Entry> {
        match e {
            Entry::Static(c) => {
                let dims: Vec<usize> = shape
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => Ok(*n),
                        _ => Err(self.dynamic("a constant cannot take the batch size as a dimension")),
                    })
                    .collect::<Res<_>>()?;
                Ok(Entry::Static(c.reshape(dims)))
            }
            e => {
                let name = node.input[0].clone();
                let (x, from) = self.runtime(&name, &e)?;
                if from == shape {
                    return Ok(Entry::Runtime { node: x, shape });
                }
                Ok(self.push(
                    op::Reshape {
                        input: x,
                        shape: shape.clone(),
                    },
                    shape,
                ))
            }
        }
    }

    pub(super) fn reshape(&mut self, node: &NodeProto) -> Res<Entry> {
        let e = self.required(node, 0)?;
        let target = self.static_input(node, 1, "the target shape")?;
        let allow_zero = attr_i(node, "allowzero", 0) == 1;
        let from = self.shape_of(&e);
        let b = self.export_batch.unwrap_or(SYMBOLIC_BATCH);
        let mut sizes: Vec<Option<usize>> = Vec::with_capacity(target.numel());
        for (i, &t) in target.values.iter().enumerate() {
            sizes.push(match t {
                Scalar::Batch => Some(b),
                Scalar::BatchTimes(k) => Some(b * k),
                Scalar::Int(0) if !allow_zero => Some(
                    from.get(i)
                        .ok_or_else(|| self.err(format!("target dimension {i} copies a dimension the input lacks")))?
                        .resolve(b),
                ),
                Scalar::Int(-1) => None,
                Scalar::Int(n) if n >= 0 => Some(n as usize),
                other => return Err(self.err(format!("invalid target dimension {other:?}"))),
            });
        }
        let shape = reshape_dims(&from, &sizes, b).map_err(|reason| {
            self.dynamic(format!(
                "cannot reshape {} into {:?}: {reason}",
                show(&from),
                target.values
            ))
        })?;
        self.reshaped(node, e, shape)
    }

    pub(super) fn flatten(&mut self, node: &NodeProto) -> Res<Entry> {
        let e = self.required(node, 0)?;
        let from = self.shape_of(&e);
        let axis =
            normalize_axis(attr_i(node, "axis", 1), from.len() + 1).ok_or_else(|| self.err("axis out of range"))?;
        let b = self.export_batch.unwrap_or(SYMBOLIC_BATCH);
        let size = |dims: &[Dim]| dims.iter().map(|d| d.resolve(b)).product::<usize>();
        let sizes = [Some(size(&from[..axis])), Some(size(&from[axis..]))];
        let shape = reshape_dims(&from, &sizes, b)
            .map_err(|reason| self.dynamic(format!("Flatten at axis {axis} of {}: {reason}", show(&from))))?;
        self.reshaped(node, e, shape)
    }

    pub(super) fn concat(&mut self, node: &NodeProto) -> Res<Entry> {
        let entries: Vec<(String, Entry)> = node
            .input
            .iter()
            .filter(|n| !n.is_empty())
            .map(|n| Ok((n.clone(), self.entry(n)?)))
            .collect::<Res<_>>()?;
        let shapes: Vec<Vec<Dim>> = entries.iter().map(|(_, e)| self.shape_of(e)).collect();
        let rank = shapes.first().map_or(0, Vec::len);
        let axis = normalize_axis(attr_i(node, "axis", 0), rank).ok_or_else(|| self.err("axis out of range"))?;
        for s in &shapes {
            let same = s.len() == rank && (0..rank).all(|i| i == axis || s[i] == shapes[0][i]);
            if !same {
                return Err(self.err(format!(
                    "shapes {} do not concatenate along axis {axis}",
                    shapes.iter().map(|s| show(s)).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        if entries.iter().all(|(_, e)| matches!(e, Entry::Static(_))) {
            let parts: Vec<&Constant> = entries
                .iter()
                .map(|(_, e)| match e {
                    Entry::Static(c) => c,
                    _ => unreachable!("all static"),
                })
                .collect();
            return Ok(Entry::Static(Constant::concat(&parts, axis)));
        }
        let mut total = 0;
        let mut inputs = Vec::new();
        for ((name, e), s) in entries.iter().zip(&shapes) {
            match s[axis] {
                Dim::Fixed(n) => total += n,
                _ => return Err(self.err("concatenation along the batch dimension mixes examples")),
            }
            inputs.push(self.runtime(name, e)?.0);
        }
        let mut shape = shapes[0].clone();
        shape[axis] = Dim::Fixed(total);
        Ok(self.push(op::Concat { inputs, axis }, shape))
    }

    pub(super) fn expand(&mut self, node: &NodeProto) -> Res<Entry> {
        let e = self.required(node, 0)?;
        let target = self.static_input(node, 1, "the target shape")?;
        let from = self.shape_of(&e);
        let dims: Vec<Dim> = target
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| match *v {
                Scalar::Batch => Ok(Dim::Batch),
                // A fixed-batch export repeats a parameter (a class token) over
                // the batch by spelling out the batch size it was exported with.
                Scalar::Int(n)
                    if i == 0
                        && self.export_batch == Some(n as usize)
                        && target.values.len() == from.len()
                        && from.len() >= 2
                        && from[0] == Dim::Fixed(1) =>
                {
                    Ok(Dim::Batch)
                }
                Scalar::Int(n) if n >= 0 => Ok(Dim::Fixed(n as usize)),
                other => Err(self.err(format!("invalid target dimension {other:?}"))),
            })
            .collect::<Res<_>>()?;
        let shape = broadcast(&from, &dims)
            .ok_or_else(|| self.err(format!("{} does not broadcast to {}", show(&from), show(&dims))))?;
        match e {
            Entry::Static(c) if shape.iter().all(|d| !d.has_batch()) => {
                let out: Vec<usize> = shape.iter().map(|d| d.factor()).collect();
                Ok(Entry::Static(c.expand(&out).map_err(|r| self.err(r))?))
            }
            e if shape == from => Ok(e),
            e => {
                let (x, _) = self.runtime(&node.input[0], &e)?;
                Ok(self.push(
                    op::Expand {
                        input: x,
                        shape: shape.clone(),
                    },
                    shape,
                ))
            }
        }
    }

    pub(super) fn transpose(&mut self, node: &NodeProto) -> Res<Entry> {
        let e = self.required(node, 0)?;
        let from = self.shape_of(&e);
        let perm: Vec<usize> = match attr_ints(node, "perm") {
            Some(p) => p
                .iter()
                .map(|&a| normalize_axis(a, from.len()).ok_or_else(|| self.err("perm out of range")))
                .collect::<Res<_>>()?,
            None => (0..from.len()).rev().collect(),
        };
        let mut seen = perm.clone();
        seen.sort_unstable();
        if seen != (0..from.len()).collect::<Vec<_>>() {
            return Err(self.err(format!("perm {perm:?} is not a permutation of {} axes", from.len())));
        }
        if let Entry::Static(c) = &e {
            return Ok(Entry::Static(c.transpose(&perm)));
        }
        let (x, _) = self.runtime(&node.input[0], &e)?;
        let shape = perm.iter().map(|&p| from[p]).collect();
        let out = self.push(op::Transpose { input: x, perm }, shape);
        if let (Entry::Param(p), Entry::Runtime { node: t, .. }) = (&e, &out) {
            if from.len() == 2 {
                self.transposed_params.insert(*t, *p);
            }
        }
        Ok(out)
    }
}
