use hvp_tensor::{channel, elementwise, Float, Tensor};

/// A bilinear kernel with its product rule built in: `(a, ȧ, b, ḃ) ↦ (f(a, b), tangent)`.
pub type DualKernel<'a, T> =
    &'a dyn Fn(&Tensor<T>, Option<&Tensor<T>>, &Tensor<T>, Option<&Tensor<T>>) -> (Tensor<T>, Option<Tensor<T>>);

/// The tangent part of a bilinear kernel alone: `(a, ȧ, b, ḃ) ↦ f(ȧ, b) + f(a, ḃ)`
/// (`None` when both tangents are absent).
pub type TangentKernel<'a, T> =
    &'a dyn Fn(&Tensor<T>, Option<&Tensor<T>>, &Tensor<T>, Option<&Tensor<T>>) -> Option<Tensor<T>>;

/// One operand of a [`PairKernel`]: its value and tangent (when present).
pub type Operand<'a, T> = (&'a Tensor<T>, Option<&'a Tensor<T>>);

/// Two results of three operands computed in one pass, each with its product
/// rule built in: `((a, ȧ), (b, ḃ), (c, ċ), second_value) ↦ [(value, tangent); 2]`.
/// The second result's value is `None` exactly when `second_value` is false.
pub type PairKernel<'a, T> = &'a dyn Fn(
    Operand<'_, T>,
    Operand<'_, T>,
    Operand<'_, T>,
    bool,
) -> ((Tensor<T>, Option<Tensor<T>>), (Option<Tensor<T>>, Option<Tensor<T>>));

/// What a primitive computes on: a plain tensor (reverse mode) or a [`Dual`]
/// (forward mode, and forward-over-reverse when the backward pass runs on them).
///
/// Primitives are written with these operations only (`linear`, `bilinear`,
/// `nonlinear`, `add`, plus the fused `bilinear_fused` and `channel_affine` for
/// hot paths, each with its JVP built in), so that each one is differentiable in
/// forward mode by construction.
pub trait Value<T: Float>: Clone + Send + Sync + Sized {
    /// The value itself (without tangent).
    fn primal(&self) -> &Tensor<T>;
    /// A value that does not depend on the parameters (zero tangent).
    fn constant(t: Tensor<T>) -> Self;
    /// `f(x)` for a map `f` linear in `x`: the tangent maps through `f` too.
    fn linear(&self, f: impl Fn(&Tensor<T>) -> Tensor<T>) -> Self;
    /// [`Value::linear`] consuming the value, so that a map that only relabels
    /// (a reshape) or keeps its input (a broadcast to its own shape) copies nothing.
    fn linear_owned(self, f: impl Fn(Tensor<T>) -> Tensor<T>) -> Self;
    /// `f(a, b)` for a map bilinear in `(a, b)`: tangent `f(ȧ, b) + f(a, ḃ)`.
    fn bilinear(a: &Self, b: &Self, f: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>) -> Self;
    /// Like [`Value::bilinear`], with a kernel `dual(a, ȧ, b, ḃ)` that returns
    /// `(f(a, b), f(ȧ, b) + f(a, ḃ))` in one pass, sharing work between the terms
    /// (e.g. a convolution's im2col patches).
    fn bilinear_fused(a: &Self, b: &Self, f: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>, dual: DualKernel<T>)
        -> Self;
    /// Like [`Value::bilinear_fused`] for a result of which only the tangent is
    /// read: a parameter's cotangent in forward-over-reverse, whose value is the
    /// gradient and not wanted for `H v`. A dual skips the value's work and leaves
    /// it empty (shape `[0]`); a plain tensor, having no tangent, computes `f(a, b)`.
    fn bilinear_tangent_only(
        a: &Self,
        b: &Self,
        f: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>,
        tangent: TangentKernel<T>,
    ) -> Self;
    /// Two results sharing one pass over three operands (a convolution's input
    /// and weight gradients from the same rows of its output gradient). When
    /// `second_value` is false only the second result's tangent is read, as in
    /// [`Value::bilinear_tangent_only`]: a dual leaves its value empty (shape
    /// `[0]`); a plain tensor always computes it.
    fn fused_pair(a: &Self, b: &Self, c: &Self, second_value: bool, kernel: PairKernel<T>) -> (Self, Self);
    /// `f(x)` for any differentiable `f`, with its JVP rule `jvp(x, ẋ)`.
    fn nonlinear(&self, f: impl Fn(&Tensor<T>) -> Tensor<T>, jvp: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>)
        -> Self;
    /// Per-channel `x·s + t` (`s`, `t` of shape `[C]`; no `t`: zero), whose
    /// JVP `ẋ·s + x·ṡ + ṫ` a dual computes in one pass (BatchNorm's hot path).
    fn channel_affine(x: &Self, s: &Self, t: Option<&Self>) -> Self;
    /// `max(x·s + t, 0)` per channel: [`Value::channel_affine`] followed by a ReLU
    /// in one pass (and one more for a dual's tangent), without materialising
    /// the affine map's output.
    fn channel_affine_relu(x: &Self, s: &Self, t: Option<&Self>) -> Self;
    /// `max(x·s + t + r, 0)`: [`Value::channel_affine`], the residual sum with
    /// `r` and its ReLU in one pass (a dual's value and tangent together), bit
    /// for bit what the three give one after the other.
    fn channel_affine_add_relu(x: &Self, s: &Self, t: Option<&Self>, r: &Self) -> Self;
    /// An eval-mode BatchNorm's backward in one pass, optionally through the
    /// ReLU after it: with `m(g) = g·1[y > 0]` where the ReLU's output `y` is
    /// given (else `m(g) = g`), `(m(g)·s` when `s` is given, `Σ x·m(g)`,
    /// `Σ m(g))` per channel, a dual's with their tangents — bit for bit what the
    /// ReLU's VJP, [`Value::channel_affine`] and the per-channel sums give one
    /// after the other.
    fn channel_affine_backward(
        relu_out: Option<&Tensor<T>>,
        x: &Self,
        g: &Self,
        s: Option<&Self>,
    ) -> (Option<Self>, Self, Self);
    /// `self + other`.
    fn add(&self, other: &Self) -> Self;
    /// `max(self + other, 0)`: a residual sum and its ReLU in one pass (and one
    /// more for a dual's tangent), without materialising the sum.
    fn add_relu(&self, other: &Self) -> Self;
    /// `self += other` (cotangent accumulation).
    fn add_assign(&mut self, other: &Self);
    /// The tangent, when there is one.
    fn tangent(&self) -> Option<&Tensor<T>>;
    /// Drops the tangent.
    fn into_primal(self) -> Tensor<T>;
    /// Frees the tangent in place (a plain tensor has none).
    fn forget_tangent(&mut self) {}
}

