//! The loss-curve image written at the end of a run: an SVG line chart of the training loss per
//! step, with the validation points and a reference line (the unigram baseline) when given.

/// An SVG of `train` (step, loss), `val` points and an optional horizontal `baseline`.
pub fn loss_curve_svg(train: &[(u64, f64)], val: &[(u64, f64)], baseline: Option<f64>) -> String {
    let (w, h, pad) = (720.0, 420.0, 50.0);
    let all = train.iter().chain(val).map(|p| p.1).chain(baseline);
    let (mut lo, mut hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let max_step = train
        .iter()
        .chain(val)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |s: u64| pad + (w - 2.0 * pad) * s as f64 / max_step;
    let y = |l: f64| h - pad - (h - 2.0 * pad) * (l - lo) / (hi - lo);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<text x="{pad}" y="{t}">loss {hi:.3}</text><text x="{pad}" y="{bl}">{lo:.3}</text>
<text x="{r}" y="{bl}" text-anchor="end">step {ms}</text>
"#,
        b = h - pad,
        r = w - pad,
        t = pad - 8.0,
        bl = h - pad + 16.0,
        ms = max_step as u64
    );
    if let Some(bv) = baseline {
        s += &format!(
            r#"<line x1="{pad}" y1="{yy:.1}" x2="{r}" y2="{yy:.1}" stroke="gray" stroke-dasharray="4 4"/><text x="{r}" y="{ty:.1}" text-anchor="end" fill="gray">unigram {bv:.3}</text>
"#,
            yy = y(bv),
            r = w - pad,
            ty = y(bv) - 4.0
        );
    }
    let pts: Vec<String> = train
        .iter()
        .map(|&(st, l)| format!("{:.1},{:.1}", x(st), y(l)))
        .collect();
    s += &format!(
        r#"<polyline fill="none" stroke="steelblue" stroke-width="1.5" points="{}"/>
"#,
        pts.join(" ")
    );
    for &(st, l) in val {
        s += &format!(
            r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="darkorange"/>
"#,
            x(st),
            y(l)
        );
    }
    s += r#"<text x="60" y="70" fill="steelblue">train</text><text x="60" y="86" fill="darkorange">validation</text>
</svg>
"#;
    s
}
