//! Grouped (depthwise when groups = channels) and dilated convolutions on top
//! of the dense kernels: each group's channels are cut out, convolved by the
//! dense kernel and joined back; a dilated kernel is the dense kernel with
//! `dilation − 1` zeros between its taps (exact; it costs the larger kernel's
//! multiplications), and its weight gradient the dilated one's taps.

use super::*;
use crate::nd;

/// Groups and dilation of a convolution (PyTorch's `groups`, `dilation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grouping {
    pub groups: usize,
    pub dilation: usize,
}

impl Grouping {
    pub const DENSE: Grouping = Grouping { groups: 1, dilation: 1 };

    /// The kernel size the dense kernels see for a `k`-tap kernel.
    pub fn span(&self, k: usize) -> usize {
        (k - 1) * self.dilation + 1
    }
}

/// `w` `[O, C, kh, kw]` with `d − 1` zeros between taps.
fn dilate<T: Float>(w: &Tensor<T>, d: usize) -> Tensor<T> {
    if d == 1 {
        return w.clone();
    }
    let s = w.shape();
    let (kh, kw) = (s[2], s[3]);
    let (sh, sw) = ((kh - 1) * d + 1, (kw - 1) * d + 1);
    let mut out = Tensor::zeros(&[s[0], s[1], sh, sw]);
    let dst = out.data_mut();
    for (plane, src) in w.data().chunks_exact(kh * kw).enumerate() {
        for i in 0..kh {
            for j in 0..kw {
                dst[plane * sh * sw + i * d * sw + j * d] = src[i * kw + j];
            }
        }
    }
    out
}

/// The taps of a dilated kernel's gradient `g` `[O, C, sh, sw]` (the adjoint of [`dilate`]).
fn taps<T: Float>(g: Tensor<T>, d: usize, kh: usize, kw: usize) -> Tensor<T> {
    if d == 1 {
        return g;
    }
    let s = g.shape().to_vec();
    let (sh, sw) = (s[2], s[3]);
    let data = g
        .data()
        .chunks_exact(sh * sw)
        .flat_map(|plane| (0..kh).flat_map(move |i| (0..kw).map(move |j| plane[i * d * sw + j * d])))
        .collect();
    Tensor::new(vec![s[0], s[1], kh, kw], data).expect("taps of every plane")
}

/// Group `k` of `groups` along `axis` (channels of activations, rows of weights).
fn part<T: Float>(x: &Tensor<T>, axis: usize, k: usize, groups: usize) -> Tensor<T> {
    if groups == 1 {
        return x.clone();
    }
    let n = x.shape()[axis] / groups;
    nd::slice_along(x, axis, k * n, n)
}

/// The groups' results side by side along `axis`.
fn join<T: Float>(parts: Vec<Tensor<T>>, axis: usize) -> Tensor<T> {
    if parts.len() == 1 {
        return parts.into_iter().next().expect("one part");
    }
    let mut shape = parts[0].shape().to_vec();
    shape[axis] = parts.iter().map(|p| p.shape()[axis]).sum();
    let outer: usize = shape[..axis].iter().product();
    let mut data = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for p in &parts {
            let len = p.numel() / outer;
            data.extend_from_slice(&p.data()[o * len..(o + 1) * len]);
        }
    }
    Tensor::new(shape, data).expect("joined parts")
}

fn join_opt<T: Float>(parts: Vec<Option<Tensor<T>>>, axis: usize) -> Option<Tensor<T>> {
    parts.into_iter().collect::<Option<Vec<_>>>().map(|p| join(p, axis))
}