impl<T: Float> Value<T> for Tensor<T> {
    fn primal(&self) -> &Tensor<T> {
        self
    }
    fn constant(t: Tensor<T>) -> Self {
        t
    }
    fn linear(&self, f: impl Fn(&Tensor<T>) -> Tensor<T>) -> Self {
        f(self)
    }
    fn linear_owned(self, f: impl Fn(Tensor<T>) -> Tensor<T>) -> Self {
        f(self)
    }
    fn bilinear(a: &Self, b: &Self, f: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>) -> Self {
        f(a, b)
    }
    fn bilinear_fused(a: &Self, b: &Self, f: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>, _: DualKernel<T>) -> Self {
        f(a, b)
    }
    fn bilinear_tangent_only(
        a: &Self,
        b: &Self,
        f: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>,
        _: TangentKernel<T>,
    ) -> Self {
        f(a, b)
    }
    fn nonlinear(
        &self,
        f: impl Fn(&Tensor<T>) -> Tensor<T>,
        _jvp: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>,
    ) -> Self {
        f(self)
    }
    fn fused_pair(a: &Self, b: &Self, c: &Self, _: bool, kernel: PairKernel<T>) -> (Self, Self) {
        let ((first, _), (second, _)) = kernel((a, None), (b, None), (c, None), true);
        (first, second.unwrap_or_else(|| Tensor::zeros(&[0])))
    }
    fn channel_affine(x: &Self, s: &Self, t: Option<&Self>) -> Self {
        channel::affine(x, s, t)
    }
    fn channel_affine_relu(x: &Self, s: &Self, t: Option<&Self>) -> Self {
        channel::affine_relu(x, s, t)
    }
    fn channel_affine_add_relu(x: &Self, s: &Self, t: Option<&Self>, r: &Self) -> Self {
        channel::affine_add_relu(x, s, t, r)
    }
    fn channel_affine_backward(
        relu_out: Option<&Tensor<T>>,
        x: &Self,
        g: &Self,
        s: Option<&Self>,
    ) -> (Option<Self>, Self, Self) {
        let r = channel::affine_backward(relu_out, (x, None), (g, None), s.map(|s| (s, None)));
        (r.gx, r.xg, r.sg)
    }
    fn add(&self, other: &Self) -> Self {
        elementwise::add(self, other)
    }
    fn add_relu(&self, other: &Self) -> Self {
        elementwise::add_relu(self, other)
    }
    fn add_assign(&mut self, other: &Self) {
        elementwise::add_assign(self, other)
    }
    fn tangent(&self) -> Option<&Tensor<T>> {
        None
    }
    fn into_primal(self) -> Tensor<T> {
        self
    }
}

