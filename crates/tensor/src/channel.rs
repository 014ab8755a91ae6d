//! Per-channel operations on `[B, C, ...]` tensors (channel = dimension 1; a
//! `[B, F]` matrix has F channels of one element each): bias broadcast, BatchNorm's
//! scale, and their reductions over batch and space.

use crate::{Float, Tensor};
use rayon::prelude::*;

/// (batch, channels, elements per channel per example).
fn layout<T: Float>(x: &Tensor<T>) -> (usize, usize, usize) {
    let s = x.shape();
    assert!(s.len() >= 2, "channel op needs [B, C, ...], got {s:?}");
    (s[0], s[1], s[2..].iter().product())
}

/// `y[b, c, ...] = x[b, c, ...] · s[c]`.
pub fn scale<T: Float>(x: &Tensor<T>, s: &Tensor<T>) -> Tensor<T> {
    let (_, c, inner) = layout(x);
    assert_eq!(s.numel(), c, "channel scale: {} factors for {c} channels", s.numel());
    let mut out = x.clone();
    let s = s.data();
    out.data_mut().par_chunks_mut(c * inner).for_each(|ex| {
        for (ch, plane) in ex.chunks_mut(inner.max(1)).enumerate().take(c) {
            let f = s[ch];
            plane.iter_mut().for_each(|v| *v *= f);
        }
    });
    out
}

/// `y[b, c, ...] = x[b, c, ...] · s[c] + t[c]` (no `t`: zero) in one pass.
pub fn affine<T: Float>(x: &Tensor<T>, s: &Tensor<T>, t: Option<&Tensor<T>>) -> Tensor<T> {
    affine_sum(x, Some(x), s, None, t, |v, _| v)
}

/// `max(x·s + t, 0)` per channel in one pass (BatchNorm followed by a ReLU,
/// without storing the BatchNorm's output).
pub fn affine_relu<T: Float>(x: &Tensor<T>, s: &Tensor<T>, t: Option<&Tensor<T>>) -> Tensor<T> {
    affine_sum(x, Some(x), s, None, t, |v, _| if v > T::ZERO { v } else { T::ZERO })
}

/// `max(x·s + t + r, 0)` per channel in one pass: a BatchNorm, the residual sum
/// after it and that sum's ReLU, without storing the BatchNorm's output or the
/// sum (bit for bit [`affine`], then the sum, then the ReLU).
pub fn affine_add_relu<T: Float>(x: &Tensor<T>, s: &Tensor<T>, t: Option<&Tensor<T>>, r: &Tensor<T>) -> Tensor<T> {
    assert_eq!(r.shape(), x.shape(), "affine_add_relu: residual shape differs");
    let (_, c, inner) = layout(x);
    let n = x.numel();
    if n == 0 {
        return x.clone();
    }
    let inner = inner.max(1);
    let zero = vec![T::ZERO; c];
    let (sd, td) = (s.data(), t.map_or(&zero[..], |t| t.data()));
    // Written once into uninitialised capacity; the three planes zipped (no
    // indexing), so the loop vectorises.
    let mut data: Vec<T> = Vec::with_capacity(n);
    data.spare_capacity_mut()[..n]
        .par_chunks_mut(c * inner)
        .zip(x.data().par_chunks(c * inner))
        .zip(r.data().par_chunks(c * inner))
        .for_each(|((out, xe), re)| {
            let planes = out.chunks_mut(inner).zip(xe.chunks(inner)).zip(re.chunks(inner));
            for (ch, ((o, xp), rp)) in planes.enumerate() {
                let (sc, tc) = (sd[ch], td[ch]);
                for ((o, &xv), &rv) in o.iter_mut().zip(xp).zip(rp) {
                    let u = xv * sc + tc + rv;
                    o.write(if u > T::ZERO { u } else { T::ZERO });
                }
            }
        });
    // SAFETY: the chunks above partition the first n slots, every plane written whole.
    unsafe { data.set_len(n) };
    Tensor::new(x.shape().to_vec(), data).expect("n elements")
}

/// The JVP of [`affine_relu`] in one pass, `1[y > 0]·(ẋ·s + x·ṡ + ṫ)` with `y` its
/// output (`y > 0` exactly where the affine map is), `None` when no tangent is present.
pub fn affine_relu_tangent<T: Float>(
    y: &Tensor<T>,
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    s: &Tensor<T>,
    ds: Option<&Tensor<T>>,
    dt: Option<&Tensor<T>>,
) -> Option<Tensor<T>> {
    assert_eq!(
        y.shape(),
        x.shape(),
        "affine_relu_tangent: output and input shapes differ"
    );
    let mask = y.data();
    tangent_sum(x, dx, s, ds, dt, |v, k| if mask[k] > T::ZERO { v } else { T::ZERO })
}

/// The JVP of [`affine`] in one pass: `ẋ·s + x·ṡ + ṫ`, each term skipped when
/// its tangent is absent (`None` when all are).
pub fn affine_tangent<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    s: &Tensor<T>,
    ds: Option<&Tensor<T>>,
    dt: Option<&Tensor<T>>,
) -> Option<Tensor<T>> {
    tangent_sum(x, dx, s, ds, dt, |v, _| v)
}

/// `post(ẋ·s + x·ṡ + ṫ)` in one pass, `None` when every tangent is absent.
fn tangent_sum<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    s: &Tensor<T>,
    ds: Option<&Tensor<T>>,
    dt: Option<&Tensor<T>>,
    post: impl Fn(T, usize) -> T + Sync,
) -> Option<Tensor<T>> {
    if dx.is_none() && ds.is_none() && dt.is_none() {
        return None;
    }
    Some(affine_sum(x, dx, s, ds.map(|ds| (x, ds)), dt, post))
}