/// [`forward_dual`] of a grouped, dilated convolution; w `[O, C/groups, kh, kw]`.
pub fn forward_dual_grouped<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    w: &Tensor<T>,
    dw: Option<&Tensor<T>>,
    g: ConvGeometry,
    grouping: Grouping,
) -> (Tensor<T>, Option<Tensor<T>>) {
    let Grouping { groups, dilation } = grouping;
    let (w, dw) = (dilate(w, dilation), dw.map(|t| dilate(t, dilation)));
    let (mut ys, mut dys) = (Vec::new(), Vec::new());
    for k in 0..groups {
        let (xk, wk) = (part(x, 1, k, groups), part(&w, 0, k, groups));
        let dxk = dx.map(|t| part(t, 1, k, groups));
        let dwk = dw.as_ref().map(|t| part(t, 0, k, groups));
        let (y, dy) = forward_dual(&xk, dxk.as_ref(), &wk, dwk.as_ref(), g);
        ys.push(y);
        dys.push(dy);
    }
    let tangent = dx.is_some() || dw.is_some();
    (join(ys, 1), if tangent { join_opt(dys, 1) } else { None })
}

/// [`backward_input_dual`] of a grouped, dilated convolution.
pub fn backward_input_dual_grouped<T: Float>(
    gy: &Tensor<T>,
    dgy: Option<&Tensor<T>>,
    w: &Tensor<T>,
    dw: Option<&Tensor<T>>,
    input_hw: (usize, usize),
    g: ConvGeometry,
    grouping: Grouping,
) -> (Tensor<T>, Option<Tensor<T>>) {
    let Grouping { groups, dilation } = grouping;
    let (w, dw) = (dilate(w, dilation), dw.map(|t| dilate(t, dilation)));
    let (mut gxs, mut dgxs) = (Vec::new(), Vec::new());
    for k in 0..groups {
        let (gyk, wk) = (part(gy, 1, k, groups), part(&w, 0, k, groups));
        let dgyk = dgy.map(|t| part(t, 1, k, groups));
        let dwk = dw.as_ref().map(|t| part(t, 0, k, groups));
        let (gx, dgx) = backward_input_dual(&gyk, dgyk.as_ref(), &wk, dwk.as_ref(), input_hw, g);
        gxs.push(gx);
        dgxs.push(dgx);
    }
    let tangent = dgy.is_some() || dw.is_some();
    (join(gxs, 1), if tangent { join_opt(dgxs, 1) } else { None })
}

