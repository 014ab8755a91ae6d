//! Picking entries: Gather (folded at load time, fixed indices into data, or
//! token ids into an embedding table), Slice, Split, SplitToSequence and
//! SequenceAt, Where with a load-time condition, and the load-time Equal, Mod,
//! Range, ConstantOfShape and Trilu (causal masks) of shape arithmetic.

use super::*;

/// `start:end:step` of one axis of size `dim`, with ONNX's clamping rules.
fn slice_indices(start: i64, end: i64, step: i64, dim: usize) -> Vec<usize> {
    let d = dim as i64;
    let resolve = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    let mut out = Vec::new();
    if step > 0 {
        let (s, e) = (resolve(start).clamp(0, d), resolve(end).clamp(0, d));
        let mut i = s;
        while i < e {
            out.push(i as usize);
            i += step;
        }
    } else {
        let (s, e) = (resolve(start).clamp(-1, d - 1), resolve(end).clamp(-1, d - 1));
        let mut i = s;
        while i > e {
            out.push(i as usize);
            i += step;
        }
    }
    out
}

impl Importer<'_> {
    /// Entries `indices` along `axis` of `e` (named `name`).
    fn select(&mut self, name: &str, e: Entry, axis: usize, indices: Vec<usize>) -> Res<Entry> {
        let mut shape = self.shape_of(&e);
        match shape[axis] {
            Dim::Batch | Dim::Batched { .. } => {
                return Err(self.dynamic("selecting examples along the batch dimension"));
            }
            Dim::Fixed(n) if indices.len() == n && indices.iter().enumerate().all(|(k, &i)| k == i) => {
                return Ok(e);
            }
            Dim::Fixed(_) => {}
        }
        if let Entry::Static(c) = &e {
            let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
            return Ok(Entry::Static(
                c.gather(&idx, &[idx.len()], axis).map_err(|r| self.err(r))?,
            ));
        }
        let (x, _) = self.runtime(name, &e)?;
        shape[axis] = Dim::Fixed(indices.len());
        Ok(self.push(
            op::Select {
                input: x,
                axis,
                indices,
            },
            shape,
        ))
    }

    pub(super) fn gather(&mut self, node: &NodeProto) -> Res<Entry> {
        let data = self.required(node, 0)?;
        let idx_entry = self.required(node, 1)?;
        let shape = self.shape_of(&data);
        let axis = normalize_axis(attr_i(node, "axis", 0), shape.len()).ok_or_else(|| self.err("axis out of range"))?;
        if let Entry::Runtime {
            node: ids,
            shape: id_shape,
        } = &idx_entry
        {
            if !self.id_nodes.contains(ids) {
                return Err(self.dynamic("Gather indices computed per batch (hvp takes them from the token-id input)"));
            }
            return self.embedding(node, data, *ids, id_shape.clone(), axis);
        }
        let idx = self.static_input(node, 1, "Gather indices")?;
        let indices = idx
            .known_ints()
            .ok_or_else(|| self.dynamic("Gather indices depend on the batch size"))?;
        if let Entry::Static(c) = &data {
            return Ok(Entry::Static(
                c.gather(&indices, &idx.shape, axis).map_err(|r| self.err(r))?,
            ));
        }
        let Dim::Fixed(n) = shape[axis] else {
            return Err(self.dynamic("gathering examples along the batch dimension"));
        };
        let resolved = indices
            .iter()
            .map(|&i| {
                let j = if i < 0 { i + n as i64 } else { i };
                usize::try_from(j)
                    .ok()
                    .filter(|&j| j < n)
                    .ok_or_else(|| self.err(format!("index {i} is out of range for a dimension of size {n}")))
            })
            .collect::<Res<Vec<_>>>()?;
        let picked = self.select(&node.input[0], data, axis, resolved)?;
        let mut out = shape[..axis].to_vec();
        out.extend(fixed(&idx.shape));
        out.extend_from_slice(&shape[axis + 1..]);
        self.reshaped(node, picked, out)
    }

    /// `Gather(table, ids)`: an embedding lookup by the model's token ids.
    fn embedding(
        &mut self,
        node: &NodeProto,
        table: Entry,
        ids: NodeId,
        id_shape: Vec<Dim>,
        axis: usize,
    ) -> Res<Entry> {
        let table_shape = self.shape_of(&table);
        if axis != 0 || table_shape.len() < 2 {
            return Err(self.err(format!(
                "token ids index axis 0 of an embedding table [vocabulary, ...]; got axis {axis} of {}",
                show(&table_shape)
            )));
        }
        let Dim::Fixed(vocab) = table_shape[0] else {
            return Err(self.dynamic("an embedding table computed per batch"));
        };
        if let Entry::Runtime { .. } = table {
            return Err(self.err("the embedding table must be a parameter or a constant, not computed per batch"));
        }
        let (t, _) = self.runtime(&node.input[0], &table)?;
        self.vocab = Some(self.vocab.map_or(vocab, |v| v.min(vocab)));
        let mut shape = id_shape;
        shape.extend_from_slice(&table_shape[1..]);
        Ok(self.push(op::Embedding { table: t, ids }, shape))
    }

    pub(super) fn slice(&mut self, node: &NodeProto) -> Res<Entry> {
        let mut e = self.required(node, 0)?;
        let rank = self.shape_of(&e).len();
        let (starts, ends, axes, steps) = if self.opset < 10 {
            let starts = attr_ints(node, "starts").ok_or_else(|| self.err("Slice needs starts"))?;
            let ends = attr_ints(node, "ends").ok_or_else(|| self.err("Slice needs ends"))?;
            let axes = attr_ints(node, "axes");
            (starts, ends, axes, None)
        } else {
            let starts = self.known_ints_input(node, 1, "starts")?;
            let ends = self.known_ints_input(node, 2, "ends")?;
            let axes = match self.input(node, 3) {
                Some(_) => Some(self.known_ints_input(node, 3, "axes")?),
                None => None,
            };
            let steps = match self.input(node, 4) {
                Some(_) => Some(self.known_ints_input(node, 4, "steps")?),
                None => None,
            };
            (starts, ends, axes, steps)
        };
        let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return Err(self.err("starts, ends, axes and steps differ in length"));
        }
        let name = node.input[0].clone();
        for k in 0..starts.len() {
            let axis = normalize_axis(axes[k], rank).ok_or_else(|| self.err("axis out of range"))?;
            if steps[k] == 0 {
                return Err(self.err("a slice step of 0"));
            }
            match self.shape_of(&e)[axis] {
                Dim::Fixed(n) => {
                    let picked = slice_indices(starts[k], ends[k], steps[k], n);
                    e = self.select(&name, e, axis, picked)?;
                }
                // All of the batch, as `x[:, ...]` exports it (up to "the end",
                // or up to the batch size a fixed-batch export spells out).
                d if starts[k] == 0
                    && steps[k] == 1
                    && (ends[k] >= i32::MAX as i64
                        || self.export_batch.map(|b| (b * d.factor()) as i64) == Some(ends[k])) => {}
                _ => return Err(self.dynamic("slicing examples along the batch dimension")),
            }
        }
        Ok(e)
    }

    /// Sizes of the parts of a Split or SplitToSequence along a dimension of size `n`.
    fn split_sizes(&self, sizes: Option<Vec<i64>>, parts: usize, n: usize) -> Res<Vec<usize>> {
        match sizes {
            Some(s) => {
                let sizes: Vec<usize> = s
                    .iter()
                    .map(|&v| usize::try_from(v).map_err(|_| self.err(format!("negative split size {v}"))))
                    .collect::<Res<_>>()?;
                if sizes.iter().sum::<usize>() != n {
                    return Err(self.err(format!("split sizes {sizes:?} do not add up to {n}")));
                }
                Ok(sizes)
            }
            None => {
                let chunk = n.div_ceil(parts.max(1));
                Ok((0..parts).map(|k| chunk.min(n.saturating_sub(k * chunk))).collect())
            }
        }
    }

    fn split_parts(&mut self, node: &NodeProto, e: Entry, axis: usize, sizes: &[usize]) -> Res<Vec<Entry>> {
        let mut start = 0;
        let mut out = Vec::new();
        for &len in sizes {
            out.push(self.select(&node.input[0], e.clone(), axis, (start..start + len).collect())?);
            start += len;
        }
        Ok(out)
    }

    fn fixed_axis(&self, shape: &[Dim], axis: i64) -> Res<(usize, usize)> {
        let a = normalize_axis(axis, shape.len()).ok_or_else(|| self.err("axis out of range"))?;
        match shape[a] {
            Dim::Fixed(n) => Ok((a, n)),
            _ => Err(self.dynamic("splitting the batch dimension")),
        }
    }

    /// `Split`: sets every output itself.
    pub(super) fn split(&mut self, node: &NodeProto) -> Res<()> {
        let e = self.required(node, 0)?;
        let (axis, n) = self.fixed_axis(&self.shape_of(&e), attr_i(node, "axis", 0))?;
        let sizes = match (self.input(node, 1), attr_ints(node, "split")) {
            (Some(_), _) => Some(self.known_ints_input(node, 1, "split")?),
            (None, given) => given,
        };
        let parts = attr_i(node, "num_outputs", node.output.len() as i64).max(1) as usize;
        let sizes = self.split_sizes(sizes, parts, n)?;
        if sizes.len() != node.output.len() {
            return Err(self.err(format!("{} parts for {} outputs", sizes.len(), node.output.len())));
        }
        let parts = self.split_parts(node, e, axis, &sizes)?;
        for (name, part) in node.output.iter().zip(parts) {
            self.values.insert(name.clone(), part);
        }
        Ok(())
    }

    /// `SplitToSequence`: the parts kept as a sequence for `SequenceAt`.
    pub(super) fn split_to_sequence(&mut self, node: &NodeProto) -> Res<()> {
        let e = self.required(node, 0)?;
        let shape = self.shape_of(&e);
        let (axis, n) = self.fixed_axis(&shape, attr_i(node, "axis", 0))?;
        let (sizes, squeeze) = match self.input(node, 1) {
            None => (vec![1; n], attr_i(node, "keepdims", 1) == 0),
            Some(_) => {
                let split = self.static_input(node, 1, "split")?;
                let v = split
                    .known_ints()
                    .ok_or_else(|| self.dynamic("split sizes depend on the batch size"))?;
                let sizes = if split.shape.is_empty() {
                    let chunk = usize::try_from(v[0]).ok().filter(|&c| c > 0);
                    let chunk = chunk.ok_or_else(|| self.err(format!("split size {}", v[0])))?;
                    self.split_sizes(None, n.div_ceil(chunk), n)?
                } else {
                    self.split_sizes(Some(v), 0, n)?
                };
                (sizes, false)
            }
        };
        let mut parts = self.split_parts(node, e, axis, &sizes)?;
        if squeeze {
            let mut out_shape = shape.clone();
            out_shape.remove(axis);
            parts = parts
                .into_iter()
                .map(|p| self.reshaped(node, p, out_shape.clone()))
                .collect::<Res<_>>()?;
        }
        let out = node.output.first().ok_or_else(|| self.err("the node has no output"))?;
        self.sequences.insert(out.clone(), parts);
        Ok(())
    }

    pub(super) fn sequence_at(&mut self, node: &NodeProto) -> Res<Entry> {
        let name = self.input(node, 0).ok_or_else(|| self.err("input 0 is required"))?;
        let parts = self
            .sequences
            .get(name)
            .ok_or_else(|| self.err(format!("'{name}' is not a sequence made by SplitToSequence")))?;
        let at = self.known_ints_input(node, 1, "position")?;
        let len = parts.len() as i64;
        let k = match at.as_slice() {
            [k] if (-len..len).contains(k) => (k + len) % len,
            _ => return Err(self.err(format!("position {at:?} is outside a sequence of {len}"))),
        };
        Ok(parts[k as usize].clone())
    }

    pub(super) fn where_op(&mut self, node: &NodeProto) -> Res<Entry> {
        let cond = self.static_input(node, 0, "the condition")?;
        let (a, b) = (self.required(node, 1)?, self.required(node, 2)?);
        if let (Entry::Static(x), Entry::Static(y)) = (&a, &b) {
            return Ok(Entry::Static(
                Constant::select_where(&cond, x, y).map_err(|r| self.err(r))?,
            ));
        }
        let mask_values = cond
            .to_f64()
            .ok_or_else(|| self.dynamic("a condition holding the batch size"))?;
        let (sa, sb) = (self.shape_of(&a), self.shape_of(&b));
        let shape = broadcast(&sa, &sb)
            .and_then(|s| broadcast(&s, &fixed(&cond.shape)))
            .ok_or_else(|| {
                self.err(format!(
                    "{}, {} and the condition do not broadcast",
                    show(&sa),
                    show(&sb)
                ))
            })?;
        let (xa, _) = self.runtime(&node.input[1], &a)?;
        let (xb, _) = self.runtime(&node.input[2], &b)?;
        let mask = self.add_buffer(&format!("{}.mask", self.node), cond.shape.clone(), mask_values);
        Ok(self.push(op::Where { a: xa, b: xb, mask }, shape))
    }

    /// Equal, Mod, Range and ConstantOfShape: shape arithmetic, at load time only.
    pub(super) fn load_time(&mut self, node: &NodeProto) -> Res<Entry> {
        let Some(inputs) = self.all_static(node)? else {
            return Err(self.dynamic(format!(
                "{} of values computed per batch (hvp folds it only at load time)",
                self.op
            )));
        };
        let folded = match (self.op.as_str(), inputs.as_slice()) {
            ("Equal", [a, b]) => Constant::equal(a, b),
            ("Mod", [a, b]) => Constant::modulo(a, b, attr_i(node, "fmod", 0) != 0),
            ("Range", [start, limit, delta]) => match (
                start.values.as_slice(),
                limit.values.as_slice(),
                delta.values.as_slice(),
            ) {
                ([s], [l], [d]) => Constant::range(*s, *l, *d, start.float),
                _ => Err("Range takes three scalars".into()),
            },
            ("ConstantOfShape", [shape]) => {
                let dims = shape
                    .known_ints()
                    .ok_or_else(|| self.dynamic("a constant with the batch size as a dimension"))?;
                let dims: Vec<usize> = dims
                    .iter()
                    .map(|&d| usize::try_from(d).map_err(|_| self.err(format!("negative dimension {d}"))))
                    .collect::<Res<_>>()?;
                let fill = match attr(node, "value").and_then(|a| a.t.as_ref()) {
                    Some(t) => Constant::from_proto(t, self.model_dir).map_err(|r| self.err(r))?,
                    None => Constant::floats(vec![1], [0.0]),
                };
                fill.reshape(vec![]).expand(&dims)
            }
            ("Trilu", [x, rest @ ..]) => {
                let k = match rest {
                    [] => 0,
                    [k] => k.known_ints().and_then(|v| v.first().copied()).unwrap_or(0),
                    _ => return Err(self.err("Trilu takes at most two inputs")),
                };
                x.trilu(k, attr_i(node, "upper", 1) != 0)
            }
            (op, _) => Err(format!("{op} with {} inputs", inputs.len())),
        };
        Ok(Entry::Static(folded.map_err(|r| self.err(r))?))
    }
}

#[cfg(test)]
mod tests {
    use super::slice_indices;

    #[test]
    fn slices_clamp_as_onnx_says() {
        assert_eq!(slice_indices(0, i64::MAX, 1, 4), vec![0, 1, 2, 3]);
        assert_eq!(slice_indices(1, -1, 1, 4), vec![1, 2]);
        assert_eq!(slice_indices(0, 10, 2, 5), vec![0, 2, 4]);
        assert_eq!(slice_indices(-1, i64::MIN, -1, 3), vec![2, 1, 0]);
        assert_eq!(slice_indices(5, 0, -2, 4), vec![3, 1]);
        assert!(slice_indices(3, 1, 1, 4).is_empty());
    }
}