/// `post(a·s + x·r + t, index)` per channel, shaped like `like` (each term
/// optional), one pass; `post` fuses what follows (a ReLU, or its mask).
fn affine_sum<T: Float>(
    like: &Tensor<T>,
    a: Option<&Tensor<T>>,
    s: &Tensor<T>,
    xr: Option<(&Tensor<T>, &Tensor<T>)>,
    t: Option<&Tensor<T>>,
    post: impl Fn(T, usize) -> T + Sync,
) -> Tensor<T> {
    let (_, c, inner) = layout(like);
    let zero = vec![T::ZERO; c];
    let (sd, td) = (s.data(), t.map_or(&zero[..], |t| t.data()));
    let (rd, xd) = match xr {
        Some((x, r)) => (r.data(), Some(x.data())),
        None => (&zero[..], None),
    };
    let ad = a.map(|a| a.data());
    let inner = inner.max(1);
    let n = like.numel();
    // Written once, element by element, into uninitialised capacity (no zero-fill).
    let mut data: Vec<T> = Vec::with_capacity(n);
    data.spare_capacity_mut()[..n]
        .par_chunks_mut(c * inner)
        .enumerate()
        .for_each(|(b, ex)| {
            for (ch, plane) in ex.chunks_mut(inner).enumerate() {
                let base = (b * c + ch) * inner;
                let (sc, rc, tc) = (sd[ch], rd[ch], td[ch]);
                match (ad, xd) {
                    (Some(a), Some(x)) => {
                        for (k, o) in plane.iter_mut().enumerate() {
                            o.write(post(a[base + k] * sc + x[base + k] * rc + tc, base + k));
                        }
                    }
                    (Some(a), None) => {
                        for (k, o) in plane.iter_mut().enumerate() {
                            o.write(post(a[base + k] * sc + tc, base + k));
                        }
                    }
                    (None, Some(x)) => {
                        for (k, o) in plane.iter_mut().enumerate() {
                            o.write(post(x[base + k] * rc + tc, base + k));
                        }
                    }
                    (None, None) => {
                        for (k, o) in plane.iter_mut().enumerate() {
                            o.write(post(tc, base + k));
                        }
                    }
                }
            }
        });
    // SAFETY: the chunks above partition the first n slots (n = B·C·inner, each
    // example's chunk split into its C planes of `inner`), and every arm writes
    // every element of its plane.
    unsafe { data.set_len(n) };
    Tensor::new(like.shape().to_vec(), data).expect("n elements")
}

/// [`affine`] (or [`affine_relu`] when `relu`) and its tangent in one pass
/// over each plane, reading `x` and `ẋ` once: `(post(x·s + t), post'(ẋ·s +
/// x·ṡ + ṫ))`, the tangent `None` when `ẋ`, `ṡ` and `ṫ` are all absent. Equals
/// the value and tangent functions run one after the other, bit for bit.
pub fn affine_dual<T: Float>(
    (x, dx): (&Tensor<T>, Option<&Tensor<T>>),
    (s, ds): (&Tensor<T>, Option<&Tensor<T>>),
    (t, dt): (Option<&Tensor<T>>, Option<&Tensor<T>>),
    relu: bool,
) -> (Tensor<T>, Option<Tensor<T>>) {
    affine_residual_dual((x, dx), (s, ds), (t, dt), None, relu)
}

/// [`affine_dual`] with a residual `r` (and its tangent `ṙ`) added before the
/// ReLU: `(max(x·s + t + r, 0), 1[y > 0]·(ẋ·s + x·ṡ + ṫ + ṙ))` in one pass, bit
/// for bit the BatchNorm's dual, the sum's and the ReLU's one after the other.
pub fn affine_add_relu_dual<T: Float>(
    (x, dx): (&Tensor<T>, Option<&Tensor<T>>),
    (s, ds): (&Tensor<T>, Option<&Tensor<T>>),
    (t, dt): (Option<&Tensor<T>>, Option<&Tensor<T>>),
    (r, dr): (&Tensor<T>, Option<&Tensor<T>>),
) -> (Tensor<T>, Option<Tensor<T>>) {
    assert_eq!(r.shape(), x.shape(), "affine_add_relu_dual: residual shape differs");
    if let Some(dr) = dr {
        assert_eq!(
            dr.shape(),
            x.shape(),
            "affine_add_relu_dual: residual tangent shape differs"
        );
    }
    affine_residual_dual((x, dx), (s, ds), (t, dt), Some((r, dr)), true)
}