/// A value with an optional tangent (`None` = structurally zero, skipped).
#[derive(Clone, Debug)]
pub struct Dual<T> {
    primal: Tensor<T>,
    tangent: Option<Tensor<T>>,
}

impl<T: Float> Dual<T> {
    pub fn new(primal: Tensor<T>, tangent: Option<Tensor<T>>) -> Self {
        if let Some(t) = &tangent {
            assert_eq!(t.shape(), primal.shape(), "tangent shape differs from primal");
        }
        Self { primal, tangent }
    }

    /// The tangent, or zeros when it is structurally zero.
    pub fn tangent_or_zeros(&self) -> Tensor<T> {
        self.tangent
            .clone()
            .unwrap_or_else(|| Tensor::zeros(self.primal.shape()))
    }

    pub fn into_parts(self) -> (Tensor<T>, Option<Tensor<T>>) {
        (self.primal, self.tangent)
    }
}

/// The channel affine map of a dual (followed by a ReLU when `relu`), value and
/// tangent in one pass ([`channel::affine_dual`]).
fn affine_dual<T: Float>(x: &Dual<T>, s: &Dual<T>, t: Option<&Dual<T>>, relu: bool) -> Dual<T> {
    let (primal, tangent) = channel::affine_dual(
        (&x.primal, x.tangent.as_ref()),
        (&s.primal, s.tangent.as_ref()),
        (t.map(|t| &t.primal), t.and_then(|t| t.tangent.as_ref())),
        relu,
    );
    Dual { primal, tangent }
}

fn add_opt<T: Float>(a: Option<Tensor<T>>, b: Option<Tensor<T>>) -> Option<Tensor<T>> {
    match (a, b) {
        (Some(mut x), Some(y)) => {
            elementwise::add_assign(&mut x, &y);
            Some(x)
        }
        (x, None) => x,
        (None, y) => y,
    }
}

