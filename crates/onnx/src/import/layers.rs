//! Arithmetic and layers: Add/Sub/Mul/Div, MatMul, Gemm, Conv, BatchNormalization,
//! pooling and ReduceMean, with trainable weights mapped onto the built-in
//! layers (so K-FAC sees them) where they fit.

use super::*;

impl Importer<'_> {
    pub(super) fn arith(&mut self, node: &NodeProto) -> Res<Entry> {
        let (symbol, op) = match node.op_type.as_str() {
            "Add" => ('+', Arith::Add),
            "Sub" => ('-', Arith::Sub),
            "Mul" => ('*', Arith::Mul),
            _ => ('/', Arith::Div),
        };
        if let Some(parts) = self.all_static(node)? {
            if parts.len() != 2 {
                return Err(self.err("needs two inputs"));
            }
            return Ok(Entry::Static(
                Constant::arith(&parts[0], &parts[1], symbol).map_err(|r| self.dynamic(r))?,
            ));
        }
        let (a, sa) = self.runtime_input(node, 0)?;
        let (b, sb) = self.runtime_input(node, 1)?;
        let shape = broadcast(&sa, &sb)
            .ok_or_else(|| self.err(format!("shapes {} and {} do not broadcast", show(&sa), show(&sb))))?;
        Ok(self.push(op::Arith { a, b, op }, shape))
    }

    pub(super) fn matmul(&mut self, node: &NodeProto) -> Res<Entry> {
        let (a, sa) = self.runtime_input(node, 0)?;
        let (b, sb) = self.runtime_input(node, 1)?;
        let shape = self.matmul_shape(&sa, &sb, false)?;
        // `x · Wᵀ` with the batch in x once: a Linear layer on every token,
        // which K-FAC factors (the exporters write nn.Linear on 3-D inputs so).
        let batch_axes: Vec<usize> = (0..sa.len()).filter(|&i| sa[i].has_batch()).collect();
        if let (Some(&weight), [axis]) = (self.transposed_params.get(&b), batch_axes.as_slice()) {
            if sa[*axis] == Dim::Batch && *axis + 1 < sa.len() {
                let n = self.params[weight].shape[0];
                let bias = self.bias_after(node, n);
                let out = self.push(
                    op::TokenDense {
                        input: a,
                        weight,
                        bias: bias.map(|(p, _)| p),
                        batch_axis: *axis,
                    },
                    shape,
                );
                if let Some((_, add)) = bias {
                    self.fused.insert(add);
                    let name = self.all_nodes[add].output.first().cloned().unwrap_or_default();
                    self.values.insert(name, out.clone());
                }
                return Ok(out);
            }
        }
        Ok(self.push(op::MatMul { a, b, trans_b: false }, shape))
    }

    /// The parameter `[n]` that the one reader of `node`'s output adds to it
    /// (a Linear layer's bias), with that `Add` node's index.
    fn bias_after(&self, node: &NodeProto, n: usize) -> Option<(usize, usize)> {
        let out = node.output.first()?;
        let [add] = self.readers.get(out)?.as_slice() else {
            return None;
        };
        let add_node = &self.all_nodes[*add];
        if add_node.op_type != "Add" || add_node.input.len() != 2 {
            return None;
        }
        let other = add_node.input.iter().find(|i| *i != out)?;
        match self.values.get(other) {
            Some(Entry::Param(p)) if self.params[*p].shape == [n] => Some((*p, *add)),
            _ => None,
        }
    }

    pub(super) fn matmul_shape(&self, sa: &[Dim], sb: &[Dim], trans_b: bool) -> Res<Vec<Dim>> {
        let bad = || {
            self.err(format!(
                "cannot multiply {} by {}{}",
                show(sa),
                show(sb),
                if trans_b { "ᵀ" } else { "" }
            ))
        };
        if sa.len() < 2 || sb.len() < 2 {
            return Err(self.err("matrix products of vectors (rank 1) are not supported"));
        }
        let (rb, ra) = (sb.len(), sa.len());
        let (k_b, n) = if trans_b {
            (sb[rb - 1], sb[rb - 2])
        } else {
            (sb[rb - 2], sb[rb - 1])
        };
        let k_a = sa[ra - 1];
        if k_a != k_b || k_a.has_batch() || n.has_batch() {
            return Err(bad());
        }
        if rb != 2 && (ra != rb || sa[..ra - 2] != sb[..rb - 2]) {
            return Err(bad());
        }
        let mut shape = sa[..ra - 1].to_vec();
        shape.push(n);
        Ok(shape)
    }

    pub(super) fn gemm(&mut self, node: &NodeProto) -> Res<Entry> {
        let (alpha, beta) = (attr_f(node, "alpha", 1.0), attr_f(node, "beta", 1.0));
        let (trans_a, trans_b) = (attr_i(node, "transA", 0) == 1, attr_i(node, "transB", 0) == 1);
        let a_entry = self.required(node, 0)?;
        let b_entry = self.required(node, 1)?;
        let c_entry = match self.input(node, 2) {
            Some(name) => Some((name.to_string(), self.entry(name)?)),
            None => None,
        };
        let (mut a, mut sa) = self.runtime(&node.input[0], &a_entry)?;
        if sa.len() != 2 {
            return Err(self.err(format!("input A of shape {} is not a matrix", show(&sa))));
        }
        if trans_a {
            sa = vec![sa[1], sa[0]];
            a = self.graph.push(op::Transpose {
                input: a,
                perm: vec![1, 0],
            });
        }
        let sb = self.shape_of(&b_entry);
        let shape = self.matmul_shape(&sa, &sb, trans_b)?;
        if let Some((_, c)) = &c_entry {
            let sc = self.shape_of(c);
            if broadcast(&shape, &sc).as_deref() != Some(shape.as_slice()) {
                return Err(self.err(format!(
                    "C of shape {} does not broadcast to {}",
                    show(&sc),
                    show(&shape)
                )));
            }
        }
        // A Linear layer on one row per example: hvp's Dense op (which K-FAC
        // recognises). Rows that are tokens (`[S·batch, D]` inside attention) are
        // not examples, so such a product stays a plain MatMul.
        if let (Entry::Param(w), true, true, Dim::Batch) = (&b_entry, trans_b, alpha == 1.0, sa[0]) {
            let bias = match &c_entry {
                Some((_, Entry::Param(c))) if beta == 1.0 && self.params[*c].shape == [self.params[*w].shape[0]] => {
                    Some(*c)
                }
                _ => None,
            };
            let dense = self.graph.push(op::Dense {
                input: a,
                weight: *w,
                bias,
            });
            let out = Entry::Runtime {
                node: dense,
                shape: shape.clone(),
            };
            return match (&c_entry, bias) {
                (Some((name, c)), None) => self.add_scaled(out, name, c, beta, shape),
                _ => Ok(out),
            };
        }
        // The same on token rows (`[S·batch, D]` inside attention): viewed as
        // `[S, batch, D]`, a Linear layer on every token.
        if let (Entry::Param(w), true, true, Dim::Batched { outer, inner }) = (&b_entry, trans_b, alpha == 1.0, sa[0]) {
            let n = self.params[*w].shape[0];
            let bias = match &c_entry {
                Some((_, Entry::Param(c))) if beta == 1.0 && self.params[*c].shape == [n] => Some(*c),
                _ => None,
            };
            let mut view: Vec<Dim> = [Dim::Fixed(outer), Dim::Batch, Dim::Fixed(inner)]
                .into_iter()
                .filter(|d| *d != Dim::Fixed(1))
                .collect();
            let batch_axis = usize::from(outer > 1);
            view.push(sa[1]);
            let tokens = self.push_node(
                op::Reshape {
                    input: a,
                    shape: view.clone(),
                },
                view.clone(),
            );
            let mut out_view = view;
            *out_view.last_mut().expect("rank 2 at least") = Dim::Fixed(n);
            let y = self.push_node(
                op::TokenDense {
                    input: tokens,
                    weight: *w,
                    bias,
                    batch_axis,
                },
                out_view,
            );
            let out = self.push(
                op::Reshape {
                    input: y,
                    shape: shape.clone(),
                },
                shape.clone(),
            );
            return match (&c_entry, bias) {
                (Some((name, c)), None) => self.add_scaled(out, name, c, beta, shape),
                _ => Ok(out),
            };
        }
        let (b, _) = self.runtime(&node.input[1], &b_entry)?;
        let mut y = self.graph.push(op::MatMul { a, b, trans_b });
        if alpha != 1.0 {
            let (s, _) = self.constant_node(&format!("{}.alpha", self.node), &Constant::floats(vec![], [alpha]))?;
            y = self.graph.push(op::Arith {
                a: y,
                b: s,
                op: Arith::Mul,
            });
        }
        let out = Entry::Runtime {
            node: y,
            shape: shape.clone(),
        };
        match &c_entry {
            Some((name, c)) => self.add_scaled(out, name, c, beta, shape),
            None => Ok(out),
        }
    }

    /// `out + beta · c`, skipping an all-zero constant `c`.
    pub(super) fn add_scaled(&mut self, out: Entry, name: &str, c: &Entry, beta: f64, shape: Vec<Dim>) -> Res<Entry> {
        let Entry::Runtime { node: y, .. } = out else {
            unreachable!("products are computed per batch")
        };
        let c_node = match c {
            Entry::Static(k) => {
                let values = k
                    .to_f64()
                    .ok_or_else(|| self.dynamic("the bias holds the batch size"))?;
                if beta == 0.0 || values.iter().all(|&v| v == 0.0) {
                    return Ok(Entry::Runtime { node: y, shape });
                }
                let scaled = Constant::floats(k.shape.clone(), values.iter().map(|v| v * beta));
                self.constant_node(name, &scaled)?.0
            }
            other => {
                let (mut n, _) = self.runtime(name, other)?;
                if beta != 1.0 {
                    let (s, _) =
                        self.constant_node(&format!("{}.beta", self.node), &Constant::floats(vec![], [beta]))?;
                    n = self.graph.push(op::Arith {
                        a: n,
                        b: s,
                        op: Arith::Mul,
                    });
                }
                n
            }
        };
        Ok(self.push(
            op::Arith {
                a: y,
                b: c_node,
                op: Arith::Add,
            },
            shape,
        ))
    }

    /// Square kernels, equal strides and symmetric padding, as hvp's kernels take them.
    pub(super) fn window(&self, node: &NodeProto) -> Res<(usize, usize, [usize; 4])> {
        if !node.op_type.starts_with("Conv") && self.dilation(node)? != 1 {
            return Err(self.err("dilated pooling windows are not supported"));
        }
        if attr_i(node, "ceil_mode", 0) != 0 {
            return Err(self.err("ceil_mode=1 is not supported"));
        }
        let pads: Vec<i64> = match attr_s(node, "auto_pad").as_deref().unwrap_or("NOTSET") {
            "NOTSET" => attr_ints(node, "pads").unwrap_or_else(|| vec![0; 4]),
            "VALID" => vec![0; 4],
            other => return Err(self.err(format!("auto_pad={other} is not supported; export with explicit pads"))),
        };
        let strides = attr_ints(node, "strides").unwrap_or_else(|| vec![1, 1]);
        if pads.len() != 4 || strides.len() != 2 || pads.iter().chain(&strides).any(|&v| v < 0) || strides.contains(&0)
        {
            return Err(self.err(format!(
                "2-D windows need 4 pads and 2 strides, got {pads:?} and {strides:?}"
            )));
        }
        let p = [pads[0] as usize, pads[1] as usize, pads[2] as usize, pads[3] as usize];
        Ok((strides[0] as usize, strides[1] as usize, p))
    }

    /// `group` and `dilations` of a Conv or ConvTranspose.
    fn grouping(&self, node: &NodeProto) -> Res<Grouping> {
        Ok(Grouping {
            groups: usize::try_from(attr_i(node, "group", 1))
                .ok()
                .filter(|&g| g >= 1)
                .ok_or_else(|| self.err("group must be positive"))?,
            dilation: self.dilation(node)?,
        })
    }

    /// The dilation of a window, equal along both axes.
    fn dilation(&self, node: &NodeProto) -> Res<usize> {
        match attr_ints(node, "dilations").as_deref() {
            None => Ok(1),
            Some([a, b]) if a == b && *a >= 1 => Ok(*a as usize),
            Some(d) => Err(self.err(format!("dilations {d:?} must be equal and positive"))),
        }
    }

    pub(super) fn conv(&mut self, node: &NodeProto) -> Res<Entry> {
        let (x, sx) = self.runtime_input(node, 0)?;
        let w_entry = self.required(node, 1)?;
        let sw = self.shape_of(&w_entry);
        let grouping = self.grouping(node)?;
        let (&[Dim::Fixed(o), Dim::Fixed(c), Dim::Fixed(kh), Dim::Fixed(kw)], 4) = (sw.as_slice(), sx.len()) else {
            return Err(self.err(format!(
                "hvp supports 2-D convolutions of NCHW input by [O, C, kh, kw] weights; got input {} and weight {}",
                show(&sx),
                show(&sw)
            )));
        };
        let (sh, sw_, pads) = self.window(node)?;
        if sh != sw_ || pads.iter().any(|&p| p != pads[0]) {
            return Err(self.err(format!(
                "only equal strides and symmetric padding are supported (strides {sh},{sw_}, pads {pads:?})"
            )));
        }
        let geometry = ConvGeometry {
            stride: sh,
            padding: pads[0],
        };
        let (Dim::Fixed(cin), Dim::Fixed(h), Dim::Fixed(wd)) = (sx[1], sx[2], sx[3]) else {
            return Err(self.err(format!("input {} must be [batch, C, H, W]", show(&sx))));
        };
        let (kh, kw) = (grouping.span(kh), grouping.span(kw));
        let groups = grouping.groups;
        if cin != c * groups || o % groups != 0 || h + 2 * pads[0] < kh || wd + 2 * pads[0] < kw {
            return Err(self.err(format!(
                "weight {} ({groups} groups, dilation {}) does not fit input {}",
                show(&sw),
                grouping.dilation,
                show(&sx)
            )));
        }
        let shape = vec![
            sx[0],
            Dim::Fixed(o),
            Dim::Fixed(out_size(h, kh, sh, pads[0])),
            Dim::Fixed(out_size(wd, kw, sh, pads[0])),
        ];
        let bias = match self.input(node, 2) {
            Some(name) => {
                let b = self.entry(name)?;
                if self.shape_of(&b) != [Dim::Fixed(o)] {
                    return Err(self.err(format!("bias of shape {} is not [{o}]", show(&self.shape_of(&b)))));
                }
                Some((name.to_string(), b))
            }
            None => None,
        };
        if grouping != Grouping::DENSE {
            let (wn, _) = self.runtime(&node.input[1], &w_entry)?;
            let bn = match &bias {
                Some((name, b)) => Some(self.runtime(name, b)?.0),
                None => None,
            };
            return Ok(self.push(
                op::GroupedConv {
                    input: x,
                    weight: wn,
                    bias: bn,
                    geometry,
                    grouping,
                    transposed_hw: None,
                },
                shape,
            ));
        }
        if let Entry::Param(w) = w_entry {
            let param_bias = match &bias {
                Some((_, Entry::Param(b))) => Some(*b),
                _ => None,
            };
            let y = self.push(
                op::Conv2d {
                    input: x,
                    weight: w,
                    bias: param_bias,
                    geometry,
                },
                shape.clone(),
            );
            return match bias {
                Some((name, b)) if param_bias.is_none() => {
                    let per_channel = self.as_channel_column(&name, &b, o)?;
                    self.add_scaled(y, &name, &per_channel, 1.0, shape)
                }
                _ => Ok(y),
            };
        }
        let (wn, _) = self.runtime(&node.input[1], &w_entry)?;
        let bn = match &bias {
            Some((name, b)) => Some(self.runtime(name, b)?.0),
            None => None,
        };
        Ok(self.push(
            op::ConvNode {
                input: x,
                weight: wn,
                bias: bn,
                geometry,
            },
            shape,
        ))
    }

    /// `ConvTranspose` (2-D, NCHW), weight `[Cin, Cout/group, kh, kw]`.
    pub(super) fn conv_transpose(&mut self, node: &NodeProto) -> Res<Entry> {
        let (x, sx) = self.runtime_input(node, 0)?;
        let w_entry = self.required(node, 1)?;
        let sw = self.shape_of(&w_entry);
        let grouping = self.grouping(node)?;
        let (&[Dim::Fixed(cin_w), Dim::Fixed(cout_g), Dim::Fixed(kh), Dim::Fixed(kw)], 4) = (sw.as_slice(), sx.len())
        else {
            return Err(self.err(format!(
                "hvp supports 2-D transposed convolutions of NCHW input by [Cin, Cout/group, kh, kw] weights; got \
                 input {} and weight {}",
                show(&sx),
                show(&sw)
            )));
        };
        if attr(node, "output_shape").is_some() {
            return Err(self.err("output_shape is not supported; export with explicit pads and output_padding"));
        }
        let (s, s_w, pads) = self.window(node)?;
        let extra = attr_ints(node, "output_padding").unwrap_or_else(|| vec![0, 0]);
        if s != s_w || pads.iter().any(|&p| p != pads[0]) || extra.len() != 2 || extra[0] != extra[1] {
            return Err(self.err(format!(
                "only equal strides, symmetric padding and equal output padding are supported (strides {s},{s_w}, \
                 pads {pads:?}, output_padding {extra:?})"
            )));
        }
        let (Dim::Fixed(cin), Dim::Fixed(h), Dim::Fixed(wd)) = (sx[1], sx[2], sx[3]) else {
            return Err(self.err(format!("input {} must be [batch, C, H, W]", show(&sx))));
        };
        let (p, extra) = (pads[0], extra[0].max(0) as usize);
        let (span_h, span_w) = (grouping.span(kh), grouping.span(kw));
        let size = |n: usize, span: usize| ((n - 1) * s + span + extra).checked_sub(2 * p).filter(|&v| v > 0);
        let (Some(ho), Some(wo)) = (size(h, span_h), size(wd, span_w)) else {
            return Err(self.err(format!("padding {p} leaves no output of input {}", show(&sx))));
        };
        if cin != cin_w || cin % grouping.groups != 0 || extra >= s.max(grouping.dilation) {
            return Err(self.err(format!(
                "weight {} ({} groups, output padding {extra}) does not fit input {}",
                show(&sw),
                grouping.groups,
                show(&sx)
            )));
        }
        let cout = cout_g * grouping.groups;
        let (wn, _) = self.runtime(&node.input[1], &w_entry)?;
        let bn = match self.input(node, 2) {
            Some(name) => {
                let b = self.entry(name)?;
                if self.shape_of(&b) != [Dim::Fixed(cout)] {
                    return Err(self.err(format!("bias of shape {} is not [{cout}]", show(&self.shape_of(&b)))));
                }
                Some(self.runtime(name, &b)?.0)
            }
            None => None,
        };
        let shape = vec![sx[0], Dim::Fixed(cout), Dim::Fixed(ho), Dim::Fixed(wo)];
        Ok(self.push(
            op::GroupedConv {
                input: x,
                weight: wn,
                bias: bn,
                geometry: ConvGeometry { stride: s, padding: p },
                grouping,
                transposed_hw: Some((ho, wo)),
            },
            shape,
        ))
    }

    /// A per-channel `[C]` bias as `[C, 1, 1]`, to broadcast over NCHW.
    pub(super) fn as_channel_column(&mut self, name: &str, b: &Entry, c: usize) -> Res<Entry> {
        Ok(match b {
            Entry::Static(k) => Entry::Static(k.reshape(vec![c, 1, 1])),
            other => {
                let (n, _) = self.runtime(name, other)?;
                let shape = fixed(&[c, 1, 1]);
                self.push(
                    op::Reshape {
                        input: n,
                        shape: shape.clone(),
                    },
                    shape,
                )
            }
        })
    }

    pub(super) fn batchnorm(&mut self, node: &NodeProto) -> Res<Entry> {
        if node.output.iter().skip(1).any(|o| !o.is_empty()) || attr_i(node, "training_mode", 0) != 0 {
            return Err(self.err("training-mode BatchNormalization is not supported; export the model in eval mode"));
        }
        let (x, sx) = self.runtime_input(node, 0)?;
        let Some(&Dim::Fixed(c)) = sx.get(1) else {
            return Err(self.err(format!("input {} has no channel dimension", show(&sx))));
        };
        let eps = attr_f(node, "epsilon", 1e-5);
        let operand = |k: usize| -> Res<(String, Entry)> {
            let e = self.required(node, k)?;
            if self.shape_of(&e) != [Dim::Fixed(c)] {
                return Err(self.err(format!("input {k} of shape {} is not [{c}]", show(&self.shape_of(&e)))));
            }
            Ok((node.input[k].clone(), e))
        };
        let (scale, shift, mean, var) = (operand(1)?, operand(2)?, operand(3)?, operand(4)?);
        let mut stat = |(name, e): (String, Entry)| -> Res<usize> {
            match e {
                Entry::Static(k) => {
                    let values = k
                        .to_f64()
                        .ok_or_else(|| self.dynamic("running statistics hold the batch size"))?;
                    Ok(self.add_buffer(&name, vec![c], values))
                }
                _ => Err(self.err(format!("running statistic '{name}' must be a constant initializer"))),
            }
        };
        let stats = op::BatchNormStats {
            mean: stat(mean)?,
            var: stat(var)?,
            eps,
        };
        if let (Entry::Param(weight), Entry::Param(bias)) = (&scale.1, &shift.1) {
            return Ok(self.push(
                op::BatchNorm {
                    input: x,
                    weight: *weight,
                    bias: *bias,
                    stats,
                },
                sx,
            ));
        }
        let weight = self.runtime(&scale.0, &scale.1)?.0;
        let bias = self.runtime(&shift.0, &shift.1)?.0;
        Ok(self.push(
            op::BatchNormNode {
                input: x,
                weight,
                bias,
                stats,
            },
            sx,
        ))
    }

    pub(super) fn pool(&mut self, node: &NodeProto, max: bool) -> Res<Entry> {
        if max && node.output.get(1).is_some_and(|o| !o.is_empty()) {
            return Err(self.err("the Indices output of MaxPool is not supported"));
        }
        let (x, sx) = self.runtime_input(node, 0)?;
        let kernel = attr_ints(node, "kernel_shape").unwrap_or_default();
        let (&[kh, kw], 4) = (kernel.as_slice(), sx.len()) else {
            return Err(self.err(format!(
                "2-D pooling of NCHW input needs a 2-D kernel_shape; got {kernel:?} on {}",
                show(&sx)
            )));
        };
        let (kh, kw) = (kh.max(0) as usize, kw.max(0) as usize);
        let (sh, sw, pads) = self.window(node)?;
        let (Dim::Fixed(h), Dim::Fixed(w)) = (sx[2], sx[3]) else {
            return Err(self.err(format!("input {} must be [batch, C, H, W]", show(&sx))));
        };
        if kh == 0 || kw == 0 || h + pads[0] + pads[2] < kh || w + pads[1] + pads[3] < kw {
            return Err(self.err(format!("kernel {kh}x{kw} does not fit input {}", show(&sx))));
        }
        if max {
            let geometry = MaxPoolGeometry {
                kernel: [kh, kw],
                stride: [sh, sw],
                pad_begin: [pads[0], pads[1]],
                pad_end: [pads[2], pads[3]],
            };
            let (ho, wo) = geometry.out_hw(h, w);
            return Ok(self.push(
                op::MaxPool { input: x, geometry },
                vec![sx[0], sx[1], Dim::Fixed(ho), Dim::Fixed(wo)],
            ));
        }
        if kh != kw || sh != sw || pads.iter().any(|&p| p != 0) {
            return Err(self.err("AveragePool needs a square kernel, equal strides and no padding"));
        }
        Ok(self.push(
            op::AvgPool {
                input: x,
                kernel: kh,
                stride: sh,
            },
            vec![
                sx[0],
                sx[1],
                Dim::Fixed(out_size(h, kh, sh, 0)),
                Dim::Fixed(out_size(w, kw, sh, 0)),
            ],
        ))
    }

    /// ReduceSum: ReduceMean times the number of elements reduced (exact; the
    /// mean's kernels serve both).
    pub(super) fn reduce_sum(&mut self, node: &NodeProto) -> Res<Entry> {
        let (x, sx) = self.runtime_input(node, 0)?;
        let mean = self.reduce_mean(node)?;
        let Entry::Runtime { node: mean, shape } = mean else {
            return Ok(mean);
        };
        if mean == x {
            return Ok(Entry::Runtime { node: mean, shape }); // no axes: a no-op
        }
        let kept: usize = sx.iter().map(|d| if let Dim::Fixed(n) = d { *n } else { 1 }).product();
        let left: usize = shape
            .iter()
            .map(|d| if let Dim::Fixed(n) = d { *n } else { 1 })
            .product();
        let count = (kept / left.max(1)) as f64;
        let name = format!("{}::count", self.node);
        let (c, _) = self.constant_node(&name, &Constant::floats(vec![], [count]))?;
        Ok(self.push(
            op::Arith {
                a: mean,
                b: c,
                op: Arith::Mul,
            },
            shape,
        ))
    }

    pub(super) fn reduce_mean(&mut self, node: &NodeProto) -> Res<Entry> {
        let (x, sx) = self.runtime_input(node, 0)?;
        let keep = attr_i(node, "keepdims", 1) == 1;
        let axes: Vec<usize> = match self.axes(node, 1)? {
            Some(a) if !a.is_empty() => a
                .iter()
                .map(|&v| normalize_axis(v, sx.len()).ok_or_else(|| self.err(format!("axis {v} out of range"))))
                .collect::<Res<_>>()?,
            _ if attr_i(node, "noop_with_empty_axes", 0) == 1 => {
                return Ok(Entry::Runtime { node: x, shape: sx });
            }
            _ => (0..sx.len()).collect(),
        };
        let mut axes: Vec<usize> = axes.into_iter().collect::<HashSet<_>>().into_iter().collect();
        axes.sort_unstable();
        if axes.iter().any(|&a| sx[a].has_batch()) {
            return Err(self.err("a mean over the batch mixes examples (hvp applies the loss per example)"));
        }
        let kept: Vec<Dim> = (0..sx.len())
            .map(|i| if axes.contains(&i) { Dim::Fixed(1) } else { sx[i] })
            .collect();
        let out: Vec<Dim> = if keep {
            kept.clone()
        } else {
            (0..sx.len()).filter(|i| !axes.contains(i)).map(|i| sx[i]).collect()
        };
        if sx.len() == 4 && axes == [2, 3] {
            // Global average pooling, hvp's dedicated kernel.
            let pooled = self.graph.push(op::GlobalAvgPool { input: x });
            if !keep {
                return Ok(Entry::Runtime {
                    node: pooled,
                    shape: out,
                });
            }
            return Ok(self.push(
                op::Reshape {
                    input: pooled,
                    shape: out.clone(),
                },
                out,
            ));
        }
        let mean = self.graph.push(op::ReduceMean { input: x, axes });
        if keep {
            return Ok(Entry::Runtime {
                node: mean,
                shape: kept,
            });
        }
        Ok(self.push(
            op::Reshape {
                input: mean,
                shape: out.clone(),
            },
            out,
        ))
    }

    /// LayerNormalization over the axes from `axis` on, as the operations it is
    /// made of — mean, centring, variance, `(var + ε)^(-1/2)`, scale and bias —
    /// each with exact first and second derivatives (the statistics of every
    /// example are its own, so examples never mix).
    pub(super) fn layer_norm(&mut self, node: &NodeProto) -> Res<Entry> {
        let (x, sx) = self.runtime_input(node, 0)?;
        let rank = sx.len();
        let axis = normalize_axis(attr_i(node, "axis", -1), rank).ok_or_else(|| self.err("axis out of range"))?;
        if (axis..rank).any(|a| sx[a].has_batch()) {
            return Err(self.err("normalising over the batch axis mixes examples (hvp applies the loss per example)"));
        }
        if attr_i(node, "stash_type", 1) != 1 {
            return Err(self.err("stash_type other than float32 is not supported"));
        }
        if node.output.iter().skip(1).any(|o| !o.is_empty()) {
            return Err(self.err("the mean and inverse standard deviation outputs are not supported"));
        }
        let eps = attr_f(node, "epsilon", 1e-5);
        let mut y = self.normalise(x, &sx, &(axis..rank).collect::<Vec<_>>(), eps)?;
        for (k, op) in [(1, Arith::Mul), (2, Arith::Add)] {
            let Some(name) = self.input(node, k) else { continue };
            let entry = self.entry(name)?;
            let (operand, shape) = self.runtime(name, &entry)?;
            if broadcast(&sx, &shape).as_deref() != Some(sx.as_slice()) {
                return Err(self.err(format!(
                    "input {k} of shape {} does not fit {}",
                    show(&shape),
                    show(&sx)
                )));
            }
            y = self.push_node(op::Arith { a: y, b: operand, op }, sx.clone());
        }
        Ok(Entry::Runtime { node: y, shape: sx })
    }

    /// `(x − mean) / √(var + ε)` over the trailing `axes` of each example, as
    /// one exactly differentiated operation.
    fn normalise(&mut self, x: NodeId, sx: &[Dim], axes: &[usize], eps: f64) -> Res<NodeId> {
        let first = sx.len() - axes.len();
        if axes.iter().copied().ne(first..sx.len()) || sx[first..].iter().any(|d| d.has_batch()) {
            return Err(self.err(format!(
                "normalisation over axes {axes:?} of {}: hvp normalises over trailing dimensions of one example",
                show(sx)
            )));
        }
        Ok(self.push_node(
            op::Normalize {
                input: x,
                dims: axes.len(),
                eps,
            },
            sx.to_vec(),
        ))
    }

    /// InstanceNormalization: each example's channels normalised over their
    /// spatial positions, then the per-channel scale and bias (`[C]`, trainable).
    pub(super) fn instance_norm(&mut self, node: &NodeProto) -> Res<Entry> {
        let (x, sx) = self.runtime_input(node, 0)?;
        if sx.len() < 3 || sx[1].has_batch() {
            return Err(self.err(format!("needs [batch, channels, ...], got {}", show(&sx))));
        }
        let eps = attr_f(node, "epsilon", 1e-5);
        let y = self.normalise(x, &sx, &(2..sx.len()).collect::<Vec<_>>(), eps)?;
        let y = self.affine(node, y, &sx, 1)?;
        Ok(Entry::Runtime { node: y, shape: sx })
    }

    /// `GroupNormalization`: statistics over each group of `C/num_groups`
    /// channels and all positions; scale and bias per channel (opset 21) or
    /// per group (opset 18).
    pub(super) fn group_norm(&mut self, node: &NodeProto) -> Res<Entry> {
        let (x, sx) = self.runtime_input(node, 0)?;
        let (Some(Dim::Fixed(c)), true) = (sx.get(1).copied(), sx.len() >= 3) else {
            return Err(self.err(format!("needs [batch, channels, ...], got {}", show(&sx))));
        };
        let groups = usize::try_from(attr_i(node, "num_groups", 0))
            .ok()
            .filter(|&g| g >= 1 && c % g == 0)
            .ok_or_else(|| self.err(format!("num_groups must divide the {c} channels")))?;
        let rest: usize = sx[2..].iter().map(|d| d.factor()).product();
        if sx[2..].iter().any(|d| d.has_batch()) {
            return Err(self.err(format!("needs [batch, channels, ...], got {}", show(&sx))));
        }
        let eps = attr_f(node, "epsilon", 1e-5);
        let grouped = vec![sx[0], Dim::Fixed(groups), Dim::Fixed(c / groups * rest)];
        let view = self.push_node(
            op::Reshape {
                input: x,
                shape: grouped.clone(),
            },
            grouped.clone(),
        );
        let mut y = self.normalise(view, &grouped, &[2], eps)?;
        let scale_shape = match self.input(node, 1) {
            Some(name) => self.shape_of(&self.entry(name)?),
            None => return Err(self.err("input 1 (scale) is required")),
        };
        if scale_shape == [Dim::Fixed(groups)] && groups != c {
            y = self.affine(node, y, &grouped, 1)?;
            let y = self.push_node(
                op::Reshape {
                    input: y,
                    shape: sx.clone(),
                },
                sx.clone(),
            );
            return Ok(Entry::Runtime { node: y, shape: sx });
        }
        let y = self.push_node(
            op::Reshape {
                input: y,
                shape: sx.clone(),
            },
            sx.clone(),
        );
        let y = self.affine(node, y, &sx, 1)?;
        Ok(Entry::Runtime { node: y, shape: sx })
    }

    /// `y · scale + bias` with scale (input 1) and bias (input 2) of shape
    /// `[sx[axis]]`, broadcast over the axes after `axis`.
    fn affine(&mut self, node: &NodeProto, mut y: NodeId, sx: &[Dim], axis: usize) -> Res<NodeId> {
        // `[C]` as `[C, 1, …]`, broadcasting over the positions.
        let mut column = vec![sx[axis]];
        column.extend(std::iter::repeat_n(Dim::Fixed(1), sx.len() - axis - 1));
        for (k, op) in [(1, Arith::Mul), (2, Arith::Add)] {
            let name = self
                .input(node, k)
                .ok_or_else(|| self.err(format!("input {k} (scale or bias) is required")))?;
            let entry = self.entry(name)?;
            let (operand, shape) = self.runtime(name, &entry)?;
            if shape != [sx[axis]] {
                return Err(self.err(format!(
                    "input {k} has shape {}, expected [{}]",
                    show(&shape),
                    show(&sx[axis..axis + 1])
                )));
            }
            let b = self.push_node(
                op::Reshape {
                    input: operand,
                    shape: column.clone(),
                },
                column.clone(),
            );
            y = self.push_node(op::Arith { a: y, b, op }, sx.to_vec());
        }
        Ok(y)
    }

    /// [`Importer::push`] for an intermediate node: its id.
    fn push_node(&mut self, op: impl Into<Op>, shape: Vec<Dim>) -> NodeId {
        match self.push(op, shape) {
            Entry::Runtime { node, .. } => node,
            _ => unreachable!("push makes a runtime entry"),
        }
    }
}