fn affine_residual_dual<T: Float>(
    (x, dx): (&Tensor<T>, Option<&Tensor<T>>),
    (s, ds): (&Tensor<T>, Option<&Tensor<T>>),
    (t, dt): (Option<&Tensor<T>>, Option<&Tensor<T>>),
    residual: Option<(&Tensor<T>, Option<&Tensor<T>>)>,
    relu: bool,
) -> (Tensor<T>, Option<Tensor<T>>) {
    if let Some(dx) = dx {
        assert_eq!(dx.shape(), x.shape(), "affine_dual: tangent shape differs");
    }
    let residual_tangent = residual.and_then(|(_, dr)| dr);
    let tangent = dx.is_some() || ds.is_some() || dt.is_some() || residual_tangent.is_some();
    let (_, c, inner) = layout(x);
    let (n, inner) = (x.numel(), inner.max(1));
    if let Some((r, dr)) = residual.filter(|_| n == 0 || !tangent) {
        let y = affine_add_relu(x, s, t, r);
        let dy = dr.map(|dr| crate::elementwise::relu_mask(&y, dr));
        return (y, dy);
    }
    if n == 0 || !tangent {
        let y = if relu { affine_relu(x, s, t) } else { affine(x, s, t) };
        let dy = if relu {
            affine_relu_tangent(&y, x, dx, s, ds, dt)
        } else {
            affine_tangent(x, dx, s, ds, dt)
        };
        return (y, dy);
    }
    let zero = vec![T::ZERO; c];
    let (sd, td) = (s.data(), t.map_or(&zero[..], |t| t.data()));
    let (rd, dtd) = (ds.map_or(&zero[..], |r| r.data()), dt.map_or(&zero[..], |t| t.data()));
    let (xd, dxd) = (x.data(), dx.map(|dx| dx.data()));
    let (resd, dresd) = (residual.map(|(r, _)| r.data()), residual_tangent.map(|dr| dr.data()));
    let (mut y, mut dy): (Vec<T>, Vec<T>) = (Vec::with_capacity(n), Vec::with_capacity(n));
    y.spare_capacity_mut()[..n]
        .par_chunks_mut(c * inner)
        .zip(dy.spare_capacity_mut()[..n].par_chunks_mut(c * inner))
        .enumerate()
        .for_each(|(b, (ys, dys))| {
            for (ch, (yp, dyp)) in ys.chunks_mut(inner).zip(dys.chunks_mut(inner)).enumerate() {
                let base = (b * c + ch) * inner;
                let (sc, tc, rc, dtc) = (sd[ch], td[ch], rd[ch], dtd[ch]);
                let xp = &xd[base..base + inner];
                let res = (
                    resd.map(|d| &d[base..base + inner]),
                    dresd.map(|d| &d[base..base + inner]),
                );
                let affine_tangent_present = dxd.is_some() || ds.is_some() || dt.is_some();
                match (dxd.map(|d| &d[base..base + inner]), ds.is_some()) {
                    (Some(dxp), true) => {
                        affine_dual_plane(yp, dyp, xp, (sc, tc, relu), res, |k, xv| dxp[k] * sc + xv * rc + dtc)
                    }
                    (Some(dxp), false) => affine_dual_plane(yp, dyp, xp, (sc, tc, relu), res, |k, _| dxp[k] * sc + dtc),
                    (None, true) => affine_dual_plane(yp, dyp, xp, (sc, tc, relu), res, |_, xv| xv * rc + dtc),
                    (None, false) if affine_tangent_present => {
                        affine_dual_plane(yp, dyp, xp, (sc, tc, relu), res, |_, _| dtc)
                    }
                    // Only the residual has a tangent: the sum's tangent is ṙ itself.
                    (None, false) => affine_dual_plane(yp, dyp, xp, (sc, tc, relu), (res.0, None), |k, _| {
                        res.1.map_or(T::ZERO, |dr| dr[k])
                    }),
                }
            }
        });
    // SAFETY: the chunks above partition the first n slots of both outputs
    // (each example's chunk split into its C planes), every plane written whole.
    unsafe {
        y.set_len(n);
        dy.set_len(n);
    }
    let shape = x.shape().to_vec();
    (
        Tensor::new(shape.clone(), y).expect("n elements"),
        Some(Tensor::new(shape, dy).expect("n elements")),
    )
}

/// One plane of [`affine_dual`]: `y = post(x·sc + tc [+ r])` and
/// `ẏ = post'(tangent(k, x) [+ ṙ])`, the residual's terms where given.
fn affine_dual_plane<T: Float>(
    y: &mut [std::mem::MaybeUninit<T>],
    dy: &mut [std::mem::MaybeUninit<T>],
    x: &[T],
    (sc, tc, relu): (T, T, bool),
    (r, dr): (Option<&[T]>, Option<&[T]>),
    tangent: impl Fn(usize, T) -> T,
) {
    let write = |v: T, tv: T, o: &mut std::mem::MaybeUninit<T>, d: &mut std::mem::MaybeUninit<T>| {
        let yv = if v > T::ZERO || !relu { v } else { T::ZERO };
        o.write(yv);
        d.write(if yv > T::ZERO || !relu { tv } else { T::ZERO });
    };
    match (r, dr) {
        (None, _) => {
            for (k, ((o, d), &xv)) in y.iter_mut().zip(dy.iter_mut()).zip(x).enumerate() {
                write(xv * sc + tc, tangent(k, xv), o, d);
            }
        }
        (Some(r), None) => {
            for (k, (((o, d), &xv), &rv)) in y.iter_mut().zip(dy.iter_mut()).zip(x).zip(r).enumerate() {
                write(xv * sc + tc + rv, tangent(k, xv), o, d);
            }
        }
        (Some(r), Some(dr)) => {
            let planes = y.iter_mut().zip(dy.iter_mut()).zip(x).zip(r.iter().zip(dr));
            for (k, (((o, d), &xv), (&rv, &drv))) in planes.enumerate() {
                write(xv * sc + tc + rv, tangent(k, xv) + drv, o, d);
            }
        }
    }
}

/// A `shape`-shaped tensor whose channel `c` holds `t[c]` everywhere.
pub fn broadcast<T: Float>(t: &Tensor<T>, shape: &[usize]) -> Tensor<T> {
    let mut out = Tensor::zeros(shape);
    let (_, c, inner) = layout(&out);
    assert_eq!(t.numel(), c, "channel broadcast: {} values for {c} channels", t.numel());
    let t = t.data();
    out.data_mut().par_chunks_mut(c * inner).for_each(|ex| {
        for (ch, plane) in ex.chunks_mut(inner.max(1)).enumerate().take(c) {
            plane.fill(t[ch]);
        }
    });
    out
}