impl<T: Float> Value<T> for Dual<T> {
    fn primal(&self) -> &Tensor<T> {
        &self.primal
    }
    fn constant(t: Tensor<T>) -> Self {
        Self {
            primal: t,
            tangent: None,
        }
    }
    fn linear(&self, f: impl Fn(&Tensor<T>) -> Tensor<T>) -> Self {
        Self {
            primal: f(&self.primal),
            tangent: self.tangent.as_ref().map(&f),
        }
    }
    fn linear_owned(self, f: impl Fn(Tensor<T>) -> Tensor<T>) -> Self {
        Self {
            primal: f(self.primal),
            tangent: self.tangent.map(&f),
        }
    }
    fn bilinear(a: &Self, b: &Self, f: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>) -> Self {
        let from_a = a.tangent.as_ref().map(|ta| f(ta, &b.primal));
        let from_b = b.tangent.as_ref().map(|tb| f(&a.primal, tb));
        Self {
            primal: f(&a.primal, &b.primal),
            tangent: add_opt(from_a, from_b),
        }
    }
    fn bilinear_fused(
        a: &Self,
        b: &Self,
        _: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>,
        dual: DualKernel<T>,
    ) -> Self {
        let (primal, tangent) = dual(&a.primal, a.tangent.as_ref(), &b.primal, b.tangent.as_ref());
        Self { primal, tangent }
    }
    fn bilinear_tangent_only(
        a: &Self,
        b: &Self,
        _: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>,
        tangent: TangentKernel<T>,
    ) -> Self {
        Self {
            primal: Tensor::zeros(&[0]),
            tangent: tangent(&a.primal, a.tangent.as_ref(), &b.primal, b.tangent.as_ref()),
        }
    }
    fn fused_pair(a: &Self, b: &Self, c: &Self, second_value: bool, kernel: PairKernel<T>) -> (Self, Self) {
        let ((first, first_tangent), (second, second_tangent)) = kernel(
            (&a.primal, a.tangent.as_ref()),
            (&b.primal, b.tangent.as_ref()),
            (&c.primal, c.tangent.as_ref()),
            second_value,
        );
        (
            Self {
                primal: first,
                tangent: first_tangent,
            },
            Self {
                primal: second.unwrap_or_else(|| Tensor::zeros(&[0])),
                tangent: second_tangent,
            },
        )
    }
    fn nonlinear(
        &self,
        f: impl Fn(&Tensor<T>) -> Tensor<T>,
        jvp: impl Fn(&Tensor<T>, &Tensor<T>) -> Tensor<T>,
    ) -> Self {
        Self {
            primal: f(&self.primal),
            tangent: self.tangent.as_ref().map(|t| jvp(&self.primal, t)),
        }
    }
    fn channel_affine(x: &Self, s: &Self, t: Option<&Self>) -> Self {
        affine_dual(x, s, t, false)
    }
    fn channel_affine_relu(x: &Self, s: &Self, t: Option<&Self>) -> Self {
        affine_dual(x, s, t, true)
    }
    fn channel_affine_add_relu(x: &Self, s: &Self, t: Option<&Self>, r: &Self) -> Self {
        let (primal, tangent) = channel::affine_add_relu_dual(
            (&x.primal, x.tangent.as_ref()),
            (&s.primal, s.tangent.as_ref()),
            (t.map(|t| &t.primal), t.and_then(|t| t.tangent.as_ref())),
            (&r.primal, r.tangent.as_ref()),
        );
        Dual { primal, tangent }
    }
    fn channel_affine_backward(
        relu_out: Option<&Tensor<T>>,
        x: &Self,
        g: &Self,
        s: Option<&Self>,
    ) -> (Option<Self>, Self, Self) {
        let r = channel::affine_backward(
            relu_out,
            (&x.primal, x.tangent.as_ref()),
            (&g.primal, g.tangent.as_ref()),
            s.map(|s| (&s.primal, s.tangent.as_ref())),
        );
        (
            r.gx.map(|primal| Self { primal, tangent: r.dgx }),
            Self {
                primal: r.xg,
                tangent: r.dxg,
            },
            Self {
                primal: r.sg,
                tangent: r.dsg,
            },
        )
    }
    fn add(&self, other: &Self) -> Self {
        let tangent = match (&self.tangent, &other.tangent) {
            (Some(a), Some(b)) => Some(elementwise::add(a, b)),
            (a, b) => a.as_ref().or(b.as_ref()).cloned(),
        };
        Self {
            primal: elementwise::add(&self.primal, &other.primal),
            tangent,
        }
    }
    fn add_relu(&self, other: &Self) -> Self {
        let primal = elementwise::add_relu(&self.primal, &other.primal);
        let tangent = match (&self.tangent, &other.tangent) {
            (Some(a), Some(b)) => Some(elementwise::add_relu_tangent(&primal, a, b)),
            (Some(t), None) | (None, Some(t)) => Some(elementwise::relu_mask(&primal, t)),
            (None, None) => None,
        };
        Self { primal, tangent }
    }
    fn add_assign(&mut self, other: &Self) {
        elementwise::add_assign(&mut self.primal, &other.primal);
        match (&mut self.tangent, &other.tangent) {
            (Some(a), Some(b)) => elementwise::add_assign(a, b),
            (a @ None, Some(b)) => *a = Some(b.clone()),
            (_, None) => {}
        }
    }
    fn tangent(&self) -> Option<&Tensor<T>> {
        self.tangent.as_ref()
    }
    fn into_primal(self) -> Tensor<T> {
        self.primal
    }
    fn forget_tangent(&mut self) {
        self.tangent = None;
    }
}
