//! A small SVG line chart (train and validation curves over steps) that any browser opens with
//! no network. Hand-written rather than plotters: a dozen lines of SVG need no font stack or
//! extra compile time.

use std::fmt::Write;

pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// An SVG chart of `series` with axes, ticks and a legend.
pub fn line_chart(title: &str, x_label: &str, series: &[Series]) -> String {
    let (w, h, l, r, t, b) = (640.0, 360.0, 60.0, 20.0, 30.0, 40.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        svg,
        r#"<rect width="{w}" height="{h}" fill="white"/><text x="{}" y="18" text-anchor="middle" font-size="13">{title}</text>"#,
        w / 2.0
    );
    if all.is_empty() {
        svg.push_str("</svg>");
        return svg;
    }
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        x1 = x0 + 1.0;
        x0 -= 0.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
        y0 -= 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| h - b - (y - y0) / (y1 - y0) * (h - t - b);
    let _ = write!(
        svg,
        r##"<g stroke="#999"><line x1="{l}" y1="{}" x2="{}" y2="{}"/><line x1="{l}" y1="{t}" x2="{l}" y2="{}"/></g>"##,
        h - b,
        w - r,
        h - b,
        h - b
    );
    for i in 0..=4 {
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            px(fx),
            h - b + 14.0,
            fmt(fx)
        );
        let _ = write!(
            svg,
            r##"<text x="{}" y="{:.1}" text-anchor="end">{}</text><line x1="{l}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            l - 4.0,
            py(fy) + 4.0,
            fmt(fy),
            w - r,
            py(fy),
            py(fy)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        (l + w - r) / 2.0,
        h - 6.0
    );
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if pts.len() == 1 {
            let _ = write!(
                svg,
                r#"<circle cx="{}" cy="{}" r="3" fill="{}"/>"#,
                pts[0].split(',').next().unwrap_or("0"),
                pts[0].split(',').nth(1).unwrap_or("0"),
                s.color
            );
        } else {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
                s.color,
                pts.join(" ")
            );
        }
        let ly = t + 14.0 + 14.0 * i as f64;
        let _ = write!(
            svg,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            w - r - 120.0,
            w - r - 100.0,
            s.color,
            w - r - 95.0,
            ly + 4.0,
            s.name
        );
    }
    svg.push_str("</svg>");
    svg
}

fn fmt(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}