/// Σ a·b over one plane with eight independent partial sums, so the loop
/// vectorises (a single running sum is bound by the latency of each add).
fn plane_dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::ZERO; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ac.remainder().iter().zip(bc.remainder()).map(|(&p, &q)| p * q).sum();
    for (pa, pb) in ac.zip(bc) {
        for k in 0..8 {
            lanes[k] += pa[k] * pb[k];
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// Σ a over one plane, eight partial sums (see [`plane_dot`]).
fn plane_sum<T: Float>(a: &[T]) -> T {
    let mut lanes = [T::ZERO; 8];
    let ac = a.chunks_exact(8);
    let tail: T = ac.remainder().iter().copied().sum();
    for pa in ac {
        for k in 0..8 {
            lanes[k] += pa[k];
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// Adds `f(range)` of every `[b, c]` plane of a `(b, c, inner)` layout into `out[c]`.
fn per_channel<T: Float>(b: usize, c: usize, inner: usize, out: &mut [T], f: impl Fn(std::ops::Range<usize>) -> T) {
    for bi in 0..b {
        for (ch, o) in out.iter_mut().enumerate() {
            let start = (bi * c + ch) * inner;
            *o += f(start..start + inner);
        }
    }
}

fn channel_vec<T: Float>(v: Vec<T>) -> Tensor<T> {
    Tensor::new(vec![v.len()], v).expect("one value per channel")
}

/// `out[c] = Σ_{b, ...} x[b, c, ...]`.
pub fn sum<T: Float>(x: &Tensor<T>) -> Tensor<T> {
    let (b, c, inner) = layout(x);
    let mut out = vec![T::ZERO; c];
    per_channel(b, c, inner, &mut out, |r| plane_sum(&x.data()[r]));
    channel_vec(out)
}

/// `out[c] = Σ_{b, ...} x[b, c, ...] · y[b, c, ...]`.
pub fn dot<T: Float>(x: &Tensor<T>, y: &Tensor<T>) -> Tensor<T> {
    assert_eq!(x.shape(), y.shape(), "channel dot: shapes differ");
    let (b, c, inner) = layout(x);
    let mut out = vec![T::ZERO; c];
    per_channel(b, c, inner, &mut out, |r| plane_dot(&x.data()[r.clone()], &y.data()[r]));
    channel_vec(out)
}

/// `(dot(x, g), sum(g))` of every example and channel separately (`[b·c]`
/// each, example-major), examples in parallel: BatchNorm's per-example
/// parameter gradients without summing over the batch.
pub fn dot_and_sum_per_example<T: Float>(x: &Tensor<T>, g: &Tensor<T>) -> (Vec<T>, Vec<T>) {
    assert_eq!(x.shape(), g.shape(), "channel dot: shapes differ");
    let (b, c, inner) = layout(x);
    let (mut dots, mut sums) = (vec![T::ZERO; b * c], vec![T::ZERO; b * c]);
    if inner == 0 {
        return (dots, sums);
    }
    dots.par_iter_mut()
        .zip(sums.par_iter_mut())
        .zip(x.data().par_chunks(inner).zip(g.data().par_chunks(inner)))
        .for_each(|((d, s), (xp, gp))| {
            *d = plane_dot(xp, gp);
            *s = plane_sum(gp);
        });
    (dots, sums)
}

/// `(dot(x, g), sum(g))` in one pass over `g` (BatchNorm's parameter cotangents).
pub fn dot_and_sum<T: Float>(x: &Tensor<T>, g: &Tensor<T>) -> (Tensor<T>, Tensor<T>) {
    let (d, s, _, _) = dot_and_sum_dual(x, None, g, None);
    (d, s)
}

/// [`dot_and_sum`] and its tangent in one pass, plane by plane while each plane
/// is in cache: `(Σ x·g, Σ g, Σ ẋ·g + x·ġ, Σ ġ)`, each tangent `None` when its
/// inputs carry none.
#[allow(clippy::type_complexity)]
pub fn dot_and_sum_dual<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    g: &Tensor<T>,
    dg: Option<&Tensor<T>>,
) -> (Tensor<T>, Tensor<T>, Option<Tensor<T>>, Option<Tensor<T>>) {
    assert_eq!(x.shape(), g.shape(), "channel dot: shapes differ");
    for t in dx.iter().chain(dg.iter()) {
        assert_eq!(t.shape(), x.shape(), "channel dot: tangent shape differs");
    }
    let (b, c, inner) = layout(x);
    let (mut xg, mut sg) = (vec![T::ZERO; c], vec![T::ZERO; c]);
    let (mut dxg, mut dsg) = (vec![T::ZERO; c], vec![T::ZERO; c]);
    let (xd, gd) = (x.data(), g.data());
    for bi in 0..b {
        for ch in 0..c {
            let r = (bi * c + ch) * inner..(bi * c + ch + 1) * inner;
            let (xp, gp) = (&xd[r.clone()], &gd[r.clone()]);
            xg[ch] += plane_dot(xp, gp);
            sg[ch] += plane_sum(gp);
            if let Some(dx) = dx {
                dxg[ch] += plane_dot(&dx.data()[r.clone()], gp);
            }
            if let Some(dg) = dg {
                let dgp = &dg.data()[r];
                dxg[ch] += plane_dot(xp, dgp);
                dsg[ch] += plane_sum(dgp);
            }
        }
    }
    let tangent_dot = (dx.is_some() || dg.is_some()).then(|| channel_vec(dxg));
    let tangent_sum = dg.is_some().then(|| channel_vec(dsg));
    (channel_vec(xg), channel_vec(sg), tangent_dot, tangent_sum)
}

/// What [`affine_backward`] returns: the input cotangent (when a scale was
/// given) and the per-channel reductions of the masked cotangent, each tangent
/// `None` where its inputs carry none.
pub struct MaskedBackward<T> {
    /// `m(g)·s`.
    pub gx: Option<Tensor<T>>,
    /// `m(ġ)·s + m(g)·ṡ`.
    pub dgx: Option<Tensor<T>>,
    /// `Σ x·m(g)`.
    pub xg: Tensor<T>,
    /// `Σ m(g)`.
    pub sg: Tensor<T>,
    /// `Σ ẋ·m(g) + x·m(ġ)`.
    pub dxg: Option<Tensor<T>>,
    /// `Σ m(ġ)`.
    pub dsg: Option<Tensor<T>>,
}

/// An eval-mode BatchNorm's backward, one pass over each plane while it is in
/// cache, optionally through the ReLU after it. With `m(g) = g·1[y > 0]` where
/// the ReLU's output `y` is given (`m(g) = g` where not): the input cotangent
/// `m(g)·s` and its tangent `m(ġ)·s + m(g)·ṡ` (when `scale` = `(s, ṡ)` is
/// given), and [`dot_and_sum_dual`]`(x, ẋ, m(g), m(ġ))`. Equals
/// [`crate::elementwise::relu_mask`], [`dot_and_sum_dual`] and
/// [`affine`]/[`affine_tangent`] run one after the other, bit for bit (the same
/// operations in the same order; planes run in parallel, their sums are added
/// in order), without the masked cotangents ever being stored.
pub fn affine_backward<T: Float>(
    relu_out: Option<&Tensor<T>>,
    (x, dx): (&Tensor<T>, Option<&Tensor<T>>),
    (g, dg): (&Tensor<T>, Option<&Tensor<T>>),
    scale: Option<(&Tensor<T>, Option<&Tensor<T>>)>,
) -> MaskedBackward<T> {
    for t in [relu_out, dx, Some(g), dg].into_iter().flatten() {
        assert_eq!(t.shape(), x.shape(), "affine_backward: shapes differ");
    }
    let (b, c, inner) = layout(x);
    let n = x.numel();
    if n == 0 {
        // No planes: the reductions are zero and the cotangents empty.
        let (gx, dgx, xg, sg, dxg, dsg) = affine_backward_unfused(relu_out, (x, dx), (g, dg), scale);
        return MaskedBackward {
            gx,
            dgx,
            xg,
            sg,
            dxg,
            dsg,
        };
    }
    let zero = vec![T::ZERO; c];
    let (sd, rd) = match scale {
        Some((s, ds)) => (s.data(), ds.map(|ds| ds.data())),
        None => (&zero[..], None),
    };
    let tangent_out = scale.is_some() && (dg.is_some() || rd.is_some());
    let (mut gx, mut dgx): (Vec<T>, Vec<T>) = (
        Vec::with_capacity(if scale.is_some() { n } else { 0 }),
        Vec::with_capacity(if tangent_out { n } else { 0 }),
    );
    // One slot per example (`None` where that output is not formed).
    fn slots<T>(v: &mut Vec<T>, on: bool, b: usize, n: usize) -> Vec<Option<&mut [std::mem::MaybeUninit<T>]>> {
        if on {
            v.spare_capacity_mut()[..n].chunks_mut(n / b).map(Some).collect()
        } else {
            (0..b).map(|_| None).collect()
        }
    }
    let (gx_slots, dgx_slots) = (
        slots(&mut gx, scale.is_some(), b, n),
        slots(&mut dgx, tangent_out, b, n),
    );
    // Per plane: Σ x·m(g), Σ m(g), Σ ẋ·m(g), Σ x·m(ġ), Σ m(ġ).
    const SUMS: usize = 5;
    let mut partial = vec![T::ZERO; b * c * SUMS];
    let (yd, xd, gd) = (relu_out.map(|y| y.data()), x.data(), g.data());
    partial
        .par_chunks_mut(c * SUMS)
        .zip(gx_slots)
        .zip(dgx_slots)
        .enumerate()
        .for_each(|(bi, ((sums, mut gx), mut dgx))| {
            let scratch = if yd.is_some() { inner } else { 0 };
            let (mut masked, mut dmasked) = (vec![T::ZERO; scratch], vec![T::ZERO; scratch]);
            for ch in 0..c {
                let r = (bi * c + ch) * inner..(bi * c + ch + 1) * inner;
                // The plane of `g` (or of `ġ`) as the reductions and the scaling read it.
                let plane_of = |from: &[T], to: &mut Vec<T>| {
                    if let Some(yd) = yd {
                        for ((o, &v), &m) in to.iter_mut().zip(from).zip(&yd[r.clone()]) {
                            *o = if m > T::ZERO { v } else { T::ZERO };
                        }
                    }
                };
                plane_of(&gd[r.clone()], &mut masked);
                let gp: &[T] = if yd.is_some() { &masked } else { &gd[r.clone()] };
                let xp = &xd[r.clone()];
                let p = &mut sums[ch * SUMS..][..SUMS];
                p[0] = plane_dot(xp, gp);
                p[1] = plane_sum(gp);
                if let Some(dx) = dx {
                    p[2] = plane_dot(&dx.data()[r.clone()], gp);
                }
                let dgp: Option<&[T]> = dg.map(|dg| {
                    plane_of(&dg.data()[r.clone()], &mut dmasked);
                    if yd.is_some() {
                        &dmasked[..]
                    } else {
                        &dg.data()[r.clone()]
                    }
                });
                if let Some(dgp) = dgp {
                    p[3] = plane_dot(xp, dgp);
                    p[4] = plane_sum(dgp);
                }
                let plane = ch * inner..(ch + 1) * inner;
                let sc = sd[ch];
                if let Some(out) = gx.as_deref_mut() {
                    for (o, &v) in out[plane.clone()].iter_mut().zip(gp) {
                        o.write(v * sc + T::ZERO);
                    }
                }
                if let Some(out) = dgx.as_deref_mut() {
                    let out = &mut out[plane];
                    match (dgp, rd) {
                        (Some(dgp), Some(rd)) => {
                            let rc = rd[ch];
                            for ((o, &a), &v) in out.iter_mut().zip(dgp).zip(gp) {
                                o.write(a * sc + v * rc + T::ZERO);
                            }
                        }
                        (Some(dgp), None) => {
                            for (o, &a) in out.iter_mut().zip(dgp) {
                                o.write(a * sc + T::ZERO);
                            }
                        }
                        (None, Some(rd)) => {
                            let rc = rd[ch];
                            for (o, &v) in out.iter_mut().zip(gp) {
                                o.write(v * rc + T::ZERO);
                            }
                        }
                        (None, None) => unreachable!("a tangent output needs ġ or ṡ"),
                    }
                }
            }
        });
    // SAFETY: each formed output's slots partition its first n elements, one
    // example each, and every plane of every slot was written above.
    unsafe {
        gx.set_len(if scale.is_some() { n } else { 0 });
        dgx.set_len(if tangent_out { n } else { 0 });
    }
    let (mut xg, mut sg, mut dxg, mut dsg) = (vec![T::ZERO; c], vec![T::ZERO; c], vec![T::ZERO; c], vec![T::ZERO; c]);
    for p in partial.chunks_exact(c * SUMS) {
        for ch in 0..c {
            let q = &p[ch * SUMS..][..SUMS];
            xg[ch] += q[0];
            sg[ch] += q[1];
            if dx.is_some() {
                dxg[ch] += q[2];
            }
            if dg.is_some() {
                dxg[ch] += q[3];
                dsg[ch] += q[4];
            }
        }
    }
    let shaped = |v: Vec<T>| Tensor::new(x.shape().to_vec(), v).expect("n elements");
    MaskedBackward {
        gx: scale.is_some().then(|| shaped(gx)),
        dgx: tangent_out.then(|| shaped(dgx)),
        xg: channel_vec(xg),
        sg: channel_vec(sg),
        dxg: (dx.is_some() || dg.is_some()).then(|| channel_vec(dxg)),
        dsg: dg.is_some().then(|| channel_vec(dsg)),
    }
}

/// [`affine_backward`] as the separate passes it fuses (the reference its
/// tests compare with, and the path for empty tensors).
#[allow(clippy::type_complexity)]
fn affine_backward_unfused<T: Float>(
    relu_out: Option<&Tensor<T>>,
    (x, dx): (&Tensor<T>, Option<&Tensor<T>>),
    (g, dg): (&Tensor<T>, Option<&Tensor<T>>),
    scale: Option<(&Tensor<T>, Option<&Tensor<T>>)>,
) -> (
    Option<Tensor<T>>,
    Option<Tensor<T>>,
    Tensor<T>,
    Tensor<T>,
    Option<Tensor<T>>,
    Option<Tensor<T>>,
) {
    let masked = |g: &Tensor<T>| match relu_out {
        Some(y) => crate::elementwise::relu_mask(y, g),
        None => g.clone(),
    };
    let mg = masked(g);
    let mdg = dg.map(masked);
    let (xg, sg, dxg, dsg) = dot_and_sum_dual(x, dx, &mg, mdg.as_ref());
    let gx = scale.map(|(s, _)| affine(&mg, s, None));
    let dgx = scale.and_then(|(s, ds)| affine_tangent(&mg, mdg.as_ref(), s, ds, None));
    (gx, dgx, xg, sg, dxg, dsg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x`, `ẋ` `[2, 3, 2]` and per-channel `s`, `ṡ`, `t`.
    #[allow(clippy::type_complexity)]
    fn affine_operands<T: Float>() -> (Tensor<T>, Tensor<T>, Tensor<T>, Tensor<T>, Tensor<T>) {
        let t = |shape: Vec<usize>, v: Vec<f64>| Tensor::new(shape, v.into_iter().map(T::from_f64).collect()).unwrap();
        (
            t(vec![2, 3, 2], (0..12).map(|i| i as f64 * 0.5 - 2.0).collect()),
            t(vec![2, 3, 2], (0..12).map(|i| (i as f64).sin()).collect()),
            t(vec![3], vec![1.5, -0.5, 2.0]),
            t(vec![3], vec![0.25, 0.5, -1.0]),
            t(vec![3], vec![0.1, 0.2, 0.3]),
        )
    }

    #[test]
    fn affine_and_its_tangent_match_the_separate_ops() {
        let (x, dx, s, ds, t) = affine_operands::<f64>();
        let want = crate::elementwise::add(&scale(&x, &s), &broadcast(&t, x.shape()));
        assert_eq!(affine(&x, &s, Some(&t)), want);
        assert_eq!(affine(&x, &s, None), scale(&x, &s));
        let tangent = affine_tangent(&x, Some(&dx), &s, Some(&ds), Some(&t)).unwrap();
        let parts = crate::elementwise::add(&scale(&dx, &s), &scale(&x, &ds));
        let want = crate::elementwise::add(&parts, &broadcast(&t, x.shape()));
        for (a, b) in tangent.data().iter().zip(want.data()) {
            assert!((a - b).abs() < 1e-15);
        }
        assert!(affine_tangent(&x, None, &s, None, None).is_none());
        assert_eq!(
            affine_tangent(&x, None, &s, None, Some(&t)),
            Some(broadcast(&t, x.shape()))
        );
    }

    #[test]
    fn fused_relu_equals_affine_then_relu_bit_for_bit() {
        let (x, dx, s, ds, t) = affine_operands::<f32>();
        let z = affine(&x, &s, Some(&t));
        let y = affine_relu(&x, &s, Some(&t));
        assert_eq!(y, crate::elementwise::relu(&z));
        assert!(y.data().contains(&0.0) && y.data().iter().any(|&v| v > 0.0));
        let dz = affine_tangent(&x, Some(&dx), &s, Some(&ds), Some(&t)).unwrap();
        let dy = affine_relu_tangent(&y, &x, Some(&dx), &s, Some(&ds), Some(&t)).unwrap();
        assert_eq!(dy, crate::elementwise::relu_mask(&z, &dz));
        assert!(affine_relu_tangent(&y, &x, None, &s, None, None).is_none());
    }

    #[test]
    fn reductions_are_adjoint_to_broadcast_and_scale() {
        let x = Tensor::<f64>::new(vec![2, 3, 2], (0..12).map(|i| i as f64 - 4.5).collect()).unwrap();
        let y = Tensor::<f64>::new(vec![2, 3, 2], (0..12).map(|i| (i as f64).sin()).collect()).unwrap();
        let t = Tensor::<f64>::new(vec![3], vec![0.5, -1.0, 2.0]).unwrap();
        // ⟨broadcast(t), y⟩ = ⟨t, sum(y)⟩
        let lhs = crate::elementwise::dot_f64(&broadcast(&t, &[2, 3, 2]), &y);
        let rhs = crate::elementwise::dot_f64(&t, &sum(&y));
        assert!((lhs - rhs).abs() < 1e-12);
        // ⟨scale(x, t), y⟩ = ⟨t, dot(x, y)⟩
        let lhs = crate::elementwise::dot_f64(&scale(&x, &t), &y);
        let rhs = crate::elementwise::dot_f64(&t, &dot(&x, &y));
        assert!((lhs - rhs).abs() < 1e-12);
    }

    #[test]
    fn fused_dot_and_sum_equal_the_separate_reductions() {
        // 37 elements per plane: exercises the 8-lane body and the tail.
        let shape = [3, 2, 37];
        let make =
            |f: fn(f64) -> f64| Tensor::<f64>::new(shape.to_vec(), (0..222).map(|i| f(i as f64)).collect()).unwrap();
        let (x, dx, g, dg) = (
            make(|i| i.sin()),
            make(|i| i.cos()),
            make(|i| (0.3 * i).sin()),
            make(|i| 1.0 / (1.0 + i)),
        );
        let naive = |a: &Tensor<f64>, b: Option<&Tensor<f64>>| -> Vec<f64> {
            (0..2)
                .map(|ch| {
                    (0..3)
                        .flat_map(|bi| (0..37).map(move |k| (bi * 2 + ch) * 37 + k))
                        .map(|i| a.data()[i] * b.map_or(1.0, |b| b.data()[i]))
                        .sum()
                })
                .collect()
        };
        let close = |a: &Tensor<f64>, b: &[f64]| a.data().iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-12);
        let (xg, sg, dxg, dsg) = dot_and_sum_dual(&x, Some(&dx), &g, Some(&dg));
        assert!(close(&xg, &naive(&x, Some(&g))) && close(&sg, &naive(&g, None)));
        let want: Vec<f64> = naive(&dx, Some(&g))
            .iter()
            .zip(naive(&x, Some(&dg)))
            .map(|(a, b)| a + b)
            .collect();
        assert!(close(&dxg.unwrap(), &want));
        assert!(close(&dsg.unwrap(), &naive(&dg, None)));
        assert!(close(&dot(&x, &g), &naive(&x, Some(&g))) && close(&sum(&g), &naive(&g, None)));
        let (_, _, only_dx, no_dsum) = dot_and_sum_dual(&x, Some(&dx), &g, None);
        assert!(close(&only_dx.unwrap(), &naive(&dx, Some(&g))) && no_dsum.is_none());
        assert!(dot_and_sum_dual(&x, None, &g, None).2.is_none());
    }

    #[test]
    fn fused_affine_backward_equals_the_separate_passes_bit_for_bit() {
        // 37 elements per plane (the 8-lane body and a tail); about half masked.
        let shape = [3, 4, 37];
        let make = |f: &dyn Fn(f32) -> f32| {
            Tensor::<f32>::new(shape.to_vec(), (0..444).map(|i| f(i as f32)).collect()).unwrap()
        };
        let y = make(&|i| (0.37 * i).sin().max(0.0));
        let (x, dx) = (make(&|i| (0.11 * i).cos() * 3.0), make(&|i| (0.23 * i).sin()));
        let (g, dg) = (make(&|i| (0.7 * i).sin() - 0.1), make(&|i| 1.0 / (1.0 + i)));
        let (s, ds) = (
            Tensor::new(vec![4], vec![1.5f32, -0.5, 2.0, 0.3]).unwrap(),
            Tensor::new(vec![4], vec![0.25f32, 0.5, -1.0, 0.0]).unwrap(),
        );
        let mut cases = 0;
        for mask in [None, Some(&y)] {
            for dx in [None, Some(&dx)] {
                for dg in [None, Some(&dg)] {
                    for scale in [None, Some((&s, None)), Some((&s, Some(&ds)))] {
                        let fused = affine_backward(mask, (&x, dx), (&g, dg), scale);
                        let (gx, dgx, xg, sg, dxg, dsg) = affine_backward_unfused(mask, (&x, dx), (&g, dg), scale);
                        assert_eq!(fused.gx, gx);
                        assert_eq!(fused.dgx, dgx);
                        assert_eq!((fused.xg, fused.sg), (xg, sg));
                        assert_eq!((fused.dxg, fused.dsg), (dxg, dsg));
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 24);
        // The mask matters: the masked reductions differ from the unmasked ones.
        let masked = affine_backward(Some(&y), (&x, None), (&g, None), None);
        assert_ne!(masked.sg, sum(&g));
        assert_eq!(affine_backward(None, (&x, None), (&g, None), None).sg, sum(&g));
        // Empty planes.
        let empty = Tensor::<f32>::zeros(&[2, 4, 0]);
        let none = affine_backward(Some(&empty), (&empty, None), (&empty, None), Some((&s, None)));
        assert_eq!(none.gx.map(|t| t.numel()), Some(0));
    }

    /// A `[2, 3, 37]` tensor of `f(index)` (planes past the 8-lane blocks).
    fn plane_tensor(f: &dyn Fn(f32) -> f32) -> Tensor<f32> {
        Tensor::new(vec![2, 3, 37], (0..222).map(|i| f(i as f32)).collect()).unwrap()
    }

    /// Per-channel scale, its tangent, shift and its tangent for [`plane_tensor`]s.
    fn channel_operands() -> [Tensor<f32>; 4] {
        let c = |v: [f32; 3]| Tensor::new(vec![3], v.to_vec()).unwrap();
        [
            c([1.5, -0.5, 2.0]),
            c([0.25, 0.5, -1.0]),
            c([0.1, -0.2, 0.3]),
            c([0.5, 0.0, -0.25]),
        ]
    }

    #[test]
    fn affine_dual_equals_the_value_and_tangent_passes_bit_for_bit() {
        let (x, dx) = (
            plane_tensor(&|i| (0.3 * i).sin() * 2.0),
            plane_tensor(&|i| (0.17 * i).cos()),
        );
        let [s, ds, t, dt] = channel_operands();
        let mut cases = 0;
        for relu in [false, true] {
            for dx in [None, Some(&dx)] {
                for ds in [None, Some(&ds)] {
                    for (t, dt) in [(None, None), (Some(&t), None), (Some(&t), Some(&dt))] {
                        let (y, dy) = affine_dual((&x, dx), (&s, ds), (t, dt), relu);
                        let want_y = if relu {
                            affine_relu(&x, &s, t)
                        } else {
                            affine(&x, &s, t)
                        };
                        let want_dy = if relu {
                            affine_relu_tangent(&want_y, &x, dx, &s, ds, dt)
                        } else {
                            affine_tangent(&x, dx, &s, ds, dt)
                        };
                        assert_eq!(y, want_y, "relu {relu}");
                        assert_eq!(dy, want_dy, "relu {relu}");
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 24);
    }

    #[test]
    fn affine_add_relu_equals_the_affine_map_the_sum_and_the_relu_bit_for_bit() {
        use crate::elementwise::{add_relu, add_relu_tangent, relu_mask};
        let (x, dx) = (
            plane_tensor(&|i| (0.3 * i).sin() * 2.0),
            plane_tensor(&|i| (0.17 * i).cos()),
        );
        let (r, dr) = (
            plane_tensor(&|i| (0.11 * i).cos() * 1.5),
            plane_tensor(&|i| (0.23 * i).sin()),
        );
        let [s, ds, t, dt] = channel_operands();
        let mut cases = 0;
        for dr in [None, Some(&dr)] {
            for dx in [None, Some(&dx)] {
                for ds in [None, Some(&ds)] {
                    for (t, dt) in [(None, None), (Some(&t), None), (Some(&t), Some(&dt))] {
                        let (y, dy) = affine_add_relu_dual((&x, dx), (&s, ds), (t, dt), (&r, dr));
                        // The BatchNorm's dual, then the sum's with its ReLU.
                        let (bn, dbn) = affine_dual((&x, dx), (&s, ds), (t, dt), false);
                        let want_y = add_relu(&bn, &r);
                        let want_dy = match (&dbn, dr) {
                            (Some(a), Some(b)) => Some(add_relu_tangent(&want_y, a, b)),
                            (Some(a), None) | (None, Some(a)) => Some(relu_mask(&want_y, a)),
                            (None, None) => None,
                        };
                        assert_eq!(
                            y,
                            want_y,
                            "value (ẋ {}, ṡ {}, ṫ {})",
                            dx.is_some(),
                            ds.is_some(),
                            dt.is_some()
                        );
                        assert_eq!(dy, want_dy, "tangent (ṙ {}, ẋ {})", dr.is_some(), dx.is_some());
                        assert_eq!(affine_add_relu(&x, &s, t, &r), want_y);
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 24);
        // Some outputs are clipped and some are not, so the mask is exercised.
        let y = affine_add_relu(&x, &s, Some(&t), &r);
        assert!(y.data().contains(&0.0) && y.data().iter().any(|&v| v > 0.0));
    }
}
