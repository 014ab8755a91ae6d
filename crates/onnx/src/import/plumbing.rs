//! Shape plumbing: Shape, Squeeze/Unsqueeze, Reshape, Flatten, Concat, Expand
//! and Transpose, folded at load time when their inputs are known and turned
//! into graph operations otherwise.

use super::*;

impl Importer<'_> {
    pub(super) fn shape_op(&self, node: &NodeProto) -> Res<Entry> {
        let dims: Vec<Scalar> = self
            .shape_of(&self.required(node, 0)?)
            .iter()
            .map(|d| match d {
                Dim::Batch => Scalar::Batch,
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
                        Dim::Batch => Err(self.dynamic("a constant cannot take the batch size as a dimension")),
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
        let mut out: Vec<Option<Dim>> = Vec::with_capacity(target.numel());
        for (i, &t) in target.values.iter().enumerate() {
            out.push(match t {
                Scalar::Batch => Some(Dim::Batch),
                Scalar::Int(0) if !allow_zero => Some(
                    *from
                        .get(i)
                        .ok_or_else(|| self.err(format!("target dimension {i} copies a dimension the input lacks")))?,
                ),
                Scalar::Int(-1) => None,
                Scalar::Int(n) if n >= 0 => {
                    // A graph exported with a fixed batch size b0 spells the batch
                    // dimension as b0: keep it symbolic.
                    if i == 0 && Some(n as usize) == self.export_batch && from.first() == Some(&Dim::Batch) {
                        Some(Dim::Batch)
                    } else {
                        Some(Dim::Fixed(n as usize))
                    }
                }
                other => return Err(self.err(format!("invalid target dimension {other:?}"))),
            });
        }
        let count = |s: &mut dyn Iterator<Item = Dim>| {
            s.fold((0usize, 1usize), |(b, p), d| match d {
                Dim::Batch => (b + 1, p),
                Dim::Fixed(n) => (b, p * n),
            })
        };
        let (in_b, in_p) = count(&mut from.iter().copied());
        let (out_b, out_p) = count(&mut out.iter().flatten().copied());
        let holes = out.iter().filter(|d| d.is_none()).count();
        let bad = || {
            self.dynamic(format!(
                "cannot reshape {} into {:?} without mixing the batch into another dimension",
                show(&from),
                target.values
            ))
        };
        let fill = match holes {
            0 if in_b == out_b && in_p == out_p => None,
            1 if in_b == out_b && out_p > 0 && in_p % out_p == 0 => Some(Dim::Fixed(in_p / out_p)),
            1 if in_b == out_b + 1 && in_p == out_p => Some(Dim::Batch),
            _ => return Err(bad()),
        };
        let shape: Vec<Dim> = out.into_iter().map(|d| d.or(fill).expect("one hole filled")).collect();
        self.reshaped(node, e, shape)
    }

    pub(super) fn flatten(&mut self, node: &NodeProto) -> Res<Entry> {
        let e = self.required(node, 0)?;
        let from = self.shape_of(&e);
        let axis =
            normalize_axis(attr_i(node, "axis", 1), from.len() + 1).ok_or_else(|| self.err("axis out of range"))?;
        let part = |dims: &[Dim]| -> Res<Dim> {
            let b = dims.iter().filter(|d| **d == Dim::Batch).count();
            let p: usize = dims
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    Dim::Batch => 1,
                })
                .product();
            match (b, p) {
                (0, p) => Ok(Dim::Fixed(p)),
                (1, 1) => Ok(Dim::Batch),
                _ => Err(self.dynamic(format!("Flatten at axis {axis} of {} mixes the batch", show(&from)))),
            }
        };
        let shape = vec![part(&from[..axis])?, part(&from[axis..])?];
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
                Dim::Batch => return Err(self.err("concatenation along the batch dimension mixes examples")),
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
        let dims: Vec<Dim> = target
            .values
            .iter()
            .map(|v| match *v {
                Scalar::Batch => Ok(Dim::Batch),
                Scalar::Int(n) if n >= 0 => Ok(Dim::Fixed(n as usize)),
                other => Err(self.err(format!("invalid target dimension {other:?}"))),
            })
            .collect::<Res<_>>()?;
        let from = self.shape_of(&e);
        let shape = broadcast(&from, &dims)
            .ok_or_else(|| self.err(format!("{} does not broadcast to {}", show(&from), show(&dims))))?;
        match e {
            Entry::Static(c) => {
                let out: Vec<usize> = shape
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => Ok(*n),
                        Dim::Batch => Err(self.dynamic("a constant expanded to the batch size")),
                    })
                    .collect::<Res<_>>()?;
                Ok(Entry::Static(c.expand(&out).map_err(|r| self.err(r))?))
            }
            e if shape == from => Ok(e),
            _ => Err(self.err("expanding data computed per batch to a larger shape is not supported")),
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
        Ok(self.push(op::Transpose { input: x, perm }, shape))
    }
}