/// The weight gradient of a grouped, dilated convolution and its tangent
/// (the value only when `want_value`), shape `w_shape` `[O, C/groups, kh, kw]`.
#[allow(clippy::too_many_arguments)]
pub fn backward_weight_grouped<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    gy: &Tensor<T>,
    dgy: Option<&Tensor<T>>,
    w_shape: &[usize],
    g: ConvGeometry,
    grouping: Grouping,
    want_value: bool,
) -> (Option<Tensor<T>>, Option<Tensor<T>>) {
    let Grouping { groups, dilation } = grouping;
    let (kh, kw) = (w_shape[2], w_shape[3]);
    let part_shape = [w_shape[0] / groups, w_shape[1], grouping.span(kh), grouping.span(kw)];
    let (mut gws, mut dgws) = (Vec::new(), Vec::new());
    for k in 0..groups {
        let (xk, gyk) = (part(x, 1, k, groups), part(gy, 1, k, groups));
        let dxk = dx.map(|t| part(t, 1, k, groups));
        let dgyk = dgy.map(|t| part(t, 1, k, groups));
        let (gw, dgw) = weight_gradient_parts(&xk, dxk.as_ref(), &gyk, dgyk.as_ref(), &part_shape, g, want_value);
        gws.push(gw);
        dgws.push(dgw);
    }
    let value = join_opt(gws, 0).map(|t| taps(t, dilation, kh, kw));
    let tangent = join_opt(dgws, 0).map(|t| taps(t, dilation, kh, kw));
    (value, tangent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], seed: u64) -> Tensor<f64> {
        let n: usize = shape.iter().product();
        let data = (0..n as u64)
            .map(|i| (((i + 1) * (seed * 2 + 7919) % 1013) as f64) / 506.5 - 1.0)
            .collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    }

    /// Direct definition: `y[b,o,p,q] = Σ_{c in o's group, i, j} x[b, c, p·s − pad + i·d, q·s − pad + j·d] w[o, c', i, j]`.
    fn direct(x: &Tensor<f64>, w: &Tensor<f64>, g: ConvGeometry, grp: Grouping) -> Tensor<f64> {
        let (xs, ws) = (x.shape(), w.shape());
        let (b, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        let (o, cg, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
        let (ho, wo) = (
            out_size(h, grp.span(kh), g.stride, g.padding),
            out_size(wd, grp.span(kw), g.stride, g.padding),
        );
        let og = o / grp.groups;
        let mut y = Tensor::zeros(&[b, o, ho, wo]);
        for bi in 0..b {
            for oi in 0..o {
                let group = oi / og;
                for p in 0..ho {
                    for q in 0..wo {
                        let mut acc = 0.0;
                        for ci in 0..cg {
                            let cc = group * cg + ci;
                            for i in 0..kh {
                                for j in 0..kw {
                                    let yy = (p * g.stride + i * grp.dilation) as isize - g.padding as isize;
                                    let xx = (q * g.stride + j * grp.dilation) as isize - g.padding as isize;
                                    if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < wd {
                                        acc += x.data()[((bi * c + cc) * h + yy as usize) * wd + xx as usize]
                                            * w.data()[((oi * cg + ci) * kh + i) * kw + j];
                                    }
                                }
                            }
                        }
                        y.data_mut()[((bi * o + oi) * ho + p) * wo + q] = acc;
                    }
                }
            }
        }
        y
    }

    fn dot(a: &Tensor<f64>, b: &Tensor<f64>) -> f64 {
        a.data().iter().zip(b.data()).map(|(p, q)| p * q).sum()
    }

    #[test]
    fn grouped_dilated_convolution_and_its_adjoints() {
        for (groups, dilation, stride, padding) in [(3, 1, 1, 1), (6, 1, 2, 1), (2, 2, 1, 2), (1, 3, 1, 0)] {
            let (g, grp) = (ConvGeometry { stride, padding }, Grouping { groups, dilation });
            let x = t(&[2, 6, 9, 8], 1);
            let w = t(&[12, 6 / groups, 3, 3], 2);
            let (y, _) = forward_dual_grouped(&x, None, &w, None, g, grp);
            let want = direct(&x, &w, g, grp);
            assert_eq!(y.shape(), want.shape());
            for (a, b) in y.data().iter().zip(want.data()) {
                assert!(
                    (a - b).abs() < 1e-12,
                    "{groups} groups, dilation {dilation}: {a} vs {b}"
                );
            }
            // <conv(x, w), gy> = <x, backward_input(gy)> = <w, backward_weight(x, gy)>.
            let gy = t(y.shape(), 3);
            let (gx, _) = backward_input_dual_grouped(&gy, None, &w, None, (9, 8), g, grp);
            let (gw, _) = backward_weight_grouped(&x, None, &gy, None, w.shape(), g, grp, true);
            let gw = gw.unwrap();
            let lhs = dot(&y, &gy);
            assert!((lhs - dot(&x, &gx)).abs() < 1e-10 * lhs.abs().max(1.0));
            assert!((lhs - dot(&w, &gw)).abs() < 1e-10 * lhs.abs().max(1.0));
            // Tangents are the same bilinear maps in each argument.
            let (dx, dw) = (t(x.shape(), 4), t(w.shape(), 5));
            let (_, dy) = forward_dual_grouped(&x, Some(&dx), &w, Some(&dw), g, grp);
            let expect = direct(&dx, &w, g, grp);
            let expect2 = direct(&x, &dw, g, grp);
            for ((a, b), c) in dy.unwrap().data().iter().zip(expect.data()).zip(expect2.data()) {
                assert!((a - b - c).abs() < 1e-12);
            }
        }
    }
}
