//! PNG figures: the influence grid (test image, then its most helpful and most
//! harmful training images with labels and scores) and the validation scatter
//! plot. Text is drawn with the `font8x8` bitmap font.

use anyhow::{Context, Result};
use font8x8::{UnicodeFonts, BASIC_FONTS};
use image::{Rgb, RgbImage};

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
pub const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
pub const GREEN: Rgb<u8> = Rgb([0, 128, 0]);
pub const RED: Rgb<u8> = Rgb([192, 0, 0]);
const BLUE: Rgb<u8> = Rgb([30, 60, 200]);

pub struct Canvas {
    img: RgbImage,
}

impl Canvas {
    pub fn new(width: u32, height: u32) -> Self {
        Canvas {
            img: RgbImage::from_pixel(width, height, WHITE),
        }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, c);
        }
    }

    /// An image `[C, H, W]` (C = 1 grey or 3 RGB), min-max scaled, magnified `scale`×.
    pub fn image(&mut self, x: i64, y: i64, pixels: &[f64], shape: &[usize], scale: i64) {
        let (c, h, w) = (shape[0], shape[1], shape[2]);
        let (lo, hi) = pixels
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        for py in 0..h {
            for px in 0..w {
                let ch = |k: usize| {
                    let v = pixels[(k.min(c - 1) * h + py) * w + px];
                    (((v - lo) / span) * 255.0).round().clamp(0.0, 255.0) as u8
                };
                let col = Rgb([ch(0), ch(1), ch(2)]);
                for dy in 0..scale {
                    for dx in 0..scale {
                        self.put(x + px as i64 * scale + dx, y + py as i64 * scale + dy, col);
                    }
                }
            }
        }
    }

    /// Text in the 8×8 bitmap font; returns its width in pixels.
    pub fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb<u8>) -> i64 {
        for (k, ch) in s.chars().enumerate() {
            let glyph = BASIC_FONTS.get(ch).or_else(|| BASIC_FONTS.get('?')).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.put(x + 8 * k as i64 + col, y + row as i64, c);
                    }
                }
            }
        }
        8 * s.chars().count() as i64
    }

    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for s in 0..=steps {
            self.put(x0 + (x1 - x0) * s / steps, y0 + (y1 - y0) * s / steps, c);
        }
    }

    pub fn dot(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        for dy in -2..=2 {
            for dx in -2..=2 {
                if dx * dx + dy * dy <= 5 {
                    self.put(x + dx, y + dy, c);
                }
            }
        }
    }

    /// Encodes as PNG.
    pub fn png(&self) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.img
            .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
            .context("encoding the PNG")?;
        Ok(bytes)
    }
}

/// One image of the influence grid with its caption lines.
pub struct Tile {
    pub pixels: Vec<f64>,
    pub caption: Vec<(String, Rgb<u8>)>,
}

/// Rows of tiles: per test point, the test image then helpful then harmful examples.
pub fn grid(rows: &[(String, Vec<Tile>)], shape: &[usize]) -> Result<Vec<u8>> {
    let scale = (96 / shape[1].max(1)).max(1) as i64;
    let (tw, th) = (shape[2] as i64 * scale, shape[1] as i64 * scale);
    let cell_w = tw.max(13 * 8) + 12;
    let cell_h = th + 3 * 10 + 14;
    let cols = rows.iter().map(|r| r.1.len()).max().unwrap_or(1) as i64;
    let mut canvas = Canvas::new(
        (cols * cell_w + 12) as u32,
        (rows.len() as i64 * (cell_h + 14) + 8) as u32,
    );
    for (r, (title, tiles)) in rows.iter().enumerate() {
        let y0 = 4 + r as i64 * (cell_h + 14);
        canvas.text(6, y0, title, BLACK);
        for (c, tile) in tiles.iter().enumerate() {
            let x = 6 + c as i64 * cell_w;
            canvas.image(x, y0 + 12, &tile.pixels, shape, scale);
            for (k, (line, col)) in tile.caption.iter().enumerate() {
                canvas.text(x, y0 + 14 + th + 10 * k as i64, line, *col);
            }
        }
    }
    canvas.png()
}

/// Scatter plot of predicted (x) against actual (y) changes with the y = x line.
pub fn scatter(predicted: &[f64], actual: &[f64], title: &str) -> Result<Vec<u8>> {
    let (w, h, m) = (520i64, 520i64, 60i64);
    let mut canvas = Canvas::new(w as u32, h as u32);
    let all = predicted.iter().chain(actual);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, u), &v| (l.min(v), u.max(v)));
    let pad = 0.05 * (hi - lo).max(1e-30);
    let (lo, hi) = (lo - pad, hi + pad);
    let px = |v: f64| m + ((v - lo) / (hi - lo) * (w - 2 * m) as f64) as i64;
    let py = |v: f64| h - m - ((v - lo) / (hi - lo) * (h - 2 * m) as f64) as i64;
    canvas.line((m, h - m), (w - m, h - m), BLACK);
    canvas.line((m, m), (m, h - m), BLACK);
    canvas.line((px(lo), py(lo)), (px(hi), py(hi)), BLUE);
    if lo < 0.0 && hi > 0.0 {
        canvas.line((px(0.0), m), (px(0.0), h - m), Rgb([200, 200, 200]));
        canvas.line((m, py(0.0)), (w - m, py(0.0)), Rgb([200, 200, 200]));
    }
    for (&a, &b) in predicted.iter().zip(actual) {
        canvas.dot(px(a), py(b), RED);
    }
    canvas.text(m, 16, title, BLACK);
    canvas.text(w / 2 - 120, h - m + 22, "predicted change of test loss", BLACK);
    canvas.text(8, 36, "actual (retrained)", BLACK);
    canvas.text(m, h - m + 6, &format!("{lo:.2e}"), BLACK);
    canvas.text(w - m - 72, h - m + 6, &format!("{hi:.2e}"), BLACK);
    canvas.png()
}
